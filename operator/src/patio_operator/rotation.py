"""The key-rotation state machine, as a pure function.

Rotation from key A to key B follows docs/worker-contract.md in three steps,
all written to the one auth Secret the workers mount (`key`, `next-key`):

    phase       key   next-key   workers then
    Idle        A     -          present A, accept A
    Accepting   A     B          present A, accept A and B        (step 1)
    Presenting  B     A          present B, still accept A        (step 2)
    Retiring    B     -          present B, refuse A              (step 3)
    Idle        B     -          (rotation complete, keyGeneration + 1)

A step is only taken once the previous one has reached every worker, else a
worker that already presents B would be refused by one that does not accept
it yet. "Reached" is decided by `confirmed`:

- mode ``metrics`` (default): every *ready* worker's `/metrics` reports its
  key set (`patio_auth_keys_info` labels); the step is confirmed when all of
  them report the same set and it differs from every set seen before the
  step (the baseline). That needs no knowledge of how the worker computes
  its fingerprint, only that a new key set reads differently. If no worker
  exposes the gauge at all (an older worker), the step falls back to the
  settle time; if only some do, it waits.
- mode ``settle``: wait a fixed time per step, long enough for the kubelet
  to refresh mounted Secrets (its sync period plus cache TTL, ~1-2 minutes
  by default).

The state is kept in the Secret's annotations, written in the same request
as the keys, so an operator restarted at any point resumes the right step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from patio_operator import names

IDLE = "Idle"
ACCEPTING = "Accepting"
PRESENTING = "Presenting"
RETIRING = "Retiring"
PHASES = (IDLE, ACCEPTING, PRESENTING, RETIRING)

MODES = ("metrics", "settle")


@dataclass(frozen=True)
class KeyState:
    """The auth Secret's content, decoded."""

    key: str
    next_key: str | None = None
    phase: str = IDLE
    #: The rotation token last acted on (completed or in progress).
    token: str = ""
    #: When the current step was written (ISO 8601, UTC).
    since: str = ""
    generation: int = 1
    #: Key-set reports seen before the current step was written.
    baseline: tuple[str, ...] = ()

    def data(self) -> dict[str, str]:
        """Secret items (plain text; the caller base64-encodes)."""
        out = {names.KEY_ITEM: self.key}
        if self.next_key:
            out[names.NEXT_KEY_ITEM] = self.next_key
        return out

    def annotations(self) -> dict[str, str]:
        return {
            names.ROTATION_PHASE_ANNOTATION: self.phase,
            names.ROTATION_TOKEN_ANNOTATION: self.token,
            names.ROTATION_SINCE_ANNOTATION: self.since,
            names.KEY_GENERATION_ANNOTATION: str(self.generation),
            names.ROTATION_BASELINE_ANNOTATION: json.dumps(list(self.baseline)),
        }


def from_secret(data: Mapping[str, str], annotations: Mapping[str, str]) -> KeyState | None:
    """Decode a Secret (items already base64-decoded); None when it has no usable key."""
    key = data.get(names.KEY_ITEM, "")
    if not key:
        return None
    phase = annotations.get(names.ROTATION_PHASE_ANNOTATION, IDLE)
    if phase not in PHASES:
        phase = IDLE
    try:
        generation = int(annotations.get(names.KEY_GENERATION_ANNOTATION, "1"))
    except ValueError:
        generation = 1
    try:
        baseline = tuple(
            str(b) for b in json.loads(annotations.get(names.ROTATION_BASELINE_ANNOTATION, "[]"))
        )
    except (ValueError, TypeError):
        baseline = ()
    return KeyState(
        key=key,
        next_key=data.get(names.NEXT_KEY_ITEM) or None,
        phase=phase,
        token=annotations.get(names.ROTATION_TOKEN_ANNOTATION, ""),
        since=annotations.get(names.ROTATION_SINCE_ANNOTATION, ""),
        generation=generation,
        baseline=baseline,
    )


def fresh(key: str, token: str, generation: int, now: datetime) -> KeyState:
    """A brand-new key (cluster created, or its Secret lost): nothing to rotate from."""
    return KeyState(key=key, token=token, generation=generation, since=iso(now))


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def confirmed(
    state: KeyState,
    reports: Mapping[str, str | None],
    now: datetime,
    mode: str,
    settle_seconds: float,
) -> tuple[bool, str]:
    """Whether the current step has reached every ready worker, and why (not)."""
    since = parse_iso(state.since)
    elapsed = (now - since) if since else timedelta(seconds=settle_seconds)
    settled = elapsed >= timedelta(seconds=settle_seconds)
    if mode == "settle":
        return settled, ("settle time elapsed" if settled else "waiting for the settle time")
    if not reports:
        return True, "no ready worker to wait for"
    values = list(reports.values())
    if all(not v for v in values):
        # Workers without the gauge: the only safe thing left is to wait.
        return settled, "workers expose no key-set gauge; " + (
            "settle time elapsed" if settled else "waiting for the settle time"
        )
    missing = sorted(pod for pod, v in reports.items() if not v)
    if missing:
        return False, f"no key-set report from {', '.join(missing)}"
    distinct = set(values)
    if len(distinct) != 1:
        return False, f"workers report {len(distinct)} different key sets"
    (value,) = distinct
    if value in state.baseline:
        return False, "workers still report the previous key set"
    if not state.baseline and not settled:
        # Nothing to compare with: a uniform report could still be the old set.
        return False, "no baseline report; waiting for the settle time"
    return True, "every ready worker reports the new key set"


@dataclass(frozen=True)
class Step:
    """Outcome of one evaluation: the state to write (None = leave as is)."""

    state: KeyState | None
    reason: str
    #: Short Event reason when a step is taken (RotationStarted, ...).
    event: str = ""


def advance(
    state: KeyState,
    *,
    requested_token: str,
    reports: Mapping[str, str | None],
    now: datetime,
    mode: str,
    settle_seconds: float,
    new_key: Callable[[], str],
) -> Step:
    """Decide the next rotation step.

    A token changed during a rotation is not lost: the rotation in progress
    finishes, records its own token, and the next evaluation sees the newer
    token differ and starts another rotation.
    """
    baseline = tuple(sorted({v for v in reports.values() if v}))
    stamp = iso(now)
    if state.phase == IDLE:
        if requested_token and requested_token != state.token:
            nxt = replace(
                state,
                next_key=new_key(),
                phase=ACCEPTING,
                token=requested_token,
                since=stamp,
                baseline=baseline,
            )
            return Step(nxt, "step 1: workers accept the new key", "RotationStarted")
        return Step(None, "no rotation requested")
    ok, why = confirmed(state, reports, now, mode, settle_seconds)
    if not ok:
        return Step(None, why)
    if state.phase == ACCEPTING:
        if not state.next_key:  # hand-edited Secret lost the new key: start over
            nxt = replace(state, next_key=new_key(), since=stamp, baseline=baseline)
            return Step(nxt, "next-key missing; step 1 again", "RotationRestarted")
        nxt = replace(
            state,
            key=state.next_key,
            next_key=state.key,
            phase=PRESENTING,
            since=stamp,
            baseline=baseline,
        )
        return Step(nxt, f"step 2: workers present the new key ({why})", "RotationPresenting")
    if state.phase == PRESENTING:
        nxt = replace(state, next_key=None, phase=RETIRING, since=stamp, baseline=baseline)
        return Step(nxt, f"step 3: the old key is refused ({why})", "RotationRetiring")
    nxt = replace(state, phase=IDLE, since=stamp, baseline=(), generation=state.generation + 1)
    return Step(nxt, f"rotation complete ({why})", "RotationCompleted")
