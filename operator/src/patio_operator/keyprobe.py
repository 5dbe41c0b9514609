"""Reading the key a worker presents, from its /metrics endpoint.

Parsing is a pure function over the Prometheus text format; the fetch is a
plain blocking HTTP GET with a short timeout (the reconciler runs in kopf's
thread pool, and an unreachable worker must not stall a rotation step for
long: it simply counts as "no report yet").
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

METRIC = "patio_auth_keys_info"
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
FETCH_TIMEOUT_SECONDS = 2.0


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


def fetch_report(ip: str, port: int) -> str | None:
    """GET http://ip:port/metrics and parse it; None when unreachable."""
    host = f"[{ip}]" if ":" in ip else ip
    try:
        with urllib.request.urlopen(
            f"http://{host}:{port}/metrics", timeout=FETCH_TIMEOUT_SECONDS
        ) as resp:
            text = resp.read(4 * 1024 * 1024).decode("utf-8", "replace")
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return primary_fingerprint(text)
