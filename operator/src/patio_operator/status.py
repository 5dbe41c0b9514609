"""Observed objects -> PatioCluster status, as pure functions.

Status is computed from what the API server says about the StatefulSet and
the pods, never from what the operator last did, so it stays true after an
operator restart, a hand edit or a killed pod. Conditions follow the
Kubernetes conventions: a transition time that only moves when the status
flips, and the generation each condition was computed for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from patio_operator import autoscale, names
from patio_operator.desired import spec_of
from patio_operator.peers import PodView, is_peer

Obj = dict[str, Any]

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "MeshReady")


@dataclass(frozen=True)
class Observed:
    """What one reconcile pass saw; all fields come from the API server."""

    statefulset: Mapping[str, Any] | None
    pods: Sequence[PodView]
    #: Addresses in the peers ConfigMap as it is now.
    published_peers: Sequence[str]
    #: Addresses the peers file should list for the current pods.
    expected_peers: Sequence[str]
    rotation_phase: str = "Idle"
    rotation_token: str = ""
    rotation_since: str = ""
    key_generation: int = 0
    #: Problems the reconciler hit (missing Secret, rejected object...).
    problems: Sequence[str] = field(default_factory=tuple)


def set_condition(
    previous: Sequence[Mapping[str, Any]],
    *,
    ctype: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> Obj:
    """One condition, keeping lastTransitionTime when the status did not flip."""
    text = "True" if status else "False"
    since = now
    for old in previous:
        if old.get("type") == ctype and old.get("status") == text and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
    return {
        "type": ctype,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def _rolling(sts: Mapping[str, Any]) -> bool:
    st = sts.get("status") or {}
    gen = int((sts.get("metadata") or {}).get("generation") or 0)
    if int(st.get("observedGeneration") or 0) < gen:
        return True
    update_rev = st.get("updateRevision")
    if update_rev and st.get("currentRevision") != update_rev:
        return True
    return int(st.get("updatedReplicas") or 0) < int(st.get("replicas") or 0)


def compute_status(
    cluster: Mapping[str, Any], observed: Observed, previous: Mapping[str, Any], now: str
) -> Obj:
    """The whole status subresource for one cluster."""
    spec = spec_of(dict(cluster))
    meta = cluster.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    cname = str(meta.get("name", ""))
    desired = int(spec["replicas"])
    prev_conditions = list(previous.get("conditions") or [])
    live = [p for p in observed.pods if not p.terminating]
    ready = sum(1 for p in live if p.ready)
    sts = observed.statefulset
    replicas = int(((sts or {}).get("status") or {}).get("replicas") or 0) if sts else len(live)

    def cond(ctype: str, status: bool, reason: str, message: str) -> Obj:
        return set_condition(
            prev_conditions,
            ctype=ctype,
            status=status,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        )

    # Ready: every desired worker passes its readiness probe (which itself
    # requires connections to enough peers).
    if desired == 0:
        ready_c = cond("Ready", False, "ScaledToZero", "spec.replicas is 0")
    elif ready >= desired:
        ready_c = cond("Ready", True, "AllWorkersReady", f"{ready}/{desired} workers ready")
    else:
        ready_c = cond("Ready", False, "WorkersNotReady", f"{ready}/{desired} workers ready")

    failures = [f"{p.name} ({p.failure})" for p in observed.pods if p.failure]

    # Progressing: the cluster is moving towards its spec.
    if sts is None:
        prog_c = cond("Progressing", True, "Creating", "the StatefulSet does not exist yet")
    elif _rolling(sts):
        prog_c = cond(
            "Progressing", True, "RollingUpdate", "workers are being replaced with the new template"
        )
    elif len(live) < desired:
        prog_c = cond("Progressing", True, "ScalingUp", f"{len(live)} of {desired} workers exist")
    elif len(observed.pods) > desired:
        prog_c = cond(
            "Progressing", True, "ScalingDown", f"{len(observed.pods)} workers, {desired} desired"
        )
    elif ready < desired and not failures:
        prog_c = cond(
            "Progressing", True, "StartingWorkers", f"{ready}/{desired} workers ready so far"
        )
    elif observed.rotation_phase not in ("", "Idle"):
        prog_c = cond(
            "Progressing", True, "RotatingKey", f"key rotation step {observed.rotation_phase}"
        )
    else:
        prog_c = cond("Progressing", False, "Stable", "the cluster matches its spec")

    # Degraded: something needs a human (crashing pods, an unusable spec).
    if observed.problems:
        deg_c = cond("Degraded", True, "ReconcileError", "; ".join(observed.problems))
    elif failures:
        deg_c = cond("Degraded", True, "WorkerFailures", "; ".join(sorted(failures)))
    else:
        deg_c = cond("Degraded", False, "AsExpected", "no worker is failing")

    # MeshReady: the published membership is current and every listed
    # worker is ready (readiness means it reached its peers).
    published = set(observed.published_peers)
    expected = set(observed.expected_peers)
    members = [p for p in observed.pods if is_peer(p)]
    if desired == 0 or not expected:
        mesh_c = cond("MeshReady", False, "NoWorkers", "no worker has an address yet")
    elif published != expected:
        mesh_c = cond(
            "MeshReady",
            False,
            "PeersStale",
            f"peers file lists {len(published)} addresses, {len(expected)} workers have one",
        )
    elif not all(p.ready for p in members) or len(members) < desired:
        mesh_c = cond(
            "MeshReady",
            False,
            "WorkersNotConnected",
            f"{sum(p.ready for p in members)}/{desired} listed workers report ready",
        )
    else:
        mesh_c = cond(
            "MeshReady", True, "PeersPublished", f"{len(expected)} peers published and connected"
        )

    status: Obj = {
        "observedGeneration": generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "peers": len(published),
        "selector": names.selector_string(cname),
        "keyGeneration": observed.key_generation,
        "conditions": [ready_c, prog_c, deg_c, mesh_c],
    }
    rotation: Obj = {"phase": observed.rotation_phase or "Idle"}
    if observed.rotation_token:
        rotation["token"] = observed.rotation_token
    if observed.rotation_since:
        rotation["since"] = observed.rotation_since
    status["rotation"] = rotation
    if previous.get("autoscaling") and autoscale.policy_of(spec) is None:
        # Autoscaling was turned off: its last decision no longer describes
        # anything (null deletes the field in the merge patch).
        status["autoscaling"] = None
    return status


def condition(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    """Look a condition up by type."""
    for c in status.get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


def transitions(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> list[tuple[str, str, str, str]]:
    """(type, status, reason, message) of every condition whose status flipped; for Events."""
    out = []
    for c in after.get("conditions") or []:
        old = condition(before, c["type"])
        if old is None or old.get("status") != c["status"]:
            out.append((c["type"], c["status"], c.get("reason", ""), c.get("message", "")))
    return out
