"""Plain counters that brokers and transports keep, read by the metrics layer.

Incrementing an int is the cheapest thing the hot path can do, so the library
keeps counters here and the worker's Prometheus collector reads them at scrape
time. Durations need a histogram, so those go through an optional callback that
is ``None`` unless a metrics layer installs one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# Outcomes a finished call is counted under (bounded label values).
OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"  # the task raised
OUTCOME_TIMEOUT = "timeout"  # the deadline passed
OUTCOME_CANCELLED = "cancelled"  # the caller gave up / cancelled
OUTCOME_NO_ROUTE = "no_route"  # no peer serves the name
OUTCOME_CONNECTION = "connection"  # the connection carrying the call was lost
OUTCOME_REFUSED = "refused"  # executor refused (NullExecutor, shut down, draining)
OUTCOMES = (
    OUTCOME_OK,
    OUTCOME_ERROR,
    OUTCOME_TIMEOUT,
    OUTCOME_CANCELLED,
    OUTCOME_NO_ROUTE,
    OUTCOME_CONNECTION,
    OUTCOME_REFUSED,
)

# Which side of a call a counter speaks of.
SIDE_CALLER = "caller"
SIDE_EXECUTOR = "executor"
SIDE_FORWARDER = "forwarder"  # a member handing an outside caller's call to another member

#: The name calls are counted under when a peer asks for a task this broker
#: neither serves nor knows a route to: a peer must not grow the counters
#: (and the metrics' label sets) with every distinct name it sends.
OTHER_NAME = "other"

CallObserver = Callable[[str, str, str, float], None]
"""``observer(task, side, outcome, seconds)`` called once per finished call."""

QueueObserver = Callable[[str, float], None]
"""``observer(task, seconds)``: time a call waited before it started executing."""


@dataclass(slots=True)
class BrokerStats:
    """Counters of one broker. Keys are (task, side) or (task, side, outcome)."""

    calls_started: Counter[tuple[str, str]] = field(default_factory=Counter)
    calls_finished: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    calls_forwarded: int = 0
    calls_retried: int = 0
    connects: int = 0
    disconnects: int = 0
    reconnects: int = 0
    handshake_failures: Counter[str] = field(default_factory=Counter)  # by reason
    frames_rejected: Counter[str] = field(default_factory=Counter)  # by reason
    #: authenticated links this side cut because the peer broke a limit
    #: (stopped reading, went silent), by reason
    links_cut: Counter[str] = field(default_factory=Counter)
    #: a peer's link stopped being read: "window" (calls) or "bytes" (its budget)
    reads_paused: Counter[str] = field(default_factory=Counter)
    #: authenticated links refused: "node_id_in_use", "too_many_links"
    links_refused: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_received: int = 0
    call_observer: CallObserver | None = None
    queue_observer: QueueObserver | None = None
