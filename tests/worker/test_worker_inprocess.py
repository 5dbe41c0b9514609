"""The runtime in-process, over a fake mesh broker: reloads, health, metrics, drain.

These pin the worker's own logic (what it asks the broker, what it serves on
HTTP) independent of the real TCP mesh; test_worker_cluster.py runs the same
things end to end with real processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from patio.stats import OUTCOME_ERROR, OUTCOME_OK, SIDE_CALLER, SIDE_EXECUTOR, BrokerStats
from patio.worker.config import ConfigError, load_config
from patio.worker.health import readiness
from patio.worker.logs import JsonFormatter
from patio.worker.metrics import MAX_TASK_LABELS, OTHER_TASK, WorkerMetrics
from patio.worker.runtime import Worker, build_ssl_contexts, load_registry

from .fakes import FakeMeshBroker, FakePeer
from .helpers import free_port, http_get


class Harness:
    def __init__(self, worker: Worker, task: asyncio.Task[int]) -> None:
        self.worker = worker
        self.task = task

    @property
    def broker(self) -> FakeMeshBroker:
        return self.worker.broker  # type: ignore[no-any-return]

    async def get(self, path: str) -> tuple[int, str]:
        assert self.worker.metrics_url
        return await asyncio.to_thread(http_get, self.worker.metrics_url + path)


async def start(argv: list[str], *, fake: bool = True) -> Harness:
    config = load_config(argv, {})
    worker = Worker(
        config, broker_factory=FakeMeshBroker if fake else None, install_signal_handlers=False
    )
    task = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED, timeout=10)
    if task.done():
        started.cancel()
        task.result()
    assert worker.started.is_set()
    return Harness(worker, task)


@pytest.fixture
async def harnesses() -> AsyncIterator[list[Harness]]:
    running: list[Harness] = []
    yield running
    for h in running:
        h.worker.request_stop()
        await asyncio.wait_for(asyncio.gather(h.task, return_exceptions=True), 10)


def base_args(*extra: str) -> list[str]:
    return [
        "patio_worker_testtasks:rpc",
        "--port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--node-id",
        "t1",
        *extra,
    ]


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_key_rotation_files_and_bad_file_keeps_last_good(
    tmp_path: Path, harnesses: list[Harness], caplog: pytest.LogCaptureFixture
) -> None:
    key, next_key = tmp_path / "key", tmp_path / "next-key"
    key.write_text("AAAA\n")
    h = await start(base_args("--key-file", str(key), "--next-key-file", str(next_key)))
    harnesses.append(h)
    assert (h.broker.key, h.broker.accepted_keys) == (b"AAAA", ())
    # step 1: present A, accept B
    next_key.write_text("BBBB")
    await until(lambda: h.broker.accepted_keys == (b"BBBB",))
    # step 2: present B, still accept A (both files swapped at once)
    tmp = tmp_path / "tmp"
    tmp.write_text("BBBB")
    os.replace(tmp, key)
    tmp.write_text("AAAA")
    os.replace(tmp, next_key)
    await until(lambda: (h.broker.key, h.broker.accepted_keys) == (b"BBBB", (b"AAAA",)))
    # a bad key file (empty) keeps the last good keys and says why
    history = len(h.broker.key_history)
    key.write_text("")
    await asyncio.sleep(1.5)
    assert len(h.broker.key_history) == history
    assert "key reload failed" in caplog.text and "is empty" in caplog.text
    # step 3: present B, accept only B (next key removed)
    key.write_text("BBBB")
    next_key.unlink()
    await until(lambda: (h.broker.key, h.broker.accepted_keys) == (b"BBBB", ()))
    # the fingerprint gauge follows the key set
    _, text = await h.get("/metrics")
    assert f'patio_auth_keys_info{{primary="{h.broker.key_fingerprint}"}} 1.0' in text


async def test_peers_file_reload_with_the_real_broker(
    tmp_path: Path, harnesses: list[Harness]
) -> None:
    peers = tmp_path / "peers"
    args = base_args("--key", "k", "--peers-file", str(peers), "--peers", "127.0.0.1:1,127.0.0.1:2")
    args += ["--max-frame-size", "1MiB", "--max-buffered-output", "32MiB"]
    args += ["--max-peer-call-bytes", "8MiB"]
    own = ("127.0.0.1", int(args[args.index("--port") + 1]))
    peers.write_text(f"127.0.0.1:3\n{own[0]}:{own[1]}\n")
    h = await start(args, fake=False)
    harnesses.append(h)
    settings = h.worker.broker.link_settings  # the limits reach the real broker
    assert (settings.max_frame_size, settings.max_buffered_output) == (1 << 20, 32 << 20)
    assert h.worker.broker._server.max_peer_call_bytes == 8 << 20

    def known() -> set[tuple[str, int]]:
        return {tuple(p.address) for p in h.worker.broker.peers()}  # type: ignore[misc]

    # static + file, and never ourselves
    await until(lambda: known() == {("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)})
    peers.write_text("127.0.0.1:4\n[::1]:5\n")
    await until(
        lambda: known() == {("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 4), ("::1", 5)}
    )
    peers.write_text("garbage:x\n")  # a broken file keeps the last good set
    await asyncio.sleep(1.5)
    assert known() == {("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 4), ("::1", 5)}
    # Ready without links (they decide nothing by default); ?verbose names the missing.
    status, body = await h.get("/readyz")
    assert (status, body) == (200, "ok (links to 0 of 4 members)\n")
    status, body = await h.get("/readyz?verbose")
    assert status == 200 and "[+] executor accepts calls" in body, body
    assert "missing: 127.0.0.1:4 (127.0.0.1:4: " in body and "missing: [::1]:5" in body, body
    _, text = await h.get("/metrics")
    assert "patio_peers_missing 4.0" in text


async def test_health_endpoints_and_drain(harnesses: list[Harness]) -> None:
    h = await start(
        base_args(
            "--peers",
            "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3,127.0.0.1:4",
            "--ready-peer-ratio",
            "0.5",
        )
    )
    harnesses.append(h)
    status, body = await h.get("/livez")
    assert status == 200 and body.startswith("ok (heartbeat"), body
    status, body = await h.get("/readyz")
    assert status == 503 and body == "links to 0 of 4 members (need 2)\n", body
    h.broker.connected = {("127.0.0.1", 1), ("127.0.0.1", 2)}
    status, body = await h.get("/readyz")
    assert status == 200, body
    assert (await h.get("/nope"))[0] == 404
    # metrics: broker counters at scrape time, histograms through the observers
    stats = h.broker.stats
    stats.calls_started[("mul", SIDE_EXECUTOR)] += 3
    stats.calls_finished[("mul", SIDE_EXECUTOR, OUTCOME_OK)] += 2
    stats.handshake_failures["bad_key"] += 1
    assert stats.call_observer is not None
    stats.call_observer("mul", SIDE_EXECUTOR, OUTCOME_OK, 0.003)
    _, text = await h.get("/metrics")
    assert 'patio_calls_started_total{side="executor",task="mul"} 3.0' in text
    assert 'patio_calls_finished_total{outcome="ok",side="executor",task="mul"} 2.0' in text
    assert 'patio_calls_in_flight{side="executor"} 1.0' in text
    assert 'patio_handshake_failures_total{reason="bad_key"} 1.0' in text
    assert 'patio_call_duration_seconds_count{side="executor",task="mul"} 1.0' in text
    assert "patio_peers_known 4.0" in text and "patio_peers_connected 2.0" in text
    assert 'patio_worker_info{node_id="t1"' in text and "patio_draining 0.0" in text
    assert "patio_executor_capacity 1024.0" in text
    # the loop's tasks: at least the worker's own (heartbeat, listener, this request)
    tasks = next(line for line in text.splitlines() if line.startswith("patio_event_loop_tasks "))
    assert float(tasks.split()[1]) >= 2, tasks
    # drain: /readyz turns 503 and run() returns 0
    h.worker.request_stop()
    await until(lambda: h.broker.draining)
    assert await asyncio.wait_for(h.task, 10) == 0
    harnesses.remove(h)


async def test_port_in_use_is_a_config_error(harnesses: list[Harness]) -> None:
    blocker = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"mesh port 127.0.0.1:{port} is already in use"):
            await start(["patio_worker_testtasks:rpc", "--port", str(port), "--metrics-port", "0"])
        with pytest.raises(ConfigError, match=f"metrics port 127.0.0.1:{port} is already in use"):
            await start(
                [
                    "patio_worker_testtasks:rpc",
                    "--port",
                    str(free_port()),
                    "--metrics-port",
                    str(port),
                ]
            )
    finally:
        blocker.close()


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match="no such module"):
        load_registry("no_such_module_xyz:rpc")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_registry("patio_worker_testtasks:nope")
    with pytest.raises(ConfigError, match=r"is a dict, not a patio\.Registry"):
        load_registry("patio_worker_testtasks:not_a_registry")
    with pytest.raises(ConfigError, match="RuntimeError: this module is broken on purpose"):
        load_registry("broken_registry_module:rpc")
    assert len(load_registry("patio_worker_testtasks:rpc")) >= 4


def test_tls_mismatch_and_good_pair(tmp_path: Path) -> None:
    ca = trustme.CA()
    one, two = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.2")
    cert, key, other_key, ca_file = (tmp_path / n for n in ("cert", "key", "other", "ca"))
    one.cert_chain_pems[0].write_to_path(str(cert))
    one.private_key_pem.write_to_path(str(key))
    two.private_key_pem.write_to_path(str(other_key))
    ca.cert_pem.write_to_path(str(ca_file))
    server, client = build_ssl_contexts(str(cert), str(key), str(ca_file))
    assert server.verify_mode.name == "CERT_REQUIRED" and client.verify_mode.name == "CERT_REQUIRED"
    with pytest.raises(ConfigError, match="does not match certificate"):
        build_ssl_contexts(str(cert), str(other_key), None)
    with pytest.raises(ConfigError, match="does not exist"):
        build_ssl_contexts(str(tmp_path / "missing"), str(key), None)


def test_readiness_rule() -> None:
    def ready(**kw: Any) -> bool:
        args: dict[str, Any] = {"listening": True, "draining": False, "accepting": True,
                                "known": 3, "connected": 0}  # fmt: skip
        return readiness(**{**args, **kw}).ready

    # The last serving member: every link gone, still listening and executing.
    assert ready(known=1, connected=0)
    assert ready(known=3, connected=0)
    assert not ready(listening=False)
    assert not ready(draining=True, connected=3)
    assert not ready(accepting=False, connected=3)
    # Only an explicit ratio makes links decide.
    assert ready(connected=2, ratio=0.5)
    assert not ready(connected=1, ratio=0.5)
    state = readiness(listening=True, draining=False, accepting=True, known=2, connected=1,
                      missing=("b (refused)",), node_id="a")  # fmt: skip
    assert state.reason == "ok (links to 1 of 2 members)"
    assert state.details[0] == "node a" and state.details[-1] == "missing: b (refused)"


class View:
    def __init__(self) -> None:
        self.stats = BrokerStats()
        self.node_id = "n"
        self.draining = False
        self.key_fingerprint = "abc"
        self.listening = [("127.0.0.1", 1)]

    def peers(self) -> list[FakePeer]:
        return []

    def membership_links(self) -> tuple[int, int, list[tuple[str, str]]]:
        return 0, 0, []


def test_task_label_cardinality_is_bounded() -> None:
    view = View()
    metrics = WorkerMetrics(view, version="test")
    for i in range(MAX_TASK_LABELS + 50):
        view.stats.calls_finished[(f"task{i}", SIDE_CALLER, OUTCOME_ERROR)] += 1
        metrics.observe_call(f"task{i}", SIDE_CALLER, OUTCOME_ERROR, 0.01)
    text = metrics.render().decode()
    assert (
        f'patio_calls_finished_total{{outcome="error",side="caller",task="{OTHER_TASK}"}} 50.0'
        in text
    )
    tasks = {
        line.split('task="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("patio_calls_finished_total{")
    }
    assert len(tasks) == MAX_TASK_LABELS + 1


def test_json_log_lines() -> None:
    record = logging.LogRecord("patio.worker", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "hello x" and entry["level"] == "info"
    assert entry["logger"] == "patio.worker" and entry["ts"].endswith("Z")


async def test_liveness_fails_when_the_heartbeat_is_stale() -> None:
    from patio.worker.health import Heartbeat

    beat = Heartbeat(interval=0.01)
    assert beat.check(5.0) == (False, "heartbeat task is not running")
    beat.start()
    await asyncio.sleep(0.05)
    assert beat.check(5.0)[0]
    time.sleep(0.3)  # block the loop, as a stuck task would
    ok, reason = beat.check(0.2)
    assert not ok and "event loop heartbeat is 0.3s old" in reason
    await asyncio.sleep(0.05)
    assert beat.check(0.2)[0]  # recovered once the loop runs again
    await beat.stop()
