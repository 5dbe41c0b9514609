"""The operator's own Prometheus metrics.

Labels stay bounded: results are "ok"/"error", steps are the four rotation
phases; per-cluster readiness is aggregated into two gauges rather than one
series per cluster.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from patio_operator import rotation

RECONCILES = Counter(
    "patio_operator_reconcile_total", "Full reconcile passes, by result.", ["result"]
)
RECONCILE_SECONDS = Histogram(
    "patio_operator_reconcile_duration_seconds",
    "Duration of full reconcile passes, by result.",
    ["result"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PEERS_UPDATES = Counter(
    "patio_operator_peers_updates_total", "Times a peers ConfigMap was rewritten."
)
ROTATION_STEPS = Counter(
    "patio_operator_key_rotation_steps_total",
    "Key rotation steps written, by the phase entered.",
    ["step"],
)
AUTOSCALE_CHANGES = Counter(
    "patio_operator_autoscale_changes_total",
    "Replica changes the autoscaler wrote, by direction.",
    ["direction"],
)
LEADER = Gauge(
    "patio_operator_leader", "1 while this replica holds the leader Lease and reconciles."
)
CLUSTERS = Gauge("patio_operator_clusters", "PatioClusters this operator reconciles.")
CLUSTERS_READY = Gauge(
    "patio_operator_clusters_ready", "PatioClusters whose Ready condition is True."
)

# Every label value exists from the start, at 0: a rate() or an alert on
# result="error" then evaluates to 0 instead of to nothing before the first
# error, and dashboards show the series before the first rotation.
RESULTS = ("ok", "error")
for _result in RESULTS:
    RECONCILES.labels(result=_result)
    RECONCILE_SECONDS.labels(result=_result)
for _phase in rotation.PHASES:
    ROTATION_STEPS.labels(step=_phase)

_ready: dict[tuple[str, str], bool] = {}
_ready_lock = threading.Lock()


def observe_reconcile(result: str, seconds: float) -> None:
    RECONCILES.labels(result=result).inc()
    RECONCILE_SECONDS.labels(result=result).observe(seconds)


def set_cluster_ready(namespace: str, name: str, ready: bool) -> None:
    with _ready_lock:
        _ready[(namespace, name)] = ready
        _publish()


def forget_cluster(namespace: str, name: str) -> None:
    with _ready_lock:
        _ready.pop((namespace, name), None)
        _publish()


def _publish() -> None:
    CLUSTERS.set(len(_ready))
    CLUSTERS_READY.set(sum(_ready.values()))


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Expose /metrics on a background thread (0 disables)."""
    if port:
        start_http_server(port, addr=address)
