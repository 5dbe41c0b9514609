"""Prometheus metrics of a worker, read from the broker at scrape time.

The broker keeps plain integer counters (``patio.stats.BrokerStats``) because
that is the cheapest thing a hot path can do; :class:`BrokerCollector` turns
them into metric families only when Prometheus scrapes. Durations need
histograms, so :class:`WorkerMetrics` installs the two observer callbacks the
broker calls once per finished call / per started execution.

Labels are bounded: task names (capped, see :data:`MAX_TASK_LABELS`), sides,
outcomes and reasons. Never call ids, peers' ports or arguments.
docs/metrics.md lists every metric; keep the two in step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from patio.stats import SIDE_CALLER, SIDE_EXECUTOR, BrokerStats

# A remote caller can send any task name; counting each under its own label
# would let one buggy client grow our memory and Prometheus' without bound.
MAX_TASK_LABELS = 200
OTHER_TASK = "__other__"
_CHILD_CACHE_LIMIT = 4 * MAX_TASK_LABELS

# Seconds. RPC calls on one host take ~100 µs; tasks can take minutes.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class BrokerView(Protocol):
    """What the metrics and health layers read from a broker (docs/broker-api.md)."""

    @property
    def stats(self) -> BrokerStats: ...
    @property
    def node_id(self) -> str: ...
    @property
    def draining(self) -> bool: ...
    @property
    def key_fingerprint(self) -> str: ...
    @property
    def listening(self) -> Any: ...
    def peers(self) -> Any: ...
    def membership_links(self) -> tuple[int, int, list[tuple[str, str]]]: ...


class TaskLabels:
    """Maps task names to label values, folding names past the cap into one."""

    def __init__(self, limit: int = MAX_TASK_LABELS) -> None:
        self.limit = limit
        self._known: set[str] = set()

    def __call__(self, task: str) -> str:
        if task in self._known:
            return task
        if len(self._known) >= self.limit:
            return OTHER_TASK
        self._known.add(task)
        return task


def executor_load(executor: object) -> tuple[float | None, float | None]:
    """(busy, capacity) of an executor, or None where it does not say.

    Executors are written elsewhere; read the attributes they are likely to
    expose without requiring any of them.
    """
    busy = capacity = None
    for name in ("busy", "active", "running", "in_flight"):
        value = getattr(executor, name, None)
        if callable(value):
            value = value()
        if isinstance(value, int | float) and not isinstance(value, bool):
            busy = float(value)
            break
    for name in ("capacity", "max_workers", "concurrency"):
        value = getattr(executor, name, None)
        if callable(value):
            value = value()
        if isinstance(value, int | float) and not isinstance(value, bool):
            capacity = float(value)
            break
    return busy, capacity


class BrokerCollector(Collector):
    """Reads a broker's counters and state each time Prometheus scrapes."""

    def __init__(
        self,
        broker: BrokerView,
        *,
        version: str,
        executor: object | None = None,
        task_label: Callable[[str], str] | None = None,
    ) -> None:
        self.broker = broker
        self.version = version
        self.executor = executor
        self.task_label = task_label if task_label is not None else TaskLabels()

    def collect(self) -> Iterator[Metric]:
        yield from self._calls()
        yield from self._peers()
        yield from self._connection_counters()
        yield from self._identity()

    def _calls(self) -> Iterator[Metric]:
        """Calls by task, side and outcome, and the executor's load."""
        stats = self.broker.stats
        label = self.task_label

        started = CounterMetricFamily(
            "patio_calls_started",
            "Calls started, by task and side (caller or executor).",
            labels=["task", "side"],
        )
        for (task, side), count in _summed(stats.calls_started.items(), label, 0):
            started.add_metric([task, side], count)
        yield started

        finished = CounterMetricFamily(
            "patio_calls_finished",
            "Calls finished, by task, side and outcome.",
            labels=["task", "side", "outcome"],
        )
        for (task, side, outcome), count in _summed(stats.calls_finished.items(), label, 0):
            finished.add_metric([task, side, outcome], count)
        yield finished

        in_flight = GaugeMetricFamily(
            "patio_calls_in_flight",
            "Calls started and not finished yet, by side.",
            labels=["side"],
        )
        per_side = {SIDE_CALLER: 0, SIDE_EXECUTOR: 0}
        for (_, side), count in stats.calls_started.items():
            per_side[side] = per_side.get(side, 0) + count
        for (_, side, _), count in stats.calls_finished.items():
            per_side[side] = per_side.get(side, 0) - count
        for side, count in sorted(per_side.items()):
            in_flight.add_metric([side], max(count, 0))
        yield in_flight

        busy, capacity = executor_load(self.executor) if self.executor is not None else (None, None)
        if busy is None:
            busy = float(max(per_side.get(SIDE_EXECUTOR, 0), 0))
        yield GaugeMetricFamily(
            "patio_executor_busy",
            "Calls holding an executor slot (running now).",
            value=busy,
        )
        queued = getattr(self.executor, "queued", None)
        if isinstance(queued, int):
            yield GaugeMetricFamily(
                "patio_executor_queued",
                "Calls waiting for a free executor slot.",
                value=queued,
            )
        if capacity is not None:
            yield GaugeMetricFamily(
                "patio_executor_capacity",
                "How many calls the executor runs at once.",
                value=capacity,
            )

    def _peers(self) -> Iterator[Metric]:
        broker = self.broker
        peers = list(broker.peers())
        yield GaugeMetricFamily(
            "patio_peers_known",
            "Peers this worker knows of (any membership source).",
            value=len(peers),
        )
        yield GaugeMetricFamily(
            "patio_peers_connected",
            "Known peers with an authenticated connection.",
            value=sum(1 for peer in peers if getattr(peer, "connected", False)),
        )
        # Readiness does not depend on links (docs/worker-contract.md); this
        # is the signal for them: members of this worker's membership that it
        # has no link to (callers connecting in do not count).
        _, _, missing = broker.membership_links()
        yield GaugeMetricFamily(
            "patio_peers_missing",
            "Members of this worker's membership it has no link to (see /readyz?verbose).",
            value=len(missing),
        )

    def _connection_counters(self) -> Iterator[Metric]:
        stats = self.broker.stats
        for name, text, value in (
            ("patio_reconnects", "Connections re-established after a loss.", stats.reconnects),
            ("patio_connects", "Authenticated connections established.", stats.connects),
            ("patio_disconnects", "Authenticated connections lost or closed.", stats.disconnects),
            (
                "patio_calls_retried",
                "Calls re-sent to another peer after a link dropped.",
                stats.calls_retried,
            ),
            ("patio_calls_forwarded", "Calls sent to a peer for execution.", stats.calls_forwarded),
            ("patio_bytes_sent", "Bytes written to mesh connections.", stats.bytes_sent),
            ("patio_bytes_received", "Bytes read from mesh connections.", stats.bytes_received),
        ):
            yield CounterMetricFamily(name, text, value=value)

        for name, text, by_reason in (
            (
                "patio_handshake_failures",
                "Failed handshakes (version, auth, timeout...), by reason.",
                stats.handshake_failures,
            ),
            (
                "patio_frames_rejected",
                "Frames rejected as malformed, oversized or over a limit, by reason.",
                stats.frames_rejected,
            ),
            (
                "patio_links_cut",
                "Authenticated links cut because the peer stopped reading (output_buffer, "
                "stopped_reading) or went silent, by reason.",
                stats.links_cut,
            ),
            (
                "patio_reads_paused",
                "Times a peer's link stopped being read at a limit: its window of calls "
                "or its budget of argument bytes, by reason.",
                stats.reads_paused,
            ),
            (
                "patio_links_refused",
                "Authenticated links refused: node id held by a live link, or too many "
                "links of one node, by reason.",
                stats.links_refused,
            ),
        ):
            family = CounterMetricFamily(name, text, labels=["reason"])
            for reason, count in sorted(by_reason.items()):
                family.add_metric([reason], count)
            yield family

    def _identity(self) -> Iterator[Metric]:
        """Which patio and node, the key in use, draining, and the loop's tasks."""
        broker = self.broker
        info = GaugeMetricFamily(
            "patio_worker_info",
            "Always 1; labels say which patio and which node.",
            labels=["version", "node_id"],
        )
        info.add_metric([self.version, str(broker.node_id)], 1)
        yield info

        keys = GaugeMetricFamily(
            "patio_auth_keys_info",
            "Always 1; primary is the fingerprint of the key set in use (never the key).",
            labels=["primary"],
        )
        keys.add_metric([str(broker.key_fingerprint)], 1)
        yield keys

        yield GaugeMetricFamily(
            "patio_draining",
            "1 while the worker drains after SIGTERM, else 0.",
            value=1 if broker.draining else 0,
        )

        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped off the loop (a test): nothing to count
            pass
        else:
            yield GaugeMetricFamily(
                "patio_event_loop_tasks",
                "asyncio tasks alive on the worker's event loop (a leak shows as growth).",
                value=tasks,
            )


