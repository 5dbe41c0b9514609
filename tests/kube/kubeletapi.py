"""The one kubelet endpoint the tests need: container logs over HTTPS, so
that ``kubectl logs`` (API server -> node) works against the test node."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .pki import CertPair

MARK = "[patio-node]"
# (namespace, pod, container) -> (log file, is the container still there)
Resolver = Callable[[str, str, str], tuple[Path, Callable[[], bool]] | None]


def _visible(line: bytes) -> bool:
    return not line.startswith(MARK.encode())


class KubeletServer:
    def __init__(self, cert: CertPair, resolve: Resolver, host: str = "127.0.0.1") -> None:
        self.resolve = resolve
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer._handle(self)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="patio-kubelet-api", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(req.path)
        parts = url.path.strip("/").split("/")
        query = urllib.parse.parse_qs(url.query)
        if len(parts) == 2 and parts[0] == "healthz":
            parts = ["healthz"]
        if parts == ["healthz"]:
            self._send(req, 200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._send(req, 404, b"only /containerLogs/{namespace}/{pod}/{container} is served")
            return
        found = self.resolve(parts[1], parts[2], parts[3])
        if found is None:
            self._send(req, 404, f"container {parts[3]} of pod {parts[2]} not found".encode())
            return
        path, alive = found
        try:
            lines = [li for li in path.read_bytes().splitlines(keepends=True) if _visible(li)]
        except FileNotFoundError:
            lines = []
        tail = query.get("tailLines")
        if tail:
            lines = lines[-int(tail[0]) :] if int(tail[0]) > 0 else []
        follow = query.get("follow", ["false"])[0] == "true"
        req.send_response(200)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        try:
            self._chunk(req, b"".join(lines))
            if follow:
                self._follow(req, path, alive)
            req.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            req.close_connection = True

    def _follow(self, req: BaseHTTPRequestHandler, path: Path, alive: Callable[[], bool]) -> None:
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            f.seek(0, 2)
            pending = b""
            while not self._stopping.is_set():
                data = f.read()
                if data:
                    pending += data
                    *complete, pending = pending.split(b"\n")
                    out = b"".join(li + b"\n" for li in complete if _visible(li))
                    self._chunk(req, out)
                elif not alive():
                    return
                else:
                    time.sleep(0.2)

    @staticmethod
    def _chunk(req: BaseHTTPRequestHandler, data: bytes) -> None:
        if data:
            req.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            req.wfile.flush()

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        req.send_response(code)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
