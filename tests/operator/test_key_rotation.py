"""The key-rotation state machine (pure)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from patio_operator import rotation
from patio_operator.rotation import KeyState

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def strong(name: str) -> str:
    """A test key long enough to get its own fingerprint (weak keys all share one)."""
    return f"{name}-0123456789abcdefghijklmnopqrstuv"


KA, KB, K1, K2 = strong("A"), strong("B"), strong("key-1"), strong("key-2")
SETTLE = 60.0


def keys() -> Iterator[str]:
    n = 0
    while True:
        n += 1
        yield strong(f"key-{n}")


def step(
    state: KeyState,
    token: str,
    reports: dict[str, str | None],
    at: datetime,
    mode: str = "metrics",
    gen: Iterator[str] | None = None,
) -> rotation.Step:
    g = gen or keys()
    return rotation.advance(
        state,
        requested_token=token,
        reports=reports,
        now=at,
        mode=mode,
        settle_seconds=SETTLE,
        new_key=lambda: next(g),
    )


def fp(key: str) -> str:
    return rotation.fingerprint(key)


def test_fingerprint_matches_the_worker() -> None:
    """The operator recomputes what workers report; a drift would stall rotations."""
    from patio.proto.connection import KeySet

    assert rotation.fingerprint("some key") == KeySet(primary=b"some key").fingerprint


def test_full_rotation_follows_the_three_contract_steps() -> None:
    start = rotation.fresh(KA, token="", generation=1, now=T0)
    s1 = step(start, "r1", {"w0": fp(KA), "w1": fp(KA)}, T0)
    assert s1.state is not None and s1.event == "RotationStarted"
    st = s1.state
    assert (st.phase, st.key, st.next_key, st.token) == ("Accepting", KA, K1, "r1")
    assert st.data() == {"key": KA, "next-key": K1}

    # Accepting B cannot be observed: wait the settle time, even if all report A.
    early = step(st, "r1", {"w0": fp(KA), "w1": fp(KA)}, T0 + timedelta(seconds=10))
    assert early.state is None and "settle" in early.reason
    s2 = step(st, "r1", {"w0": fp(KA), "w1": fp(KA)}, T0 + timedelta(seconds=61))
    assert s2.state is not None
    st = s2.state
    assert (st.phase, st.key, st.next_key) == ("Presenting", K1, KA)

    # Presenting B is observable: no retiring of A until every worker presents B.
    lagging = step(st, "r1", {"w0": fp(K1), "w1": fp(KA)}, T0 + timedelta(seconds=200))
    assert lagging.state is None and "w1" in lagging.reason
    s3 = step(st, "r1", {"w0": fp(K1), "w1": fp(K1)}, T0 + timedelta(seconds=62))
    assert s3.state is not None
    st = s3.state
    assert (st.phase, st.key, st.next_key) == ("Retiring", K1, None)
    assert st.data() == {"key": K1}

    s4 = step(st, "r1", {"w0": fp(K1), "w1": fp(K1)}, T0 + timedelta(seconds=130))
    assert s4.state is not None and s4.event == "RotationCompleted"
    assert (s4.state.phase, s4.state.generation) == ("Idle", 2)
    # Same token again: nothing to do.
    assert step(s4.state, "r1", {}, T0 + timedelta(seconds=500)).state is None


def test_no_rotation_without_a_new_token() -> None:
    start = rotation.fresh(KA, token="r1", generation=1, now=T0)
    assert step(start, "r1", {}, T0).state is None
    assert step(start, "", {}, T0).state is None


def test_unreachable_worker_blocks_the_step() -> None:
    st = KeyState(key=KB, next_key=KA, phase="Presenting", token="r", since=rotation.iso(T0))
    res = step(st, "r", {"w0": fp(KB), "w1": None}, T0 + timedelta(hours=1))
    assert res.state is None


def test_no_metrics_at_all_falls_back_to_settle_time() -> None:
    st = KeyState(key=KB, next_key=KA, phase="Presenting", token="r", since=rotation.iso(T0))
    assert step(st, "r", {"w0": None}, T0 + timedelta(seconds=5)).state is None
    assert step(st, "r", {"w0": None}, T0 + timedelta(seconds=61)).state is not None


def test_no_ready_worker_means_nothing_to_wait_for_beyond_settle() -> None:
    st = KeyState(key=KB, next_key=KA, phase="Presenting", token="r", since=rotation.iso(T0))
    assert step(st, "r", {}, T0).state is not None


@pytest.mark.parametrize("phase", ["Accepting", "Presenting", "Retiring"])
def test_settle_mode_waits_per_step(phase: str) -> None:
    st = KeyState(key=KB, next_key=KA, phase=phase, token="r", since=rotation.iso(T0))
    assert step(st, "r", {"w0": "junk"}, T0 + timedelta(seconds=30), mode="settle").state is None
    assert (
        step(st, "r", {"w0": "junk"}, T0 + timedelta(seconds=60), mode="settle").state is not None
    )


def test_token_changed_mid_rotation_finishes_then_starts_again() -> None:
    st = KeyState(key=KB, phase="Retiring", token="r1", since=rotation.iso(T0))
    done = step(st, "r2", {"w0": fp(KB)}, T0 + timedelta(seconds=61))
    assert done.state is not None and done.state.phase == "Idle" and done.state.token == "r1"
    again = step(done.state, "r2", {"w0": fp(KB)}, T0 + timedelta(seconds=62))
    assert again.state is not None and again.state.phase == "Accepting"
    assert again.state.token == "r2"


def test_state_survives_a_round_trip_through_the_secret() -> None:
    """An operator restarted mid-rotation resumes from the Secret alone."""
    st = KeyState(
        key=KB, next_key=KA, phase="Presenting", token="r", since=rotation.iso(T0), generation=7
    )
    back = rotation.from_secret(st.data(), st.annotations())
    assert back == st


def test_secret_without_key_is_unusable_and_bad_annotations_are_tolerated() -> None:
    assert rotation.from_secret({}, {}) is None
    st = rotation.from_secret(
        {"key": KA}, {"patio.dev/rotation-phase": "Bogus", "patio.dev/key-generation": "x"}
    )
    assert st is not None and st.phase == "Idle" and st.generation == 1


def test_lost_next_key_restarts_step_one() -> None:
    st = KeyState(key=KA, next_key=None, phase="Accepting", token="r", since=rotation.iso(T0))
    res = step(st, "r", {}, T0)
    assert res.state is not None and res.state.next_key == K1
    assert res.event == "RotationRestarted"
