"""Bad input to the control-plane code fails fast, names the cause and the log
file to read, and leaves no process behind."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import procs
from tests.kube.controlplane import (
    BUILD_COMMAND,
    Binaries,
    ComponentExitedError,
    ComponentNotReadyError,
    ControlPlane,
    MissingBinaryError,
    PortInUseError,
    Ports,
    free_port,
    start_apiserver,
    start_etcd,
)
from tests.kube.pki import Pki


@pytest.fixture
def binaries() -> Binaries:
    # Fails (not skips) with the build command when nothing is built.
    return Binaries.find()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_missing_binaries_name_the_build_command(tmp_path: Path) -> None:
    (tmp_path / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "etcd").chmod(0o755)
    with pytest.raises(MissingBinaryError) as err:
        Binaries.find(tmp_path)
    message = str(err.value)
    assert BUILD_COMMAND in message
    assert str(tmp_path / "kube-apiserver") in message
    assert str(tmp_path / "etcd") + "," not in message  # the one present is not listed


@pytest.mark.kube
def test_missing_binary_fails_start_and_cleans_up(binaries: Binaries, tmp_path: Path) -> None:
    broken = Binaries(
        etcd=binaries.etcd,
        kube_apiserver=tmp_path / "no-such-kube-apiserver",
        kube_controller_manager=binaries.kube_controller_manager,
        kube_scheduler=binaries.kube_scheduler,
        kubectl=binaries.kubectl,
        helm=binaries.helm,
    )
    before = set(procs.live())
    with pytest.raises(MissingBinaryError, match="no-such-kube-apiserver"):
        ControlPlane.start(tmp_path / "plane", broken)
    # etcd had been started; it must have been stopped again.
    assert set(procs.live()) == before
    assert "etcd" in (tmp_path / "plane" / "logs" / "etcd.log").read_text()


@pytest.mark.kube
def test_port_in_use_fails_fast(binaries: Binaries, tmp_path: Path, busy_port: int) -> None:
    before = set(procs.live())
    started = time.monotonic()
    with pytest.raises(PortInUseError, match=f"127.0.0.1:{busy_port} is already in use") as err:
        start_etcd(
            binaries.etcd,
            tmp_path / "data",
            tmp_path / "logs",
            client_port=busy_port,
            peer_port=free_port(),
        )
    assert "etcd" in str(err.value)
    assert time.monotonic() - started < 5
    assert set(procs.live()) == before


@pytest.mark.kube
def test_port_taken_after_the_check_names_the_log(
    binaries: Binaries, tmp_path: Path, busy_port: int
) -> None:
    """If the port is taken between the check and the bind, the component
    exits: the error says so and names the log, which has the bind error."""
    before = set(procs.live())
    with pytest.raises(ComponentExitedError) as err:
        start_etcd(
            binaries.etcd,
            tmp_path / "data",
            tmp_path / "logs",
            client_port=busy_port,
            peer_port=free_port(),
            timeout=30,
            check_ports=False,
        )
    message = str(err.value)
    assert "etcd exited with code" in message
    assert str(tmp_path / "logs" / "etcd.log") in message
    assert "address already in use" in message  # from the log's tail
    assert set(procs.live()) == before


@pytest.mark.kube
def test_port_in_use_for_the_whole_plane(
    binaries: Binaries, tmp_path: Path, busy_port: int
) -> None:
    before = set(procs.live())
    with pytest.raises(PortInUseError, match="kube-apiserver"):
        ControlPlane.start(tmp_path / "plane", binaries, Ports(apiserver=busy_port))
    assert set(procs.live()) == before


@pytest.mark.kube
def test_apiserver_that_never_becomes_ready(binaries: Binaries, tmp_path: Path) -> None:
    """An API server whose etcd does not exist never gets ready: the wait stops at
    its timeout with the log file in the message, and the process is gone."""
    pki = Pki.create(tmp_path / "pki")
    dead_etcd = f"http://127.0.0.1:{free_port()}"
    before = set(procs.live())
    started = time.monotonic()
    with pytest.raises((ComponentNotReadyError, ComponentExitedError)) as err:
        start_apiserver(
            binaries.kube_apiserver,
            pki,
            tmp_path / "logs",
            tmp_path / "certs",
            etcd_url=dead_etcd,
            port=free_port(),
            timeout=5,
        )
    elapsed = time.monotonic() - started
    log = tmp_path / "logs" / "kube-apiserver.log"
    message = str(err.value)
    assert str(log) in message
    assert "kube-apiserver" in message
    assert elapsed < 30
    assert log.exists() and log.stat().st_size > 0
    assert set(procs.live()) == before
    print(message)


def test_fixture_fails_not_skips_without_binaries(tmp_path: Path) -> None:
    """A session whose binaries are missing errors out, naming the build command."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PATIO_K8S_BIN_DIR": str(tmp_path / "empty")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "tests/kube/test_workloads.py::test_version_is_pinned",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 error" in out and "skipped" not in out, out
    assert "MissingBinaryError" in out and BUILD_COMMAND in out, out
