"""Reading the key a worker presents, from its /metrics endpoint.

Parsing is a pure function over the Prometheus text format. The fetch is
deliberately small and distrustful, because the worker pod answering it is
tenant code:

- one plain HTTP/1.0 GET on a socket, so there is no redirect to follow: a
  pod cannot make the operator send a request anywhere else;
- one total deadline per probe, checked before every read, so a response
  trickling a byte at a time is cut off at the deadline instead of holding
  the operator as long as each single read keeps arriving;
- a bounded response size;
- :func:`probe_all` runs a cluster's probes concurrently (bounded) and
  returns by one deadline, so one cluster's pods cannot hold the operator's
  worker threads, and with them every other cluster, for long.

An unreachable, slow or malformed worker simply counts as "no report yet".
"""

from __future__ import annotations

import concurrent.futures
import re
import socket
import time
from collections.abc import Callable, Mapping

METRIC = "patio_auth_keys_info"
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")

#: Whole-probe deadline (connect, request, every read). A healthy worker
#: answers /metrics in milliseconds; a rotation step simply waits for the
#: next pass when one does not.
FETCH_DEADLINE_SECONDS = 2.0

#: Largest /metrics response read: a worker's is a few KiB.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024

#: Probes of one cluster in flight at once. Bounded so a cluster with many
#: pods does not open hundreds of sockets and threads in the operator.
MAX_CONCURRENT_PROBES = 16

#: Slack on top of the deadline for thread start-up and parsing.
_GRACE_SECONDS = 0.5


def primary_fingerprint(metrics_text: str) -> str | None:
    """The `primary` label of the worker's `patio_auth_keys_info` gauge, or None."""
    for line in metrics_text.splitlines():
        if not line.startswith(METRIC):
            continue
        m = _SAMPLE.match(line)
        if not m or m.group("name") != METRIC:
            continue
        try:
            if float(m.group("value")) == 0:
                continue
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        if labels.get("primary"):
            return str(labels["primary"])
    return None


def _http_get(ip: str, port: int, path: str, deadline_seconds: float) -> bytes | None:
    """The body of a 200 answer to GET ``path``, or None; never past the deadline."""
    deadline = time.monotonic() + deadline_seconds
    host = f"[{ip}]" if ":" in ip else ip
    request = (f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: text/plain\r\n\r\n").encode(
        "ascii"
    )
    chunks: list[bytes] = []
    size = 0
    try:
        with socket.create_connection((ip, port), timeout=deadline_seconds) as sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(request)
            while size <= MAX_RESPONSE_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            else:
                return None  # larger than any real /metrics: not a worker
    except (OSError, ValueError):
        return None
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = _STATUS_LINE.match(head)
    if not sep or status is None or status.group(1) != b"200":
        return None  # redirects included: they are never followed
    return body


def fetch_metrics(
    ip: str, port: int, *, deadline_seconds: float = FETCH_DEADLINE_SECONDS
) -> str | None:
    """The worker's /metrics text, fetched the same distrustful way; None when it fails."""
    body = _http_get(ip, port, "/metrics", deadline_seconds)
    return None if body is None else body.decode("utf-8", "replace")


def fetch_report(
    ip: str, port: int, *, deadline_seconds: float = FETCH_DEADLINE_SECONDS
) -> str | None:
    """GET http://ip:port/metrics and parse it; None when unreachable, slow or not 200."""
    body = _http_get(ip, port, "/metrics", deadline_seconds)
    if body is None:
        return None
    return primary_fingerprint(body.decode("utf-8", "replace"))


def probe_all(
    targets: Mapping[str, tuple[str, int]],
    probe: Callable[[str, int], str | None] = fetch_report,
    *,
    deadline_seconds: float = FETCH_DEADLINE_SECONDS,
    max_concurrent: int = MAX_CONCURRENT_PROBES,
) -> dict[str, str | None]:
    """Probe every ``name -> (ip, port)`` concurrently; the report of each, by one deadline.

    Returns when all probes answered or after ``deadline_seconds`` plus a
    short grace, whichever is first, however many pods there are: a probe
    still running or still queued behind ``max_concurrent`` then counts as
    None (the queued ones never start; ``fetch_report`` honours the same
    deadline itself, so a running one ends by then too).
    """
    if not targets:
        return {}
    reports: dict[str, str | None] = dict.fromkeys(targets)
    workers = max(1, min(max_concurrent, len(targets)))
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="patio-keyprobe")
    try:
        futures = {pool.submit(probe, ip, port): name for name, (ip, port) in targets.items()}
        done, _ = concurrent.futures.wait(futures, timeout=deadline_seconds + _GRACE_SECONDS)
        for future in done:
            exc = future.exception()
            reports[futures[future]] = None if exc is not None else future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return reports