def _summed(
    items: Iterable[tuple[tuple[str, ...], int]], label: Callable[[str], str], task_index: int
) -> list[tuple[tuple[str, ...], int]]:
    """Apply the task label cap; names folded into one label have their counts added."""
    out: dict[tuple[str, ...], int] = {}
    for key, count in items:
        mapped = list(key)
        mapped[task_index] = label(key[task_index])
        folded = tuple(mapped)
        out[folded] = out.get(folded, 0) + count
    return sorted(out.items())


class WorkerMetrics:
    """The worker's own CollectorRegistry: broker counters plus the two histograms."""

    def __init__(self, broker: BrokerView, *, version: str, executor: object | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.task_label = TaskLabels()
        self.collector = BrokerCollector(
            broker, version=version, executor=executor, task_label=self.task_label
        )
        self.registry.register(self.collector)
        self.call_duration = Histogram(
            "patio_call_duration_seconds",
            "Time from start to finish of a call, by task and side.",
            labelnames=["task", "side"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "patio_call_queue_wait_seconds",
            "Time a call waited on this worker before its task started running.",
            labelnames=["task"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        # .labels() takes a lock and builds a key each time; cache the children.
        self._duration_children: dict[tuple[str, str], Any] = {}
        self._wait_children: dict[str, Any] = {}
        self.started_at = time.time()

    def install(self, stats: BrokerStats) -> None:
        stats.call_observer = self.observe_call
        stats.queue_observer = self.observe_queue_wait

    def observe_call(self, task: str, side: str, outcome: str, seconds: float) -> None:
        key = (task, side)
        child = self._duration_children.get(key)
        if child is None:
            child = self.call_duration.labels(self.task_label(task), side)
            if len(self._duration_children) < _CHILD_CACHE_LIMIT:
                self._duration_children[key] = child
        child.observe(seconds)

    def observe_queue_wait(self, task: str, seconds: float) -> None:
        child = self._wait_children.get(task)
        if child is None:
            child = self.queue_wait.labels(self.task_label(task))
            if len(self._wait_children) < _CHILD_CACHE_LIMIT:
                self._wait_children[task] = child
        child.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format (call it on the loop: counters are not locked)."""
        return bytes(generate_latest(self.registry))
