"""The autoscaler's pure decisions: parsing, recommendation, stabilization, who leaves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from patio_operator import autoscale, resync
from patio_operator.autoscale import Load, Pending, Policy
from patio_operator.peers import PodView
from patio_operator.reconciler import retry_delay

T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def policy(**kw: object) -> Policy:
    base: dict[str, object] = {
        "min_replicas": 1,
        "max_replicas": 6,
        "busy_fraction": 0.5,
        "queued_per_worker": None,
        "up_seconds": 0.0,
        "down_seconds": 10.0,
        "max_step": 2,
    }
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


def pods(n: int, *, ready: bool = True, terminating: tuple[int, ...] = ()) -> list[PodView]:
    return [
        PodView(f"demo-{i}", f"10.0.0.{i + 1}", "Running", ready, i in terminating)
        for i in range(n)
    ]


def loads(*busy: float, capacity: float = 4, queued: float = 0) -> dict[str, Load]:
    return {f"demo-{i}": Load(b, queued, capacity) for i, b in enumerate(busy)}


def test_policy_from_spec_with_defaults() -> None:
    assert autoscale.policy_of({"autoscaling": {"maxReplicas": 3}}) is None
    p = autoscale.policy_of({"autoscaling": {"enabled": True, "maxReplicas": 3}})
    assert p == Policy(1, 3, 0.8, None, 0.0, 300.0, 4)
    q = autoscale.policy_of(
        {"autoscaling": {"enabled": True, "maxReplicas": 3, "target": {"queuedPerWorker": 2}}}
    )
    assert q is not None and (q.busy_fraction, q.queued_per_worker) == (None, 2.0)


def test_parse_load_reads_the_three_gauges() -> None:
    text = (
        "# TYPE patio_executor_busy gauge\npatio_executor_busy 3.0\n"
        "patio_executor_queued 5.0\npatio_executor_capacity 4.0\n"
        "patio_executor_busy_other 99\n"
    )
    assert autoscale.parse_load(text) == Load(3.0, 5.0, 4.0)
    assert autoscale.parse_load("patio_executor_busy 1\n") == Load(1.0, 0.0, None)
    assert autoscale.parse_load("patio_calls_total 3\n") is None


def test_recommend_follows_demand_within_bounds() -> None:
    p = policy()  # half of 4 slots: 2 calls per worker
    assert autoscale.recommend(p, 2, [Load(4, 4, 4), Load(4, 0, 4)])[0] == 6  # 12 calls / 2
    assert autoscale.recommend(p, 2, [Load(4, 40, 4), Load(4, 0, 4)])[0] == 6  # capped at max
    assert autoscale.recommend(p, 3, [Load(0, 0, 4)] * 3)[0] == 1  # idle: min
    assert autoscale.recommend(p, 3, [Load(2, 0, 4)] * 3)[0] == 3  # on target
    assert autoscale.recommend(p, 3, [])[0] == 3  # no data: keep
    # queuedPerWorker: a worker carries its 4 slots plus 1 waiting call.
    q = policy(busy_fraction=None, queued_per_worker=1.0)
    assert autoscale.recommend(q, 2, [Load(4, 6, 4), Load(4, 6, 4)])[0] == 4  # 20 / 5
    # Both targets: the stricter one (more workers) wins.
    both = policy(busy_fraction=0.5, queued_per_worker=1.0)
    assert autoscale.recommend(both, 2, [Load(4, 6, 4), Load(4, 6, 4)])[0] == 6


def test_tolerance_keeps_the_count_near_the_target() -> None:
    p = policy()
    # 6.5 calls over 3 workers carrying 2 each: 8% off target.
    assert autoscale.recommend(p, 3, [Load(2, 0.5, 4), Load(2, 0, 4), Load(2, 0, 4)])[0] == 3


def test_scale_up_is_immediate_without_a_window_and_bounded_by_max_step() -> None:
    d = autoscale.decide(
        policy(), current=1, pods=pods(1), loads=loads(4, queued=8), pending=None, now=T0
    )
    assert d.replicas == 3 and d.pending is None  # wants 6, maxStep 2
    assert d.reason.startswith("scaled up from 1 to 3")


def test_scale_up_waits_for_its_window_and_takes_the_lowest_recommendation() -> None:
    p = policy(up_seconds=10.0)
    d1 = autoscale.decide(
        p, current=1, pods=pods(1), loads=loads(4, queued=8), pending=None, now=T0
    )
    assert d1.replicas == 1 and d1.pending == Pending("Up", T0, 6)
    later = T0 + timedelta(seconds=5)
    d2 = autoscale.decide(p, current=1, pods=pods(1), loads=loads(4), pending=d1.pending, now=later)
    assert d2.replicas == 1 and d2.pending == Pending("Up", T0, 2)
    done = T0 + timedelta(seconds=10)
    d3 = autoscale.decide(
        p, current=1, pods=pods(1), loads=loads(4, queued=8), pending=d2.pending, now=done
    )
    assert d3.replicas == 2  # the lowest asked for during the window


def test_scale_up_waits_for_members_that_are_not_ready_yet() -> None:
    starting = pods(3)
    starting[2] = PodView("demo-2", "", "Pending", False, False)
    d = autoscale.decide(
        policy(), current=3, pods=starting, loads=loads(4, 4, queued=4), pending=None, now=T0
    )
    assert d.replicas == 3 and "ready" in d.reason
    # A crash-looping member brings no capacity: it does not hold scale-up back.
    starting[2] = PodView("demo-2", "10.0.0.3", "Running", False, False, "worker: CrashLoopBackOff")
    d = autoscale.decide(
        policy(), current=3, pods=starting, loads=loads(4, 4, queued=4), pending=None, now=T0
    )
    assert d.replicas == 5


def test_scale_down_after_the_window_removes_idle_top_members() -> None:
    p = policy(down_seconds=10.0, max_step=4)
    d1 = autoscale.decide(p, current=4, pods=pods(4), loads=loads(0, 0, 0, 0), pending=None, now=T0)
    assert d1.replicas == 4 and d1.pending == Pending("Down", T0, 1)
    # A burst during the window raises the floor (the highest recommendation wins).
    mid = T0 + timedelta(seconds=5)
    d2 = autoscale.decide(
        p, current=4, pods=pods(4), loads=loads(2, 2, 0, 0), pending=d1.pending, now=mid
    )
    assert d2.pending == Pending("Down", T0, 2)
    end = T0 + timedelta(seconds=10)
    d3 = autoscale.decide(
        p, current=4, pods=pods(4), loads=loads(0, 0, 0, 0), pending=d2.pending, now=end
    )
    assert d3.replicas == 2 and d3.pending is None


def test_scale_down_waits_for_a_busy_top_member_then_drains_it() -> None:
    p = policy(down_seconds=10.0, max_step=4)
    pending = Pending("Down", T0, 1)
    busy_top = loads(0, 0, 1)  # demo-2 (the one the StatefulSet removes) is busy
    d = autoscale.decide(
        p, current=3, pods=pods(3), loads=busy_top, pending=pending, now=T0 + timedelta(seconds=10)
    )
    assert d.replicas == 3 and "demo-2 to go idle" in d.reason
    # After a second window the drain takes it anyway (its calls still finish).
    forced = autoscale.decide(
        p, current=3, pods=pods(3), loads=busy_top, pending=pending, now=T0 + timedelta(seconds=20)
    )
    assert forced.replicas == 1


def test_never_below_a_draining_member_and_no_decision_while_one_drains() -> None:
    d = autoscale.decide(
        policy(down_seconds=0.0),
        current=2,
        pods=pods(3, terminating=(2,)),
        loads=loads(0, 0),
        pending=None,
        now=T0,
    )
    assert d.replicas == 2 and "demo-2" in d.reason and "draining" in d.reason


def test_scale_down_needs_every_ready_member_reporting() -> None:
    d = autoscale.decide(
        policy(down_seconds=0.0), current=3, pods=pods(3), loads=loads(0, 0), pending=None, now=T0
    )
    assert d.replicas == 3 and "reported" in d.reason


def test_out_of_bounds_replicas_are_clamped() -> None:
    d = autoscale.decide(
        policy(max_replicas=4), current=9, pods=pods(9), loads={}, pending=None, now=T0
    )
    assert d.replicas == 4 and "clamped" in d.reason


def test_a_change_of_direction_resets_the_window() -> None:
    p = policy(up_seconds=10.0)
    up = Pending("Up", T0, 4)
    d = autoscale.decide(p, current=2, pods=pods(2), loads=loads(0, 0), pending=up, now=T0)
    assert d.pending is not None and d.pending.direction == "Down"
    steady = autoscale.decide(p, current=2, pods=pods(2), loads=loads(2, 2), pending=up, now=T0)
    assert steady.pending is None and steady.replicas == 2


def test_pending_round_trips_through_status() -> None:
    pending = Pending("Down", T0, 3)
    assert autoscale.pending_from_status(pending.to_status()) == pending
    assert autoscale.pending_from_status({"direction": "Sideways", "since": "x"}) is None
    assert autoscale.pending_from_status(None) is None


@pytest.mark.parametrize(("failures", "delay"), [(0, 0), (1, 1), (2, 2), (5, 16), (9, 30)])
def test_retry_backoff_doubles_up_to_the_resync_interval(failures: int, delay: float) -> None:
    assert retry_delay(failures, 30.0) == delay


def test_resync_visits_failed_clusters_at_their_retry_time_and_samples_autoscaled_ones() -> None:
    c: dict[str, object] = {"metadata": {"name": "a"}, "spec": {}}
    assert not resync.due(c, 99.0, 100.0, 30.0, retry_at=101.0)
    assert resync.due(c, 99.0, 100.0, 30.0, retry_at=100.0)
    assert not resync.autoscaled(c)
    c["spec"] = {"autoscaling": {"enabled": True, "maxReplicas": 2}}
    assert resync.autoscaled(c)


def test_sample_reads_real_workers_metrics_and_skips_silent_ones() -> None:
    import http.server
    import threading

    from patio_operator import loadprobe

    page = b"patio_executor_busy 2.0\npatio_executor_queued 1.0\npatio_executor_capacity 4.0\n"

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        # Port `port` on 127.0.0.1 answers; on 127.0.0.2 nobody listens.
        got = loadprobe.sample([("demo-0", "127.0.0.1"), ("demo-1", "127.0.0.2")], int(port))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert got == {"demo-0": Load(2.0, 1.0, 4.0)}


async def test_resync_runs_clusters_concurrently_within_its_bound() -> None:
    import asyncio
    import threading
    import time as time_

    from patio_operator.desired import Settings
    from patio_operator.reconciler import Config

    clusters = [{"metadata": {"namespace": "ns", "name": f"c{i}"}, "spec": {}} for i in range(10)]
    lock = threading.Lock()
    running, peak, done = 0, 0, set()

    class Reconciler:
        config = Config(settings=Settings(default_image="x"), rotation_tick_seconds=0.01)

        class kube:
            @staticmethod
            def list_clusters(namespaces: list[str]) -> list[dict[str, Any]]:
                return clusters

        @staticmethod
        def retry_at(key: tuple[str, str]) -> None:
            return None

        @staticmethod
        def reconcile(namespace: str, name: str) -> None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            time_.sleep(0.05)  # a pass is blocking API calls, run in a thread
            with lock:
                running -= 1
                done.add(name)

    task = asyncio.create_task(resync.resync_forever(Reconciler(), []))  # type: ignore[arg-type]
    try:
        while len(done) < len(clusters):
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert 1 < peak <= resync.MAX_CONCURRENT
