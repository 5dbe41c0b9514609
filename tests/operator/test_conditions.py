"""observed objects -> status and conditions (pure)."""

from __future__ import annotations

from typing import Any

from operator_factories import cluster, pod
from patio_operator import peers, status

NOW = "2026-11-25T12:00:00Z"
LATER = "2026-11-25T12:05:00Z"


def sts(
    replicas: int = 3, ready: int = 3, *, rolling: bool = False, gen: int = 2
) -> dict[str, Any]:
    return {
        "metadata": {"generation": gen},
        "status": {
            "observedGeneration": gen,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas,
            "currentRevision": "r1",
            "updateRevision": "r2" if rolling else "r1",
        },
    }


def views(n: int, ready: int, **kw: Any) -> list[peers.PodView]:
    return [
        peers.pod_view(pod(f"demo-{i}", f"10.0.0.{i + 1}", ready=i < ready, **kw)) for i in range(n)
    ]


def observe(
    pods: list[peers.PodView], published: list[str] | None = None, **kw: Any
) -> status.Observed:
    expected = peers.peer_addresses(pods, 15383)
    return status.Observed(
        statefulset=kw.pop("sts", sts()),
        pods=pods,
        published_peers=expected if published is None else published,
        expected_peers=expected,
        **kw,
    )


def conds(st: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


def test_healthy_cluster() -> None:
    st = status.compute_status(cluster(), observe(views(3, 3), key_generation=2), {}, NOW)
    assert conds(st) == {
        "Ready": ("True", "AllWorkersReady"),
        "Progressing": ("False", "Stable"),
        "Degraded": ("False", "AsExpected"),
        "MeshReady": ("True", "PeersPublished"),
    }
    assert st["readyReplicas"] == 3 and st["replicas"] == 3 and st["peers"] == 3
    assert st["selector"] == "patio.dev/cluster=demo"
    assert st["observedGeneration"] == 4
    assert st["keyGeneration"] == 2
    assert all(c["observedGeneration"] == 4 for c in st["conditions"])


def test_starting_cluster_is_progressing_and_not_ready() -> None:
    st = status.compute_status(cluster(), observe(views(1, 0), sts=None), {}, NOW)
    c = conds(st)
    assert c["Ready"] == ("False", "WorkersNotReady")
    assert c["Progressing"] == ("True", "Creating")
    assert c["MeshReady"][0] == "False"


def test_rolling_update_and_scaling_are_progressing() -> None:
    st = status.compute_status(cluster(), observe(views(3, 3), sts=sts(rolling=True)), {}, NOW)
    assert conds(st)["Progressing"] == ("True", "RollingUpdate")
    st = status.compute_status(cluster(replicas=5), observe(views(3, 3)), {}, NOW)
    assert conds(st)["Progressing"] == ("True", "ScalingUp")
    assert conds(st)["Ready"] == ("False", "WorkersNotReady")
    st = status.compute_status(cluster(replicas=1), observe(views(3, 3)), {}, NOW)
    assert conds(st)["Progressing"] == ("True", "ScalingDown")


def test_workers_on_their_way_to_ready_are_progressing_not_degraded() -> None:
    st = status.compute_status(cluster(), observe(views(3, 1)), {}, NOW)
    assert conds(st)["Progressing"] == ("True", "StartingWorkers")
    assert conds(st)["Degraded"] == ("False", "AsExpected")


def test_rotation_in_progress_is_progressing() -> None:
    st = status.compute_status(cluster(), observe(views(3, 3), rotation_phase="Accepting"), {}, NOW)
    assert conds(st)["Progressing"] == ("True", "RotatingKey")
    assert st["rotation"]["phase"] == "Accepting"


def test_crashing_pods_and_reconcile_problems_are_degraded() -> None:
    st = status.compute_status(cluster(), observe(views(3, 2, waiting="CrashLoopBackOff")), {}, NOW)
    assert conds(st)["Degraded"] == ("True", "WorkerFailures")
    assert "CrashLoopBackOff" in st["conditions"][2]["message"]
    st = status.compute_status(
        cluster(), observe(views(3, 3), problems=["secret missing"]), {}, NOW
    )
    assert conds(st)["Degraded"] == ("True", "ReconcileError")


def test_stale_peers_file_is_not_mesh_ready() -> None:
    st = status.compute_status(
        cluster(), observe(views(3, 3), published=["10.0.0.1:15383"]), {}, NOW
    )
    assert conds(st)["MeshReady"] == ("False", "PeersStale")
    assert st["peers"] == 1


def test_scaled_to_zero() -> None:
    st = status.compute_status(cluster(replicas=0), observe([], sts=sts(0, 0)), {}, NOW)
    assert conds(st)["Ready"] == ("False", "ScaledToZero")
    assert conds(st)["MeshReady"] == ("False", "NoWorkers")


def test_transition_time_moves_only_when_status_flips() -> None:
    first = status.compute_status(cluster(), observe(views(3, 3)), {}, NOW)
    same = status.compute_status(cluster(), observe(views(3, 3)), first, LATER)
    assert same == first  # nothing changed: no status write, no event
    flipped = status.compute_status(cluster(), observe(views(3, 1)), first, LATER)
    ready = status.condition(flipped, "Ready")
    assert ready is not None and ready["lastTransitionTime"] == LATER
    degraded = status.condition(flipped, "Degraded")
    assert degraded is not None and degraded["lastTransitionTime"] == NOW
    flips = [t[0] for t in status.transitions(first, flipped)]
    assert flips == ["Ready", "Progressing", "MeshReady"]


def test_autoscaling_status_is_removed_when_autoscaling_is_turned_off() -> None:
    previous = {"autoscaling": {"desiredReplicas": 5}}
    off = status.compute_status(cluster(), observe(views(3, 3)), previous, NOW)
    assert "autoscaling" in off and off["autoscaling"] is None
    on = cluster(autoscaling={"enabled": True, "maxReplicas": 5})
    kept = status.compute_status(on, observe(views(3, 3)), previous, NOW)
    assert "autoscaling" not in kept  # the autoscaler writes it itself
