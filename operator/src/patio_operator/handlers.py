"""kopf glue: thin handlers that hand plain dicts to the Reconciler.

Handlers are registered on an explicit registry by `register()`, so the CLI
wires them to a configured Reconciler and nothing happens at import time.

- PatioCluster watch events: a full pass when the spec changed
  (generation != status.observedGeneration) or on the operator's initial
  listing (a restarted operator resumes every cluster at once).
- Events of every pod carrying the cluster label: the peers file and status
  follow pods within a second. Handlers pass only names; the Reconciler
  re-reads everything under a per-cluster lock, so a queued event never
  acts on a stale body.
- Errors: kopf never retries `on.event` handlers, so a failure is handed
  to `Reconciler.failed`, which posts a Warning Event and makes the resync
  loop retry the cluster with exponential backoff.
- No kopf timers: kopf puts a finalizer on objects that have timers, and a
  PatioCluster deleted while the operator is down (or uninstalled together
  with it) would then hang forever. The periodic level-based pass lives in
  `resync.py`; cleanup is the garbage collector's job via owner references.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from patio_operator import names
from patio_operator.reconciler import Reconciler

log = logging.getLogger("patio_operator")


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Attach every handler to `registry`."""

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        # An explicit registry gets none of kopf's default login handlers:
        # use the official client's config (in-cluster token or KUBECONFIG),
        # the same credentials the reconciler's own client uses.
        return kopf.login_via_client(**kwargs)

    @kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, id="cluster_event", registry=registry)
    def cluster_event(**kwargs: Any) -> None:
        body = kwargs["body"]
        meta = body.get("metadata") or {}
        if kwargs["event"].get("type") == "DELETED":
            reconciler.forget(meta.get("namespace", ""), meta.get("name", ""))
            return
        if meta.get("deletionTimestamp"):
            return
        observed = (body.get("status") or {}).get("observedGeneration")
        # Our own status writes come back as events: only a new generation
        # (spec change, /scale) or the operator's initial listing needs a pass.
        if kwargs["event"].get("type") in (None, "ADDED") or observed != meta.get("generation"):
            try:
                reconciler.reconcile(meta["namespace"], meta["name"])
            except Exception:
                # Already recorded (Event + backoff retry by the resync loop).
                log.warning(
                    "reconcile of %s/%s failed; retrying with backoff",
                    meta["namespace"],
                    meta["name"],
                    exc_info=True,
                )

    @kopf.on.event(
        "v1", "pods", id="pod_event", labels={names.CLUSTER_LABEL: kopf.PRESENT}, registry=registry
    )
    def pod_event(**kwargs: Any) -> None:
        namespace, name = kwargs["namespace"], kwargs["labels"][names.CLUSTER_LABEL]
        try:
            reconciler.pods_changed(namespace, name)
        except Exception as exc:
            log.warning(
                "pod update of %s/%s failed; retrying with backoff", namespace, name, exc_info=True
            )
            reconciler.failed(namespace, name, exc)
