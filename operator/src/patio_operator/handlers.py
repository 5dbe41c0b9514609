"""kopf glue: thin handlers that hand plain dicts to the Reconciler.

Handlers are registered on an explicit registry by `register()`, so the CLI
decides intervals from its flags and tests can build a registry without
import-time side effects.

- PatioCluster watch events: a full pass when the spec changed
  (generation != status.observedGeneration) or on the operator's initial
  listing (a restart resumes every cluster).
- A timer every resync interval: the level-based safety net that repairs
  drift nobody told us about (deleted Secret, edited StatefulSet).
- A faster timer while a key rotation is in progress, so steps follow each
  other within seconds of being confirmed.
- An index of the cluster's pods plus a pod event handler: peers file and
  status follow pods within a second.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from patio_operator import names, peers
from patio_operator.reconciler import Reconciler

log = logging.getLogger("patio_operator")


def _emit(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(kopf.Body(cast(Any, dict(body))), type=type_, reason=reason, message=message[:1024])


def _rotating(**kwargs: Any) -> bool:
    status = kwargs.get("status") or {}
    return ((status.get("rotation") or {}).get("phase") or "Idle") != "Idle"


def _alive(**kwargs: Any) -> bool:
    return not (kwargs.get("meta") or {}).get("deletionTimestamp")


def _running(**kwargs: Any) -> bool:
    return _alive(**kwargs) and _rotating(**kwargs)


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Attach every handler to `registry`."""
    cfg = reconciler.config
    group, version, plural = names.GROUP, names.VERSION, names.PLURAL

    def _plain(body: Any) -> dict[str, Any]:
        return {k: _to_plain(v) for k, v in dict(body).items()}

    def pods_for(index: Any, namespace: str, name: str) -> list[peers.PodView]:
        return list(index.get((namespace, name), []))

    @kopf.index(
        "v1", "pods", id="patio_pods", labels={names.CLUSTER_LABEL: kopf.PRESENT}, registry=registry
    )
    def patio_pods(**kwargs: Any) -> Any:
        labels = kwargs["labels"]
        return {
            (kwargs["namespace"], labels[names.CLUSTER_LABEL]): peers.pod_view(
                _plain(kwargs["body"])
            )
        }

    @kopf.on.event(group, version, plural, id="cluster_event", registry=registry)
    def cluster_event(**kwargs: Any) -> None:
        body, patio_pods = kwargs["body"], kwargs["patio_pods"]
        kind = kwargs["event"].get("type")
        meta = body.get("metadata") or {}
        if kind == "DELETED":
            reconciler.forget(meta.get("namespace", ""), meta.get("name", ""))
            return
        if meta.get("deletionTimestamp"):
            return
        observed = (body.get("status") or {}).get("observedGeneration")
        if kind in (None, "ADDED") or observed != meta.get("generation"):
            reconciler.reconcile(
                _plain(body), pods_for(patio_pods, meta["namespace"], meta["name"])
            )

    @kopf.timer(
        group,
        version,
        plural,
        id="resync",
        interval=cfg.resync_seconds,
        when=_alive,
        registry=registry,
    )
    def resync(**kwargs: Any) -> None:
        body, patio_pods = kwargs["body"], kwargs["patio_pods"]
        meta = body["metadata"]
        reconciler.reconcile(_plain(body), pods_for(patio_pods, meta["namespace"], meta["name"]))

    @kopf.timer(
        group,
        version,
        plural,
        id="rotation",
        interval=cfg.rotation_tick_seconds,
        when=_running,
        registry=registry,
    )
    def rotation_tick(**kwargs: Any) -> None:
        body, patio_pods = kwargs["body"], kwargs["patio_pods"]
        meta = body["metadata"]
        reconciler.reconcile(_plain(body), pods_for(patio_pods, meta["namespace"], meta["name"]))

    @kopf.on.event(
        "v1", "pods", id="pod_event", labels={names.CLUSTER_LABEL: kopf.PRESENT}, registry=registry
    )
    def pod_event(**kwargs: Any) -> None:
        namespace, patio_pods = kwargs["namespace"], kwargs["patio_pods"]
        cname = kwargs["labels"][names.CLUSTER_LABEL]
        cluster = reconciler.kube.get(names.API_VERSION, names.KIND, namespace, cname)
        if cluster is None or (cluster.get("metadata") or {}).get("deletionTimestamp"):
            return
        reconciler.pods_changed(cluster, pods_for(patio_pods, namespace, cname))


def _to_plain(value: Any) -> Any:
    """kopf bodies are read-only mapping views; the pure functions want dicts."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value
