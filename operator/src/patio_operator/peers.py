"""Pods -> the peers file, as pure functions.

The operator indexes the cluster's pods (kopf index) as small `PodView`s and
renders the peers file from them on every pod event, so a pod that appears,
gets a new IP or goes away is reflected in the ConfigMap within a second or
two. The kubelet then refreshes the mounted file in every running worker,
which re-reads it (docs/worker-contract.md).

Which pods are listed:
- every pod that has an IP and has not finished -- ready or not, because a
  worker only becomes ready after connecting to its peers, so listing only
  ready pods would deadlock a fresh cluster;
- not pods being deleted: a draining worker takes no new calls, and dropping
  it from the file stops the others dialling it again after it exits.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HEADER = "# Managed by patio-operator: one host:port a line, rewritten as pods come and go.\n"

_WAITING_FAILURES = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class PodView:
    """What the operator needs to know about one worker pod."""

    name: str
    ip: str
    phase: str
    ready: bool
    terminating: bool
    #: A reason when a container is stuck (CrashLoopBackOff, image pull...).
    failure: str = ""
    restarts: int = 0


def pod_view(pod: Mapping[str, Any]) -> PodView:
    """Summarise a pod body (as kopf or the API returns it)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    failure = ""
    restarts = 0
    for cs in status.get("containerStatuses") or []:
        restarts += int(cs.get("restartCount") or 0)
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _WAITING_FAILURES and not failure:
            failure = f"{cs.get('name', '?')}: {waiting['reason']}"
    phase = str(status.get("phase") or "Pending")
    if phase == "Failed" and not failure:
        failure = f"pod {phase}: {status.get('reason') or 'unknown reason'}"
    return PodView(
        name=str(meta.get("name", "")),
        ip=str(status.get("podIP") or ""),
        phase=phase,
        ready=ready,
        terminating=bool(meta.get("deletionTimestamp")),
        failure=failure,
        restarts=restarts,
    )


def is_peer(pod: PodView) -> bool:
    """Whether the pod belongs in the peers file (see the module docstring)."""
    return bool(pod.ip) and not pod.terminating and pod.phase not in ("Succeeded", "Failed")


def address(ip: str, port: int) -> str:
    """`ip:port`, bracketing IPv6 addresses so the port stays unambiguous."""
    try:
        if ipaddress.ip_address(ip).version == 6:
            return f"[{ip}]:{port}"
    except ValueError:
        pass
    return f"{ip}:{port}"


def peer_addresses(pods: Iterable[PodView], port: int) -> list[str]:
    """Sorted, de-duplicated addresses: a stable order means a stable ConfigMap."""
    return sorted({address(p.ip, port) for p in pods if is_peer(p)})


def render(addresses: Iterable[str]) -> str:
    """The file's text: a comment header, then one address a line."""
    return HEADER + "".join(f"{a}\n" for a in addresses)


def parse(text: str) -> list[str]:
    """Addresses listed in a peers file (comments and blank lines skipped)."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out
