"""Parsing a worker's /metrics, and which clusters the periodic pass visits."""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from operator_factories import cluster
from patio_operator import keyprobe, resync

METRICS = """\
# HELP patio_auth_keys_info Always 1; primary is the fingerprint of the key set in use.
# TYPE patio_auth_keys_info gauge
patio_auth_keys_info{primary="0a1b2c3d4e5f"} 1.0
patio_auth_keys_info_other{primary="nope"} 1.0
"""


def test_primary_fingerprint_is_read_from_the_gauge() -> None:
    assert keyprobe.primary_fingerprint(METRICS) == "0a1b2c3d4e5f"
    assert keyprobe.primary_fingerprint("patio_calls_total 3\n") is None
    assert keyprobe.primary_fingerprint('patio_auth_keys_info{primary="x"} 0\n') is None


def test_fetch_from_nowhere_is_no_report() -> None:
    # Port 9 on a loopback address nobody listens on: refused at once.
    assert keyprobe.fetch_report("127.0.0.1", 9) is None


OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" + METRICS.encode()
)


@contextmanager
def http_server(respond: Callable[[socketserver.BaseRequestHandler], None]) -> Iterator[int]:
    """A real threaded HTTP server on loopback; yields its port, stops it after."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)  # the request head (small, one segment on loopback)
            respond(self)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def answer_ok(handler: socketserver.BaseRequestHandler) -> None:
    handler.request.sendall(OK_RESPONSE)


def trickle(handler: socketserver.BaseRequestHandler) -> None:
    # A status line and then one byte every 0.2 s for up to 15 s: each read
    # succeeds well inside any per-read timeout.
    try:
        handler.request.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(75):
            time.sleep(0.2)
            handler.request.sendall(b"X")
    except OSError:
        pass  # the probe gave up and closed: what we want


def test_fetch_reads_a_real_worker_like_answer() -> None:
    with http_server(answer_ok) as port:
        assert keyprobe.fetch_report("127.0.0.1", port) == "0a1b2c3d4e5f"


def test_fetch_never_follows_a_redirect() -> None:
    # Issue 16 item 8: urllib followed redirects, so a worker pod could make
    # the operator send a GET to any address it named.
    hits: list[int] = []

    def count(handler: socketserver.BaseRequestHandler) -> None:
        hits.append(1)
        answer_ok(handler)

    with http_server(count) as elsewhere:

        def redirect(handler: socketserver.BaseRequestHandler) -> None:
            handler.request.sendall(
                b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/metrics\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n" % elsewhere
            )

        with http_server(redirect) as port:
            assert keyprobe.fetch_report("127.0.0.1", port) is None
    assert hits == []


def test_a_trickling_answer_is_cut_at_the_total_deadline() -> None:
    # Issue 16 item 8: the 2 s timeout applied per read, so one byte every
    # 1.5 s held the probe for as long as the worker liked.
    with http_server(trickle) as port:
        started = time.monotonic()
        assert keyprobe.fetch_report("127.0.0.1", port, deadline_seconds=1.0) is None
        elapsed = time.monotonic() - started
    assert elapsed < 4  # generous "did not hang" bound; the deadline is 1 s


def test_probes_run_concurrently_and_return_by_one_deadline() -> None:
    # Thirty tricklers and one healthy worker: serially this would take 30
    # deadlines; concurrently and bounded it returns after about one. (Probes
    # queued behind the bound when the deadline passes count as no report.)
    with http_server(trickle) as slow, http_server(answer_ok) as good:
        targets = {"good": ("127.0.0.1", good)}
        targets.update({f"slow-{i}": ("127.0.0.1", slow) for i in range(30)})
        probe = lambda ip, port: keyprobe.fetch_report(ip, port, deadline_seconds=1.0)  # noqa: E731
        started = time.monotonic()
        reports = keyprobe.probe_all(targets, probe, deadline_seconds=1.0, max_concurrent=8)
        elapsed = time.monotonic() - started
    assert reports["good"] == "0a1b2c3d4e5f"
    assert all(reports[f"slow-{i}"] is None for i in range(30))
    assert set(reports) == set(targets)
    assert elapsed < 6  # generous "did not hang" bound; serially it would be 30 s


def test_a_probe_that_raises_is_no_report() -> None:
    def broken(ip: str, port: int) -> str | None:
        raise RuntimeError("boom")

    assert keyprobe.probe_all({"a": ("127.0.0.1", 1)}, broken) == {"a": None}
    assert keyprobe.probe_all({}, broken) == {}


def test_resync_due() -> None:
    c = cluster()
    assert resync.due(c, None, 100.0, 30.0)
    assert not resync.due(c, 90.0, 100.0, 30.0)
    assert resync.due(c, 60.0, 100.0, 30.0)
    rotating = cluster()
    rotating["status"] = {"rotation": {"phase": "Presenting"}}
    assert resync.due(rotating, 99.0, 100.0, 30.0)
    deleting = cluster()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not resync.due(deleting, None, 100.0, 30.0)
