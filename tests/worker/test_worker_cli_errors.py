"""Every bad input ends the same way: exit code 2 and one line naming the problem."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trustme

from .helpers import TASKS, free_port, run_patio


def worker_args(*extra: str) -> list[str]:
    return ["worker", TASKS, "--port", str(free_port()), "--metrics-port", "0", *extra]


KEY = ("--key", "test-key-0123456789abcdefghijklmnopqrstuv")  # strong: no weak-key warning line


def assert_config_error(args: list[str], message: str) -> None:
    result = run_patio(*args, timeout=30)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert lines[0].startswith("patio worker: error: "), lines[0]


def test_unimportable_module() -> None:
    assert_config_error(
        ["worker", "no_such_module_abc:rpc"],
        "cannot import registry module 'no_such_module_abc': no such module",
    )


def test_module_that_raises_on_import() -> None:
    assert_config_error(
        ["worker", "broken_registry_module:rpc"], "RuntimeError: this module is broken on purpose"
    )


def test_attribute_that_is_not_a_registry() -> None:
    assert_config_error(
        ["worker", "patio_worker_testtasks:not_a_registry"],
        "patio_worker_testtasks:not_a_registry is a dict, not a patio.Registry",
    )


def test_missing_attribute() -> None:
    assert_config_error(["worker", "patio_worker_testtasks:nope"], "has no attribute 'nope'")


def test_mesh_port_in_use() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        assert_config_error(
            ["worker", TASKS, "--port", str(port), "--metrics-port", "0", *KEY],
            f"mesh port 127.0.0.1:{port} is already in use",
        )


def test_metrics_port_in_use() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        assert_config_error(
            ["worker", TASKS, "--port", str(free_port()), "--metrics-port", str(port), *KEY],
            f"metrics port 127.0.0.1:{port} is already in use",
        )


def test_missing_and_unreadable_key_file(tmp_path: Path) -> None:
    assert_config_error(
        worker_args("--key-file", str(tmp_path / "absent")),
        f"key file {tmp_path / 'absent'} does not exist",
    )
    assert_config_error(worker_args("--key-file", str(tmp_path)), "cannot be read")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert_config_error(worker_args("--key-file", str(empty)), "is empty")


def test_malformed_peers_file(tmp_path: Path) -> None:
    peers = tmp_path / "peers"
    peers.write_text("127.0.0.1:1\n127.0.0.1:notaport\n")
    assert_config_error(
        worker_args("--peers-file", str(peers)),
        f"peers file {peers} line 2: malformed peer address",
    )
    assert_config_error(worker_args("--peers-file", str(tmp_path / "none")), "does not exist")


def test_tls_cert_and_key_that_do_not_match(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, other_key = tmp_path / "cert.pem", tmp_path / "other-key.pem"
    ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(cert))
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    assert_config_error(
        worker_args("--tls-cert", str(cert), "--tls-key", str(other_key)),
        f"TLS key {other_key} does not match certificate {cert}",
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["worker"], {}, "no registry given"),
        (["worker", TASKS, "--port", "nope"], {}, "--port must be an integer"),
        (["worker", TASKS], {"PATIO_EXECUTOR": "gpu"}, "PATIO_EXECUTOR must be one of"),
        (["worker", TASKS, "--listen", "0.0.0.0"], {}, "no key for a worker listening on 0.0.0.0"),
        (["worker", TASKS, "--frobnicate"], {}, "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_flags_and_variables(args: list[str], env: dict[str, str], message: str) -> None:
    from .helpers import patio_env

    result = run_patio(*args, env=patio_env(**env), timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"patio worker: error: {message}"] or (
        message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    ), result.stderr


def test_call_and_operator_and_keygen() -> None:
    bad_peer = run_patio("call", "--peer", "[::1", "mul", "1", timeout=30)
    assert bad_peer.returncode == 2 and "missing ']'" in bad_peer.stderr
    key = run_patio("keygen")
    assert key.returncode == 0 and len(key.stdout.strip()) >= 43
    assert run_patio("keygen").stdout != key.stdout
    unknown = run_patio("frobnicate")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_operator_gets_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from patio import cli

    seen: list[list[str]] = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: fake)
    assert cli.main(["operator", "--namespace", "x", "--help"]) == 0
    assert seen == [["--namespace", "x", "--help"]]
