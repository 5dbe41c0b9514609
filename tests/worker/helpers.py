"""Helpers for the worker tests: real processes, real sockets, nothing left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TASKS = "patio_worker_testtasks:rpc"


def patio_env(**extra: str) -> dict[str, str]:
    """The environment of a patio subprocess: our tasks importable, no stray PATIO_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATIO_")}
    env.pop("POD_IP", None)
    env.pop("POD_NAME", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_patio(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "patio", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
        env=env if env is not None else patio_env(),
        cwd=str(REPO),
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """All samples of a /metrics page, keyed by (name, labels)."""
    status, text = http_get(url)
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample_sum(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class WorkerProcess:
    """A `patio worker` subprocess in its own session (so its group can be killed)."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        host: str,
        port: int,
        metrics_port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patio", "worker", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else patio_env(),
            cwd=str(REPO),
            start_new_session=True,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                status, last = http_get(self.metrics_url + "/readyz", timeout=1.0)
                if status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"worker not ready after {timeout}s ({last!r}):\n{self.log()}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()


class Spawner:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.workers: list[WorkerProcess] = []

    def worker(
        self,
        *extra: str,
        host: str = "127.0.0.1",
        registry: str = TASKS,
        node_id: str | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        metrics_port: int | None = None,
    ) -> WorkerProcess:
        port = port or free_port(host)
        metrics_port = metrics_port or free_port(host)
        index = len(self.workers)
        args = [
            registry,
            "--listen",
            host,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--node-id",
            node_id or f"w{index}",
            *extra,
        ]
        worker = WorkerProcess(
            args, self.tmp_path / f"worker-{index}.log", host, port, metrics_port, env=env
        )
        self.workers.append(worker)
        return worker
