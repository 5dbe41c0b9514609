"""A small JSON client for the API server (used by the node agent).

The node agent works with plain dicts in the API's own camelCase, exactly
as pod specs are written, so it talks JSON over HTTPS itself rather than
going through the generated client's models.
"""

from __future__ import annotations

import json
import ssl
import threading
import urllib.parse
from http.client import HTTPSConnection
from typing import Any

from .pki import CertPair


class ApiError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class RestClient:
    """JSON over one keep-alive HTTPS connection per thread."""

    def __init__(self, server: str, ca: str, client: CertPair, timeout: float = 10.0) -> None:
        parsed = urllib.parse.urlsplit(server)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443
        self.timeout = timeout
        self._ctx = ssl.create_default_context(cafile=ca)
        self._ctx.load_cert_chain(str(client.cert), str(client.key))
        self._local = threading.local()

    def _conn(self) -> HTTPSConnection:
        conn: HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = HTTPSConnection(self.host, self.port, context=self._ctx, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn: HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(2):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, ConnectionError) as exc:
                self.close()
                if attempt == 1:
                    raise ApiError(0, method, path, str(exc)) from exc
                continue
            if resp.status >= 400:
                raise ApiError(resp.status, method, path, raw.decode(errors="replace"))
            return json.loads(raw) if raw else None
        raise AssertionError("unreachable")

    def get(self, path: str, **params: str) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str, body: Any = None) -> Any:
        return self.request("DELETE", path, body)

    def get_or_none(self, path: str) -> Any:
        try:
            return self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
