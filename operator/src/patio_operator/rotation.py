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
it yet. "Reached" is decided by `confirmed`. Workers expose only the
fingerprint of the key they *present* (`patio_auth_keys_info{primary=...}`),
so in mode ``metrics`` (the default):

- Accepting -> Presenting: that workers accept B is not observable, so the
  step waits the settle time (the kubelet's refresh of mounted Secrets: its
  sync period plus cache TTL, about a minute by default) and that every
  ready worker is still reachable and presenting A;
- Presenting -> Retiring: observable, and the one that matters: every ready
  worker must report fingerprint(B) before A stops being accepted;
- Retiring -> Idle: the settle time again (dropping A is not observable),
  plus every ready worker reporting fingerprint(B).

A worker that is not ready is not waited for: it is not in anyone's
rotation of calls, and when it (re)starts it reads the Secret as it is then.
Mode ``settle`` skips the metrics and waits the settle time per step, for
workers whose metrics the operator cannot reach (e.g. a NetworkPolicy).

The state is kept in the Secret's annotations, written in the same request
as the keys, so an operator restarted at any point resumes the right step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from patio.proto import keys
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
    return KeyState(
        key=key,
        next_key=data.get(names.NEXT_KEY_ITEM) or None,
        phase=phase,
        token=annotations.get(names.ROTATION_TOKEN_ANNOTATION, ""),
        since=annotations.get(names.ROTATION_SINCE_ANNOTATION, ""),
        generation=generation,
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


def fingerprint(key: str) -> str:
    """The fingerprint a worker reports for ``key`` (the library's own function)."""
    return keys.fingerprint(key.encode("utf-8"))


def confirmed(
    state: KeyState,
    reports: Mapping[str, str | None],
    now: datetime,
    mode: str,
    settle_seconds: float,
) -> tuple[bool, str]:
    """Whether the current step has reached every ready worker, and why (not).

    `reports` maps each ready worker to the primary fingerprint it reports
    (None when its /metrics could not be read).
    """
    since = parse_iso(state.since)
    elapsed = (now - since) if since else timedelta(seconds=settle_seconds)
    settled = elapsed >= timedelta(seconds=settle_seconds)
    waiting = f"waiting for the settle time ({settle_seconds:g}s)"
    if mode == "settle":
        return settled, ("settle time elapsed" if settled else waiting)
    needs_settle = state.phase in (ACCEPTING, RETIRING)
    if needs_settle and not settled:
        return False, waiting
    if not reports:
        return True, "no ready worker to wait for"
    if all(v is None for v in reports.values()):
        # No worker's metrics readable at all: fall back to time alone.
        return settled, "no worker metrics readable; " + (
            "settle time elapsed" if settled else waiting
        )
    expected = fingerprint(state.key)
    behind = sorted(pod for pod, fp in reports.items() if fp != expected)
    if behind:
        return False, f"waiting for {', '.join(behind)} to present key {expected}"
    return True, f"every ready worker presents key {expected}"


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
    stamp = iso(now)
    if state.phase == IDLE:
        if requested_token and requested_token != state.token:
            nxt = replace(
                state,
                next_key=new_key(),
                phase=ACCEPTING,
                token=requested_token,
                since=stamp,
            )
            return Step(nxt, "step 1: workers accept the new key", "RotationStarted")
        return Step(None, "no rotation requested")
    if state.phase == ACCEPTING and not state.next_key:
        # A hand-edited Secret lost the new key before anyone presented it.
        return Step(
            replace(state, next_key=new_key(), since=stamp),
            "next-key missing; step 1 again",
            "RotationRestarted",
        )
    ok, why = confirmed(state, reports, now, mode, settle_seconds)
    if not ok:
        return Step(None, why)
    if state.phase == ACCEPTING and state.next_key:
        nxt = replace(
            state,
            key=state.next_key,
            next_key=state.key,
            phase=PRESENTING,
            since=stamp,
        )
        return Step(nxt, f"step 2: workers present the new key ({why})", "RotationPresenting")
    if state.phase == PRESENTING:
        nxt = replace(state, next_key=None, phase=RETIRING, since=stamp)
        return Step(nxt, f"step 3: the old key is refused ({why})", "RotationRetiring")
    nxt = replace(state, phase=IDLE, since=stamp, generation=state.generation + 1)
    return Step(nxt, f"rotation complete ({why})", "RotationCompleted")
