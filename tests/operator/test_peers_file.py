"""pods -> peers file (pure)."""

from __future__ import annotations

from operator_factories import pod
from patio_operator import peers


def test_pod_view_reads_ip_readiness_and_failures() -> None:
    v = peers.pod_view(pod("w-0", "10.0.0.5", ready=True))
    assert (v.name, v.ip, v.ready, v.terminating, v.failure) == ("w-0", "10.0.0.5", True, False, "")
    crashing = peers.pod_view(pod("w-1", "10.0.0.6", waiting="CrashLoopBackOff"))
    assert crashing.failure == "worker: CrashLoopBackOff"
    assert crashing.restarts == 4
    failed = peers.pod_view(pod("w-2", phase="Failed"))
    assert failed.failure.startswith("pod Failed")


def test_not_ready_pods_are_peers_but_terminating_and_ipless_are_not() -> None:
    views = [
        peers.pod_view(pod("a", "10.0.0.2", ready=True)),
        peers.pod_view(pod("b", "10.0.0.1", ready=False)),  # must be listed: readiness needs peers
        peers.pod_view(pod("c", "10.0.0.3", deleting=True)),
        peers.pod_view(pod("d")),  # no IP yet
        peers.pod_view(pod("e", "10.0.0.4", phase="Succeeded")),
    ]
    assert peers.peer_addresses(views, 15383) == ["10.0.0.1:15383", "10.0.0.2:15383"]


def test_render_is_stable_and_parses_back() -> None:
    text = peers.render(["10.0.0.1:1", "10.0.0.2:1"])
    assert text.startswith("#")
    assert peers.parse(text) == ["10.0.0.1:1", "10.0.0.2:1"]
    assert peers.render(["10.0.0.1:1", "10.0.0.2:1"]) == text


def test_ipv6_addresses_are_bracketed() -> None:
    assert peers.address("fd00::1", 15383) == "[fd00::1]:15383"
    assert peers.address("10.1.2.3", 15383) == "10.1.2.3:15383"


def test_duplicate_ips_are_listed_once() -> None:
    views = [peers.pod_view(pod("a", "10.0.0.1")), peers.pod_view(pod("b", "10.0.0.1"))]
    assert peers.peer_addresses(views, 1) == ["10.0.0.1:1"]
