"""Shared fixtures: free ports, TLS material made by the tests, subprocess hygiene."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

ROOT = Path(__file__).resolve().parent.parent

# The real Kubernetes control plane and node agent (tests/kube), for every folder.
pytest_plugins = ["tests.kube.plugin", "tests.realnode.plugin"]


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "::1", "localhost")


@pytest.fixture(scope="session")
def client_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("patio-client@example.test")


@pytest.fixture
def server_ssl(server_cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    return context


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context


@pytest.fixture
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail a test whose brokers leave an asyncio task running after it."""
    yield
    current = asyncio.current_task()
    deadline = time.monotonic() + 2
    while left := [t for t in asyncio.all_tasks() if t is not current and not t.done()]:
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks left behind: {left}")
        await asyncio.sleep(0.01)


class Processes:
    """Start subprocesses that are always killed at teardown, even on failure."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def python(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(kwargs.pop("env", None) or {})  # type: ignore[arg-type]
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            start_new_session=True,
            **kwargs,  # type: ignore[call-overload]
        )
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()
