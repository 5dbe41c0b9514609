"""Parsing a worker's /metrics, and which clusters the periodic pass visits."""

from __future__ import annotations

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
