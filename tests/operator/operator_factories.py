"""Plain-dict builders shared by the operator's unit tests."""

from __future__ import annotations

import copy
from typing import Any

Obj = dict[str, Any]

CLUSTER: Obj = {
    "apiVersion": "patio.dev/v1alpha1",
    "kind": "PatioCluster",
    "metadata": {"name": "demo", "namespace": "ns1", "uid": "uid-1", "generation": 4},
    "spec": {"registry": "tasks:rpc", "replicas": 3},
}


def cluster(**spec: Any) -> Obj:
    out = copy.deepcopy(CLUSTER)
    out["spec"].update(spec)
    return out


def pod(
    name: str,
    ip: str = "",
    *,
    ready: bool = False,
    phase: str = "Running",
    deleting: bool = False,
    waiting: str = "",
) -> Obj:
    meta: Obj = {"name": name, "labels": {"patio.dev/cluster": "demo"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    cs: Obj = {"name": "worker", "restartCount": 0, "state": {"running": {}}}
    if waiting:
        cs = {"name": "worker", "restartCount": 4, "state": {"waiting": {"reason": waiting}}}
    status: Obj = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [cs],
    }
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}
