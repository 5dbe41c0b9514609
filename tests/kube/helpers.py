"""Small helpers shared by the tests in tests/kube."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .controlplane import ControlPlane

T = TypeVar("T")


def wait_until(
    fn: Callable[[], T | None], timeout: float = 60, interval: float = 0.25, what: str = ""
) -> T:
    """Call ``fn`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or fn} (last: {last!r})")


def apply(plane: ControlPlane, namespace: str, *objects: dict[str, Any]) -> None:
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects))


def pods(plane: ControlPlane, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
    args = ["get", "pods", "-n", namespace]
    if selector:
        args += ["-l", selector]
    items: list[dict[str, Any]] = plane.kubectl_json(*args)["items"]
    return items


def pod(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = plane.kubectl_json("get", "pod", "-n", namespace, name)
    return result


def is_ready(p: dict[str, Any]) -> bool:
    conds = p.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (checked in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return []
    return [a.decode() for a in raw.split(b"\0") if a]


def descendants_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if pid_alive(p)]


def own_pid() -> int:
    return os.getpid()
