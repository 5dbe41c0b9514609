"""Demand-driven replica decisions, as pure functions.

The operator samples every ready worker's `/metrics` (`patio_executor_busy`,
`_queued`, `_capacity`, see docs/metrics.md) and turns them into a replica
count. Nothing here reads a clock or the network: the reconciler passes the
samples, the time and the last state in, and writes back what comes out.

How a count is chosen (docs/autoscaling.md has the rationale):

- **Demand** is the calls held or awaited: `busy + queued`, summed over the
  members that reported.
- **What one worker should carry** follows the target: `busyFraction` of its
  slots, and/or its slots plus `queuedPerWorker` waiting calls. With both,
  the larger replica count wins. The recommendation is
  `ceil(demand / per_worker)`, within `[minReplicas, maxReplicas]`, and the
  current count while the ratio is within `TOLERANCE` of the target.
- **Stabilization** is HPA-like but its memory lives in the status (so a
  standby operator taking over continues it): a move is `pending` from the
  first sample that asks for it; scale-up uses the *lowest* recommendation
  seen over `scaleUpStabilizationSeconds`, scale-down the *highest* over
  `scaleDownStabilizationSeconds`; a sample asking for the other direction
  (or for no change) resets it. One move changes at most `maxStep` replicas.
- **Who leaves.** A StatefulSet always removes its highest ordinals, so the
  autoscaler cannot pick any idle pod; instead it removes only the highest
  members that are idle right now (nothing running or queued), and waits for
  a busy one. After a second full window of waiting it removes it anyway:
  the worker's SIGTERM drain still finishes every call it holds.
- **Never below a draining member.** While any member is terminating no
  decision is taken at all; scale-up also waits until every member exists
  and is ready, since their capacity is on its way (a failing member, e.g.
  in CrashLoopBackOff, is not waited for).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from patio_operator import rotation
from patio_operator.peers import PodView

#: A recommendation within 10% of the current load per worker keeps the
#: count: as HPA's default tolerance, it stops flapping around the target.
TOLERANCE = 0.1
#: Used when the spec names no target: 80% of the executor's slots busy.
DEFAULT_BUSY_FRACTION = 0.8
#: Capacity assumed for a worker that does not report one (an unbounded
#: async executor): one call at a time is the only safe guess.
UNKNOWN_CAPACITY = 1.0

UP = "Up"
DOWN = "Down"

_SAMPLE = re.compile(r"^(patio_executor_(?:busy|queued|capacity))(?:\{[^}]*\})?\s+(\S+)")


@dataclass(frozen=True)
class Policy:
    """spec.autoscaling with the CRD's defaults applied."""

    min_replicas: int
    max_replicas: int
    busy_fraction: float | None
    queued_per_worker: float | None
    up_seconds: float
    down_seconds: float
    max_step: int


def policy_of(spec: Mapping[str, Any]) -> Policy | None:
    """The policy when autoscaling is enabled, else None."""
    auto = spec.get("autoscaling") or {}
    if not auto.get("enabled"):
        return None
    target = auto.get("target") or {}
    busy = target.get("busyFraction")
    queued = target.get("queuedPerWorker")
    if busy is None and queued is None:
        busy = DEFAULT_BUSY_FRACTION
    return Policy(
        min_replicas=int(auto.get("minReplicas", 1)),
        max_replicas=int(auto["maxReplicas"]),
        busy_fraction=None if busy is None else float(busy),
        queued_per_worker=None if queued is None else float(queued),
        up_seconds=float(auto.get("scaleUpStabilizationSeconds", 0)),
        down_seconds=float(auto.get("scaleDownStabilizationSeconds", 300)),
        max_step=int(auto.get("maxStep", 4)),
    )


@dataclass(frozen=True)
class Load:
    """One worker's executor gauges at one moment."""

    busy: float
    queued: float
    capacity: float | None

    @property
    def demand(self) -> float:
        return self.busy + self.queued


