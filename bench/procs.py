"""Worker processes: start, talk to over stdin/stdout JSON lines, stop."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from bench.envs import PythonEnv


class WorkerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A worker process (in its own session, so the whole group can be ended)."""

    def __init__(
        self, env: PythonEnv, script: Path, cfg: dict[str, Any], label: str, log_dir: Path
    ) -> None:
        self.label = label
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{label}.stderr.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(
            env.command(script, json.dumps(cfg)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env.environ(),
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"event": "noise", "line": line}
            if isinstance(msg, dict):
                self._lines.put(msg)
        self._lines.put(None)

    def stderr_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{self.label}: no {event!r} within {timeout:.0f} s")
            try:
                msg = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if msg is None:
                self.popen.wait(timeout=5)
                raise WorkerError(
                    f"{self.label}: exited (rc={self.popen.returncode}) before {event!r}: "
                    f"{self.stderr_tail()}"
                )
            if msg.get("event") == "error":
                raise WorkerError(f"{self.label}: {msg.get('error')}")
            if msg.get("event") == event:
                return msg

    def send(self, command: str) -> None:
        if self.popen.stdin is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.popen.stdin.write((command + "\n").encode())
            self.popen.stdin.flush()

    def vmhwm_mb(self) -> float | None:
        """Peak RSS from /proc (only while the process is alive)."""
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 1024.0, 2)
        except OSError:
            return None
        return None

    def stop(self, grace: float = 10.0) -> None:
        """Close stdin (the worker's cue to exit), then escalate."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(timeout=5)
        # the session may hold children of the worker: end them too
        self._signal(signal.SIGKILL)
        if self.popen.stdout is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()
        self._log.close()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


class ProcGroup:
    """Every process of one measurement; all are stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.stop(grace=5.0)
