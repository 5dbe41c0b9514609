"""Every code example of the original README runs unchanged against patio."""

from __future__ import annotations

import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, Processes

EXAMPLES = ROOT / "examples" / "readme"


def run_example(name: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("name", ["quickstart_threads.py", "quickstart_async.py"])
def test_quickstart_prints_a_hundred_products(name: str) -> None:
    done = run_example(name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([6] * 100)


@pytest.mark.parametrize(
    ("name", "names"),
    [
        (
            "registry_decorator.py",
            {"div", "sub"},
        ),
        ("registry_register.py", {"sub"}),
        ("registry_mapping.py", {"mul"}),
    ],
)
def test_registry_examples(name: str, names: set[str]) -> None:
    namespace = runpy.run_path(str(EXAMPLES / name))
    rpc = namespace["rpc"]
    assert names <= set(rpc)
    generated = set(rpc) - names
    assert all(n.startswith("example.") for n in generated)
    if name == "registry_decorator.py":
        assert rpc.get_name(namespace["mul"]).startswith("example.")
        assert rpc.get_name(namespace["pow"]).startswith("example.")
        assert rpc["div"](6, 3) == 2
    if name == "registry_mapping.py":
        assert rpc["mul"](6, 7) == 42


def wait_for_port(host: str, port: int, timeout: float = 15) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(family) as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {host}:{port}")


def test_tcp_server_example_serves_ipv4_and_ipv6(processes: Processes) -> None:
    server = processes.python(
        str(EXAMPLES / "tcp_server.py"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for_port("127.0.0.1", 15383)
    wait_for_port("::1", 12345)
    client = run_example("tcp_client.py")
    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == str([i * i for i in range(10)])
    assert server.poll() is None, "the server must keep serving after a client leaves"


def test_client_executes_server_calls() -> None:
    done = run_example("tcp_client_executes.py")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


def test_full_mesh_example() -> None:
    done = run_example("full_mesh.py")
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.split("\n"))
    assert [line for line in lines if line] == [f"node-{i} called 30 times" for i in range(3)]


def test_examples_folder_is_what_the_tests_run() -> None:
    tested = {
        "quickstart_threads.py",
        "quickstart_async.py",
        "registry_decorator.py",
        "registry_register.py",
        "registry_mapping.py",
        "tcp_server.py",
        "tcp_client.py",
        "tcp_client_executes.py",
        "full_mesh.py",
    }
    assert {p.name for p in Path(EXAMPLES).glob("*.py")} == tested