def parse_load(metrics_text: str) -> Load | None:
    """The executor gauges from a worker's Prometheus text; None without `busy`."""
    values: dict[str, float] = {}
    for line in metrics_text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            try:
                values[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    if "patio_executor_busy" not in values:
        return None
    return Load(
        busy=values["patio_executor_busy"],
        queued=values.get("patio_executor_queued", 0.0),
        capacity=values.get("patio_executor_capacity"),
    )


def clamp(replicas: int, policy: Policy) -> int:
    return max(policy.min_replicas, min(policy.max_replicas, replicas))


def recommend(policy: Policy, current: int, loads: Sequence[Load]) -> tuple[int, str]:
    """(replicas the demand asks for, why); `current` when nothing reported."""
    if not loads:
        return clamp(current, policy), "no worker reported its load"
    demand = sum(load.demand for load in loads)
    slots = sum(load.capacity or UNKNOWN_CAPACITY for load in loads) / len(loads)
    per_worker = []
    if policy.busy_fraction is not None:
        per_worker.append(slots * policy.busy_fraction)
    if policy.queued_per_worker is not None:
        per_worker.append(slots + policy.queued_per_worker)
    # The stricter target (the smaller load per worker) asks for more workers.
    carry = max(min(per_worker), 1e-9)
    text = f"{demand:g} calls running or queued on {len(loads)} workers, target {carry:g} each"
    if current > 0 and abs(demand / (current * carry) - 1) <= TOLERANCE:
        return clamp(current, policy), text
    return clamp(math.ceil(demand / carry), policy), text


@dataclass(frozen=True)
class Pending:
    """A move waiting out its stabilization window (kept in status.autoscaling)."""

    direction: str
    since: datetime
    replicas: int

    def to_status(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "since": rotation.iso(self.since),
            "replicas": self.replicas,
        }


def pending_from_status(data: Mapping[str, Any] | None) -> Pending | None:
    if not data:
        return None
    since = rotation.parse_iso(str(data.get("since") or ""))
    try:
        replicas = int(data["replicas"])
    except (KeyError, ValueError, TypeError):
        return None
    if since is None or data.get("direction") not in (UP, DOWN):
        return None
    return Pending(str(data["direction"]), since, replicas)


@dataclass(frozen=True)
class Decision:
    """What to do now: `replicas` (== current when holding), the new pending state, why."""

    replicas: int
    pending: Pending | None
    reason: str

    def changes(self, current: int) -> bool:
        return self.replicas != current


def ordinal(pod_name: str) -> int:
    """The StatefulSet ordinal at the end of a pod's name (-1 when none)."""
    tail = pod_name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def decide(
    policy: Policy,
    *,
    current: int,
    pods: Sequence[PodView],
    loads: Mapping[str, Load],
    pending: Pending | None,
    now: datetime,
) -> Decision:
    """One autoscaling step: pods and their loads in, a replica count out."""
    draining = sorted(p.name for p in pods if p.terminating)
    if draining:
        return Decision(current, pending, f"waiting for {', '.join(draining)} to finish draining")
    if not policy.min_replicas <= current <= policy.max_replicas:
        target = clamp(current, policy)
        return Decision(
            target,
            None,
            f"replicas {current} outside autoscaling bounds "
            f"{policy.min_replicas}..{policy.max_replicas}: clamped to {target}",
        )
    ready = [p for p in pods if p.ready]
    reported = [loads[p.name] for p in ready if p.name in loads]
    wanted, why = recommend(policy, current, reported)

    if wanted == current:
        return Decision(current, None, f"steady: {why}")
    direction = UP if wanted > current else DOWN
    if pending is None or pending.direction != direction:
        pending = Pending(direction, now, wanted)
    elif direction == UP:
        pending = Pending(UP, pending.since, min(pending.replicas, wanted))
    else:
        pending = Pending(DOWN, pending.since, max(pending.replicas, wanted))
    waited = (now - pending.since).total_seconds()

    if direction == UP:
        # Members on their way (created, not ready, not failing) bring capacity;
        # a crash-looping one does not, and must not block scale-up forever.
        coming = max(current - len(pods), 0) + sum(1 for p in pods if not p.ready and not p.failure)
        if coming:
            return Decision(current, pending, f"{why}; waiting for {coming} workers to be ready")
        if waited < policy.up_seconds:
            return Decision(current, pending, f"{why}; scale-up stabilizing")
        target = min(pending.replicas, current + policy.max_step)
        return Decision(target, None, f"scaled up from {current} to {target}: {why}")

    if len(reported) < len(ready):
        return Decision(current, pending, f"{why}; not every ready worker reported its load")
    if waited < policy.down_seconds:
        return Decision(current, pending, f"{why}; scale-down stabilizing")
    target = max(pending.replicas, current - policy.max_step)
    # The StatefulSet removes the highest ordinals: keep only the idle ones among them.
    forced = waited >= 2 * policy.down_seconds
    by_ordinal = {ordinal(p.name): p for p in pods}
    keep = current
    while keep > target:
        pod = by_ordinal.get(keep - 1)
        load = loads.get(pod.name) if pod is not None else None
        if load is not None and load.demand > 0 and not forced:
            break
        keep -= 1
    if keep == current:
        return Decision(
            current, pending, f"{why}; waiting for {by_ordinal[current - 1].name} to go idle"
        )
    return Decision(keep, None, f"scaled down from {current} to {keep}: {why}")
