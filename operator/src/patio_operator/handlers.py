"""kopf glue: thin handlers that hand plain dicts to the Reconciler.

Handlers are registered on an explicit registry by `register()`, so the CLI
wires them to a configured Reconciler and nothing happens at import time.

- PatioCluster watch events: a full pass when the spec changed
  (generation != status.observedGeneration) or on the operator's initial
  listing (a restarted operator resumes every cluster at once).
- An index of every pod carrying the cluster label, plus a pod event
  handler: the peers file and status follow pods within a second.
- No kopf timers: kopf puts a finalizer on objects that have timers, and a
  PatioCluster deleted while the operator is down (or uninstalled together
  with it) would then hang forever. The periodic level-based pass lives in
  `resync.py`; cleanup is the garbage collector's job via owner references.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from patio_operator import names, peers
from patio_operator.reconciler import Reconciler

log = logging.getLogger("patio_operator")


def to_plain(value: Any) -> Any:
    """kopf bodies are read-only mapping views; the pure functions want dicts."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Attach every handler to `registry`."""

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        # An explicit registry gets none of kopf's default login handlers:
        # use the official client's config (in-cluster token or KUBECONFIG),
        # the same credentials the reconciler's own client uses.
        return kopf.login_via_client(**kwargs)

    def pods_for(index: Any, namespace: str, name: str) -> list[peers.PodView]:
        return list(index.get((namespace, name), []))

    @kopf.index(
        "v1", "pods", id="patio_pods", labels={names.CLUSTER_LABEL: kopf.PRESENT}, registry=registry
    )
    def patio_pods(**kwargs: Any) -> Any:
        key = (kwargs["namespace"], kwargs["labels"][names.CLUSTER_LABEL])
        return {key: peers.pod_view(to_plain(kwargs["body"]))}

    @kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, id="cluster_event", registry=registry)
    def cluster_event(**kwargs: Any) -> None:
        body = to_plain(kwargs["body"])
        meta = body.get("metadata") or {}
        kind = kwargs["event"].get("type")
        if kind == "DELETED":
            reconciler.forget(meta.get("namespace", ""), meta.get("name", ""))
            return
        if meta.get("deletionTimestamp"):
            return
        observed = (body.get("status") or {}).get("observedGeneration")
        if kind in (None, "ADDED") or observed != meta.get("generation"):
            pods = pods_for(kwargs["patio_pods"], meta["namespace"], meta["name"])
            reconciler.reconcile(body, pods)

    @kopf.on.event(
        "v1", "pods", id="pod_event", labels={names.CLUSTER_LABEL: kopf.PRESENT}, registry=registry
    )
    def pod_event(**kwargs: Any) -> None:
        namespace = kwargs["namespace"]
        cname = kwargs["labels"][names.CLUSTER_LABEL]
        cluster = reconciler.kube.get(names.API_VERSION, names.KIND, namespace, cname)
        if cluster is None or (cluster.get("metadata") or {}).get("deletionTimestamp"):
            return
        reconciler.pods_changed(cluster, pods_for(kwargs["patio_pods"], namespace, cname))
