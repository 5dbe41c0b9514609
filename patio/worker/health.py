"""The worker's HTTP endpoints: ``/livez``, ``/readyz`` and ``/metrics``.

A deliberately tiny HTTP/1.1 server on the worker's own event loop: one
request per connection, GET/HEAD only, bounded header size and read deadline.
Serving from the loop means ``/metrics`` reads the broker's counters without
locks (they are only ever touched on the loop) and a blocked loop shows up as
a probe timeout, which is exactly what a liveness probe should see.

- ``/livez``: the loop is responsive. A heartbeat task stamps the time every
  :data:`HEARTBEAT_INTERVAL`; if the last stamp is older than ``stale_after``
  (the loop was blocked, or the heartbeat task died) the answer is 503.
- ``/readyz``: listening, not draining, and the executor accepts calls; 503
  with the reason otherwise. Links to other members do not decide it (a
  member that lost its peers still serves its own calls, and on Kubernetes
  the last serving member must stay in its Service), unless
  ``--ready-peer-ratio`` asks for it. ``/readyz?verbose`` adds one line per
  check and every member that is not connected (docs/worker-contract.md).
- ``/metrics``: Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("patio.worker.health")

HEARTBEAT_INTERVAL = 0.5
DEFAULT_STALE_AFTER = 5.0
REQUEST_DEADLINE = 5.0  # a slow or idle client must not hold a connection open
MAX_REQUEST_HEAD = 8192  # enough for any probe or scraper; stops slowloris-style growth

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Heartbeat:
    """A task that stamps ``monotonic()`` every ``interval`` seconds."""

    def __init__(self, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.interval = interval
        self.last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.last = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="patio-heartbeat")

    async def _run(self) -> None:
        while True:
            self.last = time.monotonic()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check(self, stale_after: float) -> tuple[bool, str]:
        if self._task is None or self._task.done():
            return False, "heartbeat task is not running"
        age = time.monotonic() - self.last
        if age > stale_after:
            return False, f"event loop heartbeat is {age:.1f}s old (limit {stale_after:g}s)"
        return True, f"ok (heartbeat {age:.2f}s ago)"


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str
    details: tuple[str, ...] = ()  # shown by /readyz?verbose


def readiness(
    *,
    listening: bool,
    draining: bool,
    accepting: bool,
    known: int,
    connected: int,
    missing: tuple[str, ...] = (),
    ratio: float = 0.0,
    node_id: str = "",
) -> Readiness:
    """The /readyz rule, as a pure function (docs/worker-contract.md).

    Ready = listening, not draining, and an executor that accepts calls.
    Missing links are reported, not judged, unless ``ratio`` > 0 asks for
    at least that share of known members to be connected.
    """
    links = f"links to {connected} of {known} members"
    needed = math.ceil(known * ratio - 1e-9)
    checks = [
        ("listening", listening, "not listening yet"),
        ("not draining", not draining, "draining"),
        ("executor accepts calls", accepting, "the executor does not accept calls"),
    ]
    if ratio > 0:
        checks.append((
            f"at least {needed} of {known} members connected (--ready-peer-ratio {ratio:g})",
            connected >= needed,
            f"{links} (need {needed})",
        ))  # fmt: skip
    failed = [why for _, ok, why in checks if not ok]
    details = [f"node {node_id}"] if node_id else []
    details += [f"[{'+' if ok else '-'}] {name}" for name, ok, _ in checks]
    details.append(links)
    details += [f"missing: {member}" for member in missing]
    if failed:
        return Readiness(False, failed[0], tuple(details))
    return Readiness(True, f"ok ({links})", tuple(details))


class HealthServer:
    """Serves the three endpoints from callables the runtime provides."""

    def __init__(
        self,
        *,
        live: Callable[[], tuple[bool, str]],
        ready: Callable[[], Readiness],
        metrics: Callable[[], bytes],
    ) -> None:
        self._live = live
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            async with asyncio.timeout(REQUEST_DEADLINE):
                head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > MAX_REQUEST_HEAD:
                    return
                status, content_type, body, head_only = self._respond(head)
                writer.write(_response(status, content_type, body, head_only))
                await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
            asyncio.CancelledError,
        ):
            pass
        except Exception:
            log.exception("health endpoint failed")
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[int, str, bytes, bool]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) < 2:
            return 405, "text/plain", b"bad request\n", False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n", False
        status, content_type, body = self._page(*target.partition("?")[::2])
        return status, content_type, body, method == "HEAD"

    def _page(self, path: str, query: str) -> tuple[int, str, bytes]:
        if path == "/livez":
            ok, reason = self._live()
            return (200 if ok else 503), "text/plain", f"{reason}\n".encode()
        if path == "/readyz":
            state = self._ready()
            lines = [state.reason]
            if "verbose" in query.split("&"):
                lines += state.details
            body = "\n".join(lines) + "\n"
            return (200 if state.ready else 503), "text/plain", body.encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
        if path == "/":
            return 200, "text/plain", b"patio worker: /livez /readyz /metrics\n"
        return 404, "text/plain", b"not found: try /livez /readyz /metrics\n"


def _response(status: int, content_type: str, body: bytes, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body
