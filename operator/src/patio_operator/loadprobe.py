"""Reading a worker's executor load from its /metrics endpoint, for the autoscaler.

Same shape as `keyprobe` (a short blocking GET from the reconciler's thread;
an unreachable worker is simply "no report"), kept apart so the key probe's
hardening and the autoscaler's sampling can change independently. Workers
are sampled in parallel so that one slow member costs one timeout, not one
per member.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from patio_operator.autoscale import Load, parse_load

FETCH_TIMEOUT_SECONDS = 2.0
#: The metrics page of a worker is a few kilobytes; this is a sanity cap.
MAX_BYTES = 4 * 1024 * 1024
#: Parallel samples per cluster.
MAX_PARALLEL = 8


def fetch_load(ip: str, port: int) -> Load | None:
    """GET http://ip:port/metrics and parse the executor gauges; None when unreachable."""
    host = f"[{ip}]" if ":" in ip else ip
    try:
        with urllib.request.urlopen(
            f"http://{host}:{port}/metrics", timeout=FETCH_TIMEOUT_SECONDS
        ) as resp:
            text = resp.read(MAX_BYTES).decode("utf-8", "replace")
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return parse_load(text)


def sample(targets: Iterable[tuple[str, str]], port: int) -> dict[str, Load]:
    """{pod name: load} for (pod name, ip) pairs; members that did not answer are left out."""
    pairs = list(targets)
    if not pairs:
        return {}
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(pairs))) as pool:
        loads = list(pool.map(lambda pair: fetch_load(pair[1], port), pairs))
    return {name: load for (name, _), load in zip(pairs, loads, strict=True) if load is not None}
