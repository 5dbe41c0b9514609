"""Real worker processes on real sockets: calls, metrics, health, drain, key rotation.

Workers are `python -m patio worker` subprocesses in their own sessions; the
`spawn` fixture kills every process group it started, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from patio.broker import TCPClientBroker, TCPMeshBroker
from patio.errors import CallTimeoutError, NoRouteError, PeerConnectionError
from patio.executor import NullExecutor
from patio.registry import Registry

from .conftest import Spawner
from .helpers import free_port, http_get, run_patio, sample_sum, scrape

# Strong keys: a weak key's published fingerprint is the same for all weak
# keys (patio/proto/keys.py), and this test watches the fingerprint change.
KEY_A, KEY_B, KEY_C = (f"key-{n}-0123456789abcdefghijklmnopqrstuv" for n in "ABC")


def write_key(path: Path, key: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(key + "\n")
    os.replace(tmp, path)


def mesh_pair(spawn: Spawner, *extra: str, extra_b: tuple[str, ...] = ()) -> tuple[Any, Any]:
    pa, pb = free_port(), free_port()
    a = spawn.worker("--peers", f"127.0.0.1:{pb}", *extra, port=pa, node_id="wa")
    b = spawn.worker("--peers", f"127.0.0.1:{pa}", *extra, *extra_b, port=pb, node_id="wb")
    a.wait_ready()
    b.wait_ready()
    return a, b


@contextlib.asynccontextmanager
async def caller(addresses: list[tuple[str, int]], key: str) -> AsyncIterator[TCPMeshBroker]:
    """A call-only mesh member (NullExecutor) connected to every given worker."""
    async with NullExecutor(Registry()) as executor:
        broker = TCPMeshBroker(executor, key=key.encode(), node_id="test-caller")
        async with broker:
            for host, port in addresses:
                broker.add_peer(host, port)
            deadline = time.monotonic() + 15
            while sum(p.connected for p in broker.peers()) < len(addresses):
                assert time.monotonic() < deadline, broker.peers()
                await asyncio.sleep(0.02)
            yield broker


def executed(workers: list[Any], task: str, outcome: str = "ok") -> float:
    return sum(
        sample_sum(scrape(w.metrics_url + "/metrics"), "patio_calls_finished_total",
                   task=task, side="executor", outcome=outcome)
        for w in workers
    )  # fmt: skip


@pytest.mark.slow
def test_patio_call_metrics_health_and_clean_exit(spawn: Spawner, tmp_path: Path) -> None:
    key = tmp_path / "key"
    write_key(key, "cluster-key")
    a, b = mesh_pair(spawn, "--key-file", str(key), extra_b=("--log-format", "json"))
    assert executed([a, b], "mul") == 0

    for i in range(5):
        result = run_patio("call", "--peer", a.address, "--key-file", str(key), "mul", str(i), "7")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == i * 7
    echo = run_patio("call", "--peer", b.address, "--key", "cluster-key", "echo",
                     '{"a": [1, 2]}', "plain text", "2.5")  # fmt: skip
    assert json.loads(echo.stdout) == [{"a": [1, 2]}, "plain text", 2.5]
    failed = run_patio("call", "--peer", a.address, "--key-file", str(key), "fail", '"boom"')
    assert failed.returncode == 1
    assert "ValueError: boom" in failed.stderr
    wrong_key = run_patio("call", "--peer", a.address, "--key", "wrong", "--timeout", "2",
                          "mul", "1", "2")  # fmt: skip
    assert wrong_key.returncode == 1 and "cannot connect" in wrong_key.stderr

    # Counters moved by exactly what we did, wherever the mesh ran the calls.
    # `patio call` is an outside caller: the member it dials may forward the
    # call one hop; that member counts it under side="forwarder", so the
    # executor side counts each call exactly once across the cluster.
    pages = [scrape(w.metrics_url + "/metrics") for w in (a, b)]
    finished = sum(sample_sum(p, "patio_calls_finished_total", side="executor") for p in pages)
    forwarded = sum(sample_sum(p, "patio_calls_forwarded_total") for p in pages)
    relayed = sum(sample_sum(p, "patio_calls_finished_total", side="forwarder") for p in pages)
    assert finished == 7  # 5 mul + 1 echo + 1 fail
    assert relayed == forwarded
    assert executed([a, b], "mul") == 5
    assert executed([a, b], "fail", "error") == 1
    assert sum(sample_sum(p, "patio_calls_in_flight", side="executor") for p in pages) == 0
    samples = scrape(a.metrics_url + "/metrics")
    assert sample_sum(samples, "patio_peers_connected") == 1
    assert sample_sum(samples, "patio_handshake_failures_total") >= 1  # the wrong key
    assert sample_sum(samples, "patio_worker_info", node_id="wa") == 1
    assert sample_sum(samples, "patio_draining") == 0
    assert sample_sum(samples, "patio_bytes_received_total") > 0

    status, body = http_get(a.metrics_url + "/livez")
    assert status == 200 and body.startswith("ok")
    status, body = http_get(a.metrics_url + "/readyz")
    assert (status, body) == (200, "ok (links to 1 of 1 members)\n")

    # SIGTERM: clean drain, exit 0; the other worker loses its only peer but
    # is still the one serving member: it stays ready (in its Service) and
    # serves, and names the member it misses.
    a.terminate()
    assert a.wait(30) == 0
    assert "drained cleanly" in a.log()
    deadline = time.monotonic() + 10
    while "missing: wa" not in (verbose := http_get(b.metrics_url + "/readyz?verbose"))[1]:
        assert time.monotonic() < deadline, verbose
        time.sleep(0.1)
    assert verbose[0] == 200 and verbose[1].startswith("ok (links to 0 of 1 members)"), verbose
    assert sample_sum(scrape(b.metrics_url + "/metrics"), "patio_peers_missing") == 1
    alone = run_patio("call", "--peer", b.address, "--key-file", str(key), "mul", "3", "3")
    assert alone.stdout == "9\n", alone.stderr
    # --log-format json: one object per line with ts, level, logger, msg
    lines = [json.loads(line) for line in b.log().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(entry) for entry in lines)
    assert any("listening on" in entry["msg"] for entry in lines)


async def run_lanes(
    broker: TCPMeshBroker, lanes: int, stop: asyncio.Event, retryable: bool
) -> tuple[int, list[BaseException]]:
    ok = 0
    errors: list[BaseException] = []

    async def lane() -> None:
        nonlocal ok
        while not stop.is_set():
            try:
                await broker.call("sleep", 0.02, timeout=10, retryable=retryable)
                ok += 1
            except Exception as exc:
                errors.append(exc)

    await asyncio.gather(*(lane() for _ in range(lanes)))
    return ok, errors


@pytest.mark.slow
async def test_sigterm_under_load_drains_without_failing_a_call(
    spawn: Spawner, tmp_path: Path
) -> None:
    key = tmp_path / "key"
    write_key(key, "drain-key")
    a, b = mesh_pair(spawn, "--key-file", str(key), "--drain-timeout", "10")
    async with caller([(a.host, a.port), (b.host, b.port)], "drain-key") as broker:
        stop = asyncio.Event()
        # retryable=False on purpose: a graceful drain alone must lose nothing.
        load = asyncio.ensure_future(run_lanes(broker, 32, stop, retryable=False))
        try:
            await asyncio.sleep(1.0)
            b_before = executed([b], "sleep")
            assert b_before > 0, "the worker to be drained got no work before SIGTERM"
            b.terminate()
            code = await asyncio.to_thread(b.wait, 30)
            await asyncio.sleep(0.5)  # keep calling after b is gone
        finally:
            stop.set()
            ok, errors = await load
    assert errors == [], errors[:3]
    assert code == 0, b.log()
    assert "drained cleanly" in b.log()
    assert ok > 200
    assert executed([a], "sleep") + b_before <= ok


def kube_secret(
    directory: Path,
    version: int,
    files: dict[str, str],
    names: tuple[str, ...] = ("key", "next-key"),
) -> None:
    """Publish ``files`` the way the kubelet updates a mounted Secret: a new
    ``..N`` directory, an atomic swap of the ``..data`` symlink, and per-file
    symlinks through it (a file missing from the new version dangles)."""
    data = directory / f"..{version}"
    data.mkdir(parents=True)
    for name, content in files.items():
        (data / name).write_text(content)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, directory / "..data")
    for name in names:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def fingerprints(workers: list[Any]) -> set[str]:
    out = set()
    for worker in workers:
        for (name, labels), value in scrape(worker.metrics_url + "/metrics").items():
            if name == "patio_auth_keys_info" and value == 1:
                out.add(dict(labels)["primary"])
    return out


async def can_connect(worker: Any, key: str, *accepted: str) -> bool:
    """Whether a new caller holding ``key`` (and accepting ``accepted``) gets in.

    Authentication is mutual: the worker must accept the caller's key *and*
    the caller must accept the key the worker presents.
    """
    async with NullExecutor(Registry()) as executor:
        client = TCPClientBroker(executor, key=key, accepted_keys=accepted, connect_timeout=3.0)
        async with client:
            try:
                await client.connect(worker.host, worker.port)
                # connect() can return before the worker has checked our proof
                # (the client verifies the worker first), so a call decides.
                return bool(await client.call("mul", 2, 3, timeout=5) == 6)
            except (PeerConnectionError, NoRouteError, CallTimeoutError):
                return False


@pytest.mark.slow
async def test_key_rotation_by_files_loses_no_call(spawn: Spawner, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    kube_secret(secret, 1, {"key": KEY_A})
    files = ("--key-file", str(secret / "key"), "--next-key-file", str(secret / "next-key"))
    a, b = mesh_pair(spawn, *files, "--drain-timeout", "10")
    before = fingerprints([a, b])
    assert len(before) == 1

    async with caller([(a.host, a.port), (b.host, b.port)], KEY_A) as broker:
        stop = asyncio.Event()
        load = asyncio.ensure_future(run_lanes(broker, 8, stop, retryable=False))
        try:
            # 1. present A, accept A and B
            kube_secret(secret, 2, {"key": KEY_A, "next-key": KEY_B})
            await asyncio.sleep(2.0)
            assert await can_connect(a, KEY_B, KEY_A)  # B is accepted already
            assert not await can_connect(a, KEY_C, KEY_A)
            assert fingerprints([a, b]) == before

            # 2. present B, still accept A
            kube_secret(secret, 3, {"key": KEY_B, "next-key": KEY_A})
            deadline = time.monotonic() + 10
            while True:
                now = fingerprints([a, b])
                if len(now) == 1 and now != before:
                    break
                assert time.monotonic() < deadline, now
                await asyncio.sleep(0.2)
            broker.set_keys(KEY_B.encode(), accepted_keys=(KEY_A.encode(),))
            assert await can_connect(b, KEY_A, KEY_B)  # A still accepted
            assert await can_connect(b, KEY_B)

            # 3. present B, A refused
            kube_secret(secret, 4, {"key": KEY_B})
            await asyncio.sleep(2.0)
            assert not await can_connect(a, KEY_A, KEY_B)  # A refused now
            assert await can_connect(a, KEY_B)
            # the command line caller too
            result = await asyncio.to_thread(
                run_patio, "call", "--peer", a.address, "--key", KEY_B, "mul", "4", "5"
            )
            assert result.stdout.strip() == "20", result.stderr

            # new links between the workers handshake with B: restart one of them
            b.terminate()
            assert await asyncio.to_thread(b.wait, 30) == 0
            b2 = spawn.worker(*b.args[1:], port=b.port, metrics_port=b.metrics_port)
            await asyncio.to_thread(b2.wait_ready)
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            ok, errors = await load
    assert errors == [], errors[:3]
    assert ok > 100
    status, body = http_get(b2.metrics_url + "/readyz")
    assert status == 200, body


@pytest.mark.slow
async def test_second_signal_exits_at_once(spawn: Spawner, tmp_path: Path) -> None:
    worker = spawn.worker("--key", "k", "--drain-timeout", "60")
    worker.wait_ready()
    async with caller([(worker.host, worker.port)], "k") as broker:
        pending = asyncio.ensure_future(broker.call("sleep", 30, timeout=60))
        await asyncio.sleep(0.5)
        worker.terminate()  # drain: waits for the 30 s call
        deadline = time.monotonic() + 10
        while http_get(worker.metrics_url + "/readyz") != (503, "draining\n"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert sample_sum(scrape(worker.metrics_url + "/metrics"), "patio_draining") == 1
        assert worker.proc.poll() is None
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGINT)  # the second signal
        code = await asyncio.to_thread(worker.wait, 10)
        assert time.monotonic() - started < 5
        assert code == 1
        assert "exiting without waiting" in worker.log()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pending, 5)


@pytest.mark.slow
def test_peers_from_dns_and_from_a_watched_file(spawn: Spawner, tmp_path: Path) -> None:
    def connected(worker: Any) -> float:
        return sample_sum(scrape(worker.metrics_url + "/metrics"), "patio_peers_connected")

    def within(seconds: float, done: Callable[[], bool], worker: Any) -> None:
        # Generous: the peers file is polled every second and DNS every five,
        # and a loaded 2-core machine can add seconds to either.
        deadline = time.monotonic() + seconds
        while not done():
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.2)

    b = spawn.worker("--key", "k", node_id="dns-b")
    b.wait_ready()
    # localhost resolves to 127.0.0.1 (where b is) and maybe ::1 (nobody).
    # Readiness does not wait for links (ready-peer-ratio 0): wait for the link.
    a = spawn.worker("--key", "k", "--peers-dns", f"localhost:{b.port}", node_id="dns-a")
    a.wait_ready()
    within(20, lambda: connected(a) == 1, a)

    peers = tmp_path / "peers"
    peers.write_text(f"# the mesh, so far\n{a.address}\n")
    c = spawn.worker("--key", "k", "--peers-file", str(peers), "--ready-peer-ratio", "1",
                     node_id="file-c")  # fmt: skip
    c.wait_ready()
    assert connected(c) == 1
    tmp = tmp_path / "peers.tmp"
    tmp.write_text(f"{a.address}\n{b.address}\n")
    os.replace(tmp, peers)  # atomic, as a ConfigMap update
    within(20, lambda: connected(c) == 2, c)
    tmp.write_text("not an address:x\n")
    os.replace(tmp, peers)
    within(20, lambda: "keeping the last good peer list" in c.log(), c)
    assert connected(c) == 2  # the last good set stays
    result = run_patio("call", "--peer", c.address, "--key", "k", "mul", "3", "5")
    assert result.stdout.strip() == "15", result.stderr
