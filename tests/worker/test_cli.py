"""The ``patio`` command as users run it: versions, variables, ``patio call`` in and out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patio import __version__
from patio.cli import main

from .conftest import Spawner
from .helpers import REPO, free_port, patio_env, run_patio


def run_main(
    capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    try:
        code = main(list(argv), env or {})
    except SystemExit as exc:  # argparse's --version and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [["--version"], ["worker", "--version"], ["call", "--version"], ["local", "--version"],
     ["keygen", "--version"], ["operator", "--version"]],
)  # fmt: skip
def test_version(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = run_main(capsys, *argv)
    assert (code, out) == (0, f"patio {__version__}\n")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["call", "--peer", "h", "t"], {"PATIO_TIMEOUT": "-1"}, "PATIO_TIMEOUT: must be positive"),
        (["call", "--peer", "h", "t"], {"PATIO_TIMEOUT": "soon"}, "PATIO_TIMEOUT: must be a num"),
        (["call", "--peer", "h", "t"], {"PATIO_JSON": "maybe"}, "PATIO_JSON: must be true or"),
        (["call", "--peer", "h", "t"], {"PATIO_KEY_FILE": "/nonexistent/k"},
         "key file /nonexistent/k does not exist"),
        (["call", "t"], {}, "no peer to call: give --peer HOST:PORT (or set PATIO_PEER)"),
        (["call", "t"], {"PATIO_PEER": "[::1"}, "malformed --peer address '[::1'"),
        (["call", "--peer", "h", "--kwargs", "[1]", "t"], {}, "--kwargs must be a JSON object"),
        (["call", "--peer", "h", "--kwargs", "{", "t"], {}, "--kwargs is not valid JSON"),
        (["call", "--peer", "h", "t", "@/nonexistent/arg"], {},
         "argument 1: file /nonexistent/arg does not exist"),
        (["call", "--no-frame-mac", "--peer", "127.0.0.1,10.1.2.3:15383", "t"], {},
         "--no-frame-mac / PATIO_NO_FRAME_MAC is for benchmarks on loopback only, and "
         "10.1.2.3 is not loopback"),
        (["status", "--peer", "[fd00::1]:15383"], {"PATIO_NO_FRAME_MAC": "1"},
         "fd00::1 is not loopback: anyone on the path could inject calls"),
        (["call", "--peer", "h", "t"], {"PATIO_NO_FRAME_MAC": "maybe"},
         "PATIO_NO_FRAME_MAC: must be true or"),
        (["local"], {"PATIO_WORKERS": "300"}, "PATIO_WORKERS: must be between 1 and 253, not 300"),
        (["local", "-n", "300"], {}, "--workers/-n: must be between 1 and 253, not 300"),
        (["local"], {"PATIO_EXECUTOR": "gpu"}, "PATIO_EXECUTOR: must be one of async, thread"),
        (["local"], {"PATIO_CALLS": "-5"}, "PATIO_CALLS: must be at least 0, not -5"),
        (["local"], {"PATIO_KEY_FILE": "/nonexistent/k"}, "key file /nonexistent/k does not"),
        (["worker", "t:rpc"], {"PATIO_PORT": "x"}, "PATIO_PORT must be an integer, not 'x'"),
    ],
)  # fmt: skip
def test_bad_values_name_their_source(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], message: str
) -> None:
    code, out, err = run_main(capsys, *argv, env=env)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith(f"patio {argv[0]}: error: ")


def test_flag_wins_over_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    # A good flag with a bad variable of the same option: the variable is not used...
    # (PATIO_CALLS is valid here, so only the flag's value can make this fail.)
    code, _, err = run_main(capsys, "local", "--calls", "-1", env={"PATIO_CALLS": "5"})
    assert code == 2 and "argument --calls: must be at least 0, not -1" in err


def test_variables_of_other_commands_are_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    # PATIO_EXECUTOR=null is valid for `patio worker`, not among `patio local`'s choices.
    code, out, err = run_main(capsys, "keygen", env={"PATIO_EXECUTOR": "null"})
    assert code == 0 and out.strip() and not err


def test_operator_help_without_the_kubernetes_extra(tmp_path: Path) -> None:
    """`patio operator --help` where kopf cannot be imported: a hint, no traceback."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['kopf'] = None  # as if the extra were not installed\n"
    )
    env = patio_env(PYTHONPATH=f"{tmp_path}:{REPO}")
    for argv, code, stream in ((["--help"], 0, "stdout"), (["--namespace", "x"], 2, "stderr")):
        result = subprocess.run(
            [sys.executable, "-m", "patio", "operator", *argv],
            capture_output=True, text=True, env=env, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip
        text = getattr(result, stream)
        assert result.returncode == code, (result.stdout, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
        assert "pip install 'patio[kubernetes]'" in text and "kopf" in text, text


@pytest.mark.slow
def test_patio_call_inputs_outputs_and_variables(spawn: Spawner, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("call-key\n")
    worker = spawn.worker("--key-file", str(key))
    open_worker = spawn.worker()  # no key: the empty key, on loopback
    worker.wait_ready()
    open_worker.wait_ready()
    dead = f"127.0.0.1:{free_port()}"

    # Everything from variables: peer, key file, JSON output.
    env = patio_env(PATIO_PEER=worker.address, PATIO_KEY_FILE=str(key), PATIO_JSON="1")
    result = run_patio("call", "mul", "6", "7", env=env)
    assert (result.returncode, result.stdout) == (0, "42\n"), result.stderr
    assert "warning" not in result.stderr

    # Datetimes, Decimals and UUIDs as strings, in JSON and for people.
    typed = run_patio("call", "--json", "typed", env=env)
    assert json.loads(typed.stdout) == {
        "when": "2026-11-30T12:00:00+00:00",
        "amount": "1.10",
        "id": "12345678-1234-5678-1234-567812345678",
    }, typed.stdout
    human = run_patio("call", "typed", env=patio_env(PATIO_PEER=worker.address,
                                                     PATIO_KEY_FILE=str(key)))  # fmt: skip
    assert "Decimal(" not in human.stdout and '"amount": "1.10"' in human.stdout

    # --kwargs, @FILE and - ; a comma list of peers where one is down.
    name_file = tmp_path / "name.json"
    name_file.write_text('"file"')
    args = ["call", "--peer", f"{dead},{worker.address}", "--key-file", str(key)]
    from_file = run_patio(*args, "--kwargs", '{"punctuation": "?"}', "greet", f"@{name_file}")
    assert (from_file.returncode, from_file.stdout) == (0, "hello file?\n"), from_file.stderr
    assert dead in from_file.stderr  # the peer it could not reach is named
    from_stdin = subprocess.run(
        [sys.executable, "-m", "patio", *args, "--kwargs", "-", "greet", "stdin"],
        input='{"punctuation": "."}', capture_output=True, text=True, env=patio_env(),
        cwd=str(REPO), timeout=60, check=False,
    )  # fmt: skip
    assert from_stdin.stdout == "hello stdin.\n", from_stdin.stderr
    repeated = run_patio("call", "--peer", dead, "--peer", worker.address, "--key-file",
                         str(key), "mul", "2", "3")  # fmt: skip
    assert repeated.stdout == "6\n", repeated.stderr

    # A task that raises, with --json: the error as JSON on stdout.
    failed = run_patio("call", "--json", "fail", "boom", env=env)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["type"] == "ValueError"

    # No key at all: it works against a worker without a key, with a warning.
    no_key = run_patio("call", "--peer", open_worker.address, "mul", "2", "5")
    assert no_key.stdout == "10\n", no_key.stderr
    assert "warning: no key given" in no_key.stderr

    # Every peer down: one error naming all of them, at once (not after the
    # 10 s a member would keep retrying); a wrong key: at once, naming our
    # key's fingerprint. (Bounds are generous: "did not wait", not speed.)
    other_dead = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    down = run_patio("call", "--peer", f"{dead},{other_dead}", "--key", "k", "mul", "1", "2")
    assert down.returncode == 1 and dead in down.stderr and other_dead in down.stderr
    assert "ConnectionRefusedError" in down.stderr
    assert time.monotonic() - started < 6, down.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("a-different-key-of-enough-length-1234\n")
    started = time.monotonic()
    refused = run_patio("call", "--peer", worker.address, "--key-file", str(wrong), "mul", "1", "2")
    assert refused.returncode == 1 and "fingerprint" in refused.stderr, refused.stderr
    assert time.monotonic() - started < 6, refused.stderr


@pytest.mark.slow
def test_call_and_status_reach_a_worker_without_frame_mac(spawn: Spawner) -> None:
    key = "frame-mac-off-key-0123456789abcdefghij"
    worker = spawn.worker("--key", key, "--no-frame-mac")
    worker.wait_ready()
    called = run_patio("call", "--no-frame-mac", "--peer", worker.address, "--key", key,
                       "mul", "6", "7")  # fmt: skip
    assert (called.returncode, called.stdout) == (0, "42\n"), called.stderr
    status = run_patio("status", "--json", "--peer", worker.address, "--key", key,
                       env=patio_env(PATIO_NO_FRAME_MAC="1"))  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert [m["node_id"] for m in json.loads(status.stdout)["members"]] == ["w0"]
    # Without the flag: refused at once, naming both settings and what to do.
    started = time.monotonic()
    refused = run_patio("call", "--peer", worker.address, "--key", key, "mul", "6", "7")
    assert refused.returncode == 1, refused.stderr
    assert "FrameMacRefusedError" in refused.stderr, refused.stderr
    assert "frame authentication off and this side has it on" in refused.stderr
    assert "start both ends with --no-frame-mac" in refused.stderr
    assert time.monotonic() - started < 6, refused.stderr


def test_status_maps_from_peers_are_reduced_to_known_fields() -> None:
    from patio.broker.tcp.status import clean_member

    assert clean_member(["not", "a", "map"]) is None
    assert clean_member({"served": 3}) is None  # no node id
    member = clean_member({
        "node_id": "a", "served": "3", "failed": 1, "draining": 1, "tasks": ["x", 2, "y"],
        "capacity": True, "secret": "dropped", "uptime": 1.5,
    })  # fmt: skip
    assert member == {"node_id": "a", "failed": 1, "tasks": ["x", "y"], "uptime": 1.5}


@pytest.mark.slow
def test_retryable_call_whose_only_peer_dies_names_it(spawn: Spawner, tmp_path: Path) -> None:
    """Not NoRouteError: the task is served, its only known peer is gone."""
    worker = spawn.worker("--key", "strong-enough-key-for-this-test-0001")
    worker.wait_ready()
    call = subprocess.Popen(
        [sys.executable, "-m", "patio", "call", "--peer", worker.address, "--key",
         "strong-enough-key-for-this-test-0001", "--retryable", "sleep", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=patio_env(),
        cwd=str(REPO),
    )  # fmt: skip
    time.sleep(1.5)  # the call is running on the worker
    worker.kill()
    _, err = call.communicate(timeout=60)
    assert call.returncode == 1, err
    assert "NoRouteError" not in err and "PeersUnreachableError" in err, err
    assert worker.address in err
