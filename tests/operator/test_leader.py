"""Leader election over a Lease: who may take it, renew, step down and hand over."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
from kubernetes.client import ApiException
from patio_operator import leader
from patio_operator.leader import Elector, Observation, can_take

Obj = dict[str, Any]


class FakeLeases:
    """Leases in memory with resourceVersion checks, as the API server does them."""

    def __init__(self) -> None:
        self.lease: Obj | None = None
        self.rv = itertools.count(1)
        self.down = False
        self.may_create = True

    def get(self, api_version: str, kind: str, ns: str, name: str) -> Obj | None:
        if self.down:
            raise ConnectionRefusedError("api server down")
        return copy.deepcopy(self.lease)

    def create(self, obj: Obj) -> Obj:
        if not self.may_create:
            raise ApiException(status=403, reason="Forbidden")
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        self.lease = copy.deepcopy(obj)
        self.lease["metadata"]["resourceVersion"] = str(next(self.rv))
        return copy.deepcopy(self.lease)

    def replace(self, obj: Obj) -> Obj:
        assert self.lease is not None
        if obj["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        self.lease = copy.deepcopy(obj)
        self.lease["metadata"]["resourceVersion"] = str(next(self.rv))
        return copy.deepcopy(self.lease)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def electors() -> tuple[FakeLeases, Clock, Elector, Elector]:
    api, clock = FakeLeases(), Clock()
    a = Elector(api, "ns", "patio-operator", "a", monotonic=clock)  # type: ignore[arg-type]
    b = Elector(api, "ns", "patio-operator", "b", monotonic=clock)  # type: ignore[arg-type]
    return api, clock, a, b


def test_can_take_only_an_empty_own_or_silent_lease() -> None:
    held = {"holderIdentity": "a", "leaseDurationSeconds": 10}
    assert can_take({}, "b", Observation(), 0, "1")
    assert can_take({"holderIdentity": "b"}, "b", Observation("1", 0), 0, "1")
    assert not can_take(held, "b", Observation("1", 100.0), 105.0, "1")
    assert can_take(held, "b", Observation("1", 100.0), 110.0, "1")
    assert not can_take(held, "b", Observation("1", 100.0), 110.0, "2")  # renewed meanwhile


def test_one_leader_a_standby_takes_over_after_the_duration() -> None:
    api, clock, a, b = electors()
    assert a.try_lead() and not b.try_lead()
    clock.now += 5
    assert a.try_lead() and not b.try_lead()  # renewed: b's wait starts again
    clock.now += leader.DURATION_SECONDS - 1  # a crashed: no more renewals
    assert not b.try_lead()
    clock.now += 1
    assert b.try_lead()
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "b"
    assert api.lease["spec"]["leaseTransitions"] == 1


def test_release_hands_over_at_once() -> None:
    _, _, a, b = electors()
    assert a.try_lead() and not b.try_lead()
    a.release()
    assert b.try_lead()


def test_a_leader_that_cannot_renew_steps_down_before_a_standby_may_take_over() -> None:
    api, clock, a, _ = electors()
    assert a.try_lead()
    api.down = True
    clock.now += 2
    assert a.try_lead()  # a short API outage is survived
    clock.now = 1000.0 + leader.DURATION_SECONDS - leader.STEP_DOWN_MARGIN_SECONDS
    assert not a.try_lead()


def test_without_the_right_to_create_it_waits_for_the_charts_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api, _, a, b = electors()
    api.may_create = False
    assert not a.try_lead()
    assert "does not exist and this operator may not create it" in caplog.text
    # The chart's Lease: no spec field set, so the first candidate takes it.
    api.lease = {"metadata": {"name": "patio-operator", "resourceVersion": "0"}, "spec": {}}
    assert a.try_lead() and not b.try_lead()
    assert api.lease["spec"]["holderIdentity"] == "a"
