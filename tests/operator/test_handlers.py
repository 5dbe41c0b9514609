"""The kopf glue: which handlers exist, and that none of them needs a finalizer."""

from __future__ import annotations

from typing import Any

import kopf
from patio_operator import desired, handlers
from patio_operator.reconciler import Config, Reconciler


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def reconcile(self, namespace: str, name: str) -> None:
        self.calls.append(("reconcile", namespace, name))

    def pods_changed(self, namespace: str, name: str) -> None:
        self.calls.append(("pods", namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        self.calls.append(("forget", namespace, name))


def registry_with(recorder: Any) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, recorder)
    return registry


def watcher(registry: kopf.OperatorRegistry, handler_id: str) -> Any:
    for h in registry._watching.get_all_handlers():
        if h.id == handler_id:
            return h.fn
    raise AssertionError(f"no handler {handler_id}")


def test_no_timer_daemon_or_change_handler_so_no_finalizer() -> None:
    """A finalizer would make deleting a cluster hang while the operator is down."""
    reg = registry_with(Reconciler(None, Config(desired.Settings("img")), print))  # type: ignore[arg-type]
    assert list(reg._spawning.get_all_handlers()) == []
    assert list(reg._changing.get_all_handlers()) == []
    ids = sorted(h.id for h in reg._watching.get_all_handlers())
    assert ids == ["cluster_event", "pod_event"]


def body(generation: int, observed: int | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "c", "namespace": "n", "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {} if observed is None else {"observedGeneration": observed}
    return {"metadata": meta, "status": status}


def test_cluster_events_reconcile_only_new_generations_and_the_initial_listing() -> None:
    rec = Recorder()
    fn = watcher(registry_with(rec), "cluster_event")
    fn(event={"type": None}, body=body(3, 3))  # operator (re)start: listing
    fn(event={"type": "ADDED"}, body=body(1, None))
    fn(event={"type": "MODIFIED"}, body=body(4, 3))  # spec changed
    fn(event={"type": "MODIFIED"}, body=body(4, 4))  # our own status write: skip
    fn(event={"type": "MODIFIED"}, body=body(5, 4, deleting=True))
    fn(event={"type": "DELETED"}, body=body(5, 4))
    assert rec.calls == [
        ("reconcile", "n", "c"),
        ("reconcile", "n", "c"),
        ("reconcile", "n", "c"),
        ("forget", "n", "c"),
    ]


def test_pod_events_refresh_their_cluster_by_label() -> None:
    rec = Recorder()
    fn = watcher(registry_with(rec), "pod_event")
    fn(namespace="n", labels={"patio.dev/cluster": "c"})
    assert rec.calls == [("pods", "n", "c")]
