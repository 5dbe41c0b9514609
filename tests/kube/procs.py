"""Child processes that never outlive the test session.

Every process started for the control plane or for a pod goes through
:func:`spawn`: it runs in its own process group (so that stopping it also
stops whatever it forked), gets ``SIGKILL`` from the kernel if the thread that
started it dies (``setpriv --pdeathsig``, for a test process that is killed
hard), and is remembered in a registry that an ``atexit`` hook empties.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

_live: set[subprocess.Popen[bytes]] = set()
_lock = threading.Lock()
_SETPRIV = shutil.which("setpriv")


def spawn(
    argv: Sequence[str],
    *,
    log: Path | IO[bytes],
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout and stderr appended to ``log``."""
    full = list(argv)
    if _SETPRIV is not None:
        full = [_SETPRIV, "--pdeathsig", "KILL", "--", *full]
    if isinstance(log, Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        out: IO[bytes] = log.open("ab")
    else:
        out = log
    try:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        if isinstance(log, Path):
            out.close()
    with _lock:
        _live.add(proc)
    return proc


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` (its session leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """SIGTERM the group, SIGKILL it after ``grace`` seconds; reap; return the exit code."""
    try:
        if proc.poll() is None:
            signal_group(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        # The leader may be gone while children of the group are not.
        signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        return proc.returncode
    finally:
        forget(proc)


def forget(proc: subprocess.Popen[bytes]) -> None:
    with _lock:
        _live.discard(proc)


def live() -> list[subprocess.Popen[bytes]]:
    with _lock:
        return list(_live)


def kill_all() -> None:
    """Kill every process started through :func:`spawn` that is still registered."""
    procs = live()
    for proc in procs:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + 3
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        forget(proc)


atexit.register(kill_all)
