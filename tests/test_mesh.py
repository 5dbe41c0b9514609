"""The full mesh: membership, routing, forwarding, and faults with real processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from patio import NullExecutor, Registry, TCPClientBroker, TCPMeshBroker
from patio.broker.membership import parse_peers
from patio.errors import PeerConnectionError
from patio.executor import AsyncExecutor
from tests.conftest import Processes, free_port

KEY = "mesh-key"


class Mesh:
    def __init__(self, processes: Processes, size: int, key: str = KEY) -> None:
        self.processes = processes
        self.key = key
        self.port = free_port()
        self.hosts = [f"127.0.0.{i + 2}" for i in range(size)]
        self.members: dict[str, subprocess.Popen[bytes]] = {}

    def addresses(self) -> list[str]:
        return [f"{host}:{self.port}" for host in self.hosts]

    def start(self, index: int, key: str | None = None) -> subprocess.Popen[bytes]:
        host = self.hosts[index]
        peers = [a for a in self.addresses() if not a.startswith(f"{host}:")]
        proc = self.processes.python(
            "-m",
            "tests.mesh_member",
            f"node-{index}",
            host,
            str(self.port),
            key or self.key,
            *peers,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"READY"
        self.members[f"node-{index}"] = proc
        return proc

    def start_all(self) -> None:
        for index in range(len(self.hosts)):
            self.start(index)


@pytest.fixture
def mesh4(processes: Processes) -> Iterator[Mesh]:
    mesh = Mesh(processes, 4)
    mesh.start_all()
    yield mesh


async def wait_connected(broker: TCPMeshBroker | TCPClientBroker, count: int) -> None:
    async with asyncio.timeout(20):
        while sum(1 for p in broker.peers() if p.connected and p.names) < count:
            await asyncio.sleep(0.05)


def caller(mesh: Mesh, **kwargs: object) -> TCPMeshBroker:
    broker = TCPMeshBroker(
        NullExecutor(Registry()), key=mesh.key, node_id="caller", heartbeat_interval=1.0, **kwargs
    )
    return broker


async def test_calls_spread_over_every_member(mesh4: Mesh) -> None:
    async with caller(mesh4) as broker:
        broker.set_peers("static", parse_peers("\n".join(mesh4.addresses()), mesh4.port))
        await wait_connected(broker, 4)
        results = await asyncio.gather(*[broker.call("work", i, 0.01) for i in range(400)])
    assert [r[0] for r in results] == [i * 2 for i in range(400)]
    spread = Counter(r[1] for r in results)
    assert set(spread) == {f"node-{i}" for i in range(4)}
    assert min(spread.values()) > 40, spread


async def test_any_member_is_an_entry_point(mesh4: Mesh) -> None:
    """A client connected to one member reaches tasks that member forwards."""
    async with (
        NullExecutor(Registry()) as null,
        TCPClientBroker(null, key=mesh4.key) as client,
    ):
        await client.connect(mesh4.hosts[0], mesh4.port)
        results = await asyncio.gather(*[client.call("work", i, 0.01) for i in range(200)])
    assert [r[0] for r in results] == [i * 2 for i in range(200)]
    # The member it reached forwarded part of the load to the others.
    assert len({r[1] for r in results}) >= 2


async def kill_under_load(mesh: Mesh, retryable: bool) -> tuple[Counter[str], float]:
    outcomes: Counter[str] = Counter()
    async with caller(mesh) as broker:
        broker.set_peers("static", parse_peers("\n".join(mesh.addresses()), mesh.port))
        await wait_connected(broker, 4)
        killed_at: list[float] = []

        async def one(i: int) -> None:
            try:
                result = await broker.call("work", i, 0.5, timeout=20, retryable=retryable)
            except PeerConnectionError:
                outcomes["connection_error"] += 1
                # At once, not at the 20 s deadline (3 s: a loaded machine is slow).
                assert time.monotonic() - killed_at[0] < 3.0
            else:
                assert result[0] == i * 2
                outcomes["ok"] += 1

        calls = [asyncio.create_task(one(i)) for i in range(1000)]
        await asyncio.sleep(0.2)
        victim = mesh.members["node-1"]
        killed_at.append(time.monotonic())
        victim.send_signal(signal.SIGKILL)
        started = time.monotonic()
        await asyncio.gather(*calls)
        elapsed = time.monotonic() - started
        # The survivors keep serving. Their load reports (LOAD: the peak of
        # the last 100 ms) first settle from the storm just served; until then
        # routing rightly avoids whichever one reported the most calls, and on
        # a loaded machine a report can take a while: wait for all three.
        seen: set[str] = set()
        async with asyncio.timeout(15):
            while seen != {"node-0", "node-2", "node-3"}:
                await asyncio.sleep(0.1)
                seen |= set(await asyncio.gather(*[broker.call("whoami") for _ in range(60)]))
                assert "node-1" not in seen
    victim.wait(timeout=10)
    return outcomes, elapsed


async def test_sigkill_under_load_fails_only_that_peers_calls(mesh4: Mesh) -> None:
    outcomes, _ = await kill_under_load(mesh4, retryable=False)
    print("kill under load, no retries:", dict(outcomes))
    assert outcomes["ok"] + outcomes["connection_error"] == 1000
    assert 0 < outcomes["connection_error"] < 500


async def test_sigkill_under_load_with_retries_loses_nothing(mesh4: Mesh) -> None:
    outcomes, _ = await kill_under_load(mesh4, retryable=True)
    print("kill under load, retryable:", dict(outcomes))
    assert outcomes == Counter(ok=1000)


async def test_restarted_member_rejoins(mesh4: Mesh) -> None:
    async with caller(mesh4) as broker:
        broker.set_peers("static", parse_peers("\n".join(mesh4.addresses()), mesh4.port))
        await wait_connected(broker, 4)
        mesh4.members["node-2"].send_signal(signal.SIGKILL)
        mesh4.members["node-2"].wait(timeout=10)
        async with asyncio.timeout(10):
            while sum(1 for p in broker.peers() if p.connected) != 3:
                await asyncio.sleep(0.05)
        restarted = time.monotonic()
        mesh4.start(2)
        async with asyncio.timeout(10):
            while True:
                seen = await asyncio.gather(*[broker.call("whoami") for _ in range(40)])
                if "node-2" in seen:
                    break
                await asyncio.sleep(0.1)
        print(f"restarted member serving again after {time.monotonic() - restarted:.2f} s")


async def test_sigterm_drains_without_failing_calls(mesh4: Mesh) -> None:
    async with caller(mesh4) as broker:
        broker.set_peers("static", parse_peers("\n".join(mesh4.addresses()), mesh4.port))
        await wait_connected(broker, 4)
        calls = [asyncio.create_task(broker.call("work", i, 0.3)) for i in range(400)]
        await asyncio.sleep(0.1)
        mesh4.members["node-3"].send_signal(signal.SIGTERM)
        results = await asyncio.gather(*calls)
        assert [r[0] for r in results] == [i * 2 for i in range(400)]
        more = await asyncio.gather(*[broker.call("work", i, 0.01) for i in range(200)])
        assert "node-3" not in {r[1] for r in more}
        assert mesh4.members["node-3"].wait(timeout=15) == 0


async def test_members_with_different_keys_never_link(
    processes: Processes, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = Mesh(processes, 1)
    mesh.start(0, key="the-right-key")
    caplog.set_level(logging.WARNING, logger="patio")
    async with caller(mesh) as broker:  # caller holds KEY, not the member's key
        broker.add_peer(mesh.hosts[0], mesh.port)
        await asyncio.sleep(1.5)
        assert not any(p.connected for p in broker.peers())
    assert any("accepted key" in record.getMessage() for record in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


rpc = Registry(project="in-process", auto_naming=False)


@rpc("node")
async def node_name(delay: float) -> str:
    await asyncio.sleep(delay)
    return "served"


async def test_key_rotation_across_a_running_mesh_loses_no_call() -> None:
    port_a, port_b = free_port(), free_port()
    async with (
        AsyncExecutor(rpc) as ex_a,
        AsyncExecutor(rpc) as ex_b,
        TCPMeshBroker(ex_a, key="A", node_id="a") as a,
        TCPMeshBroker(ex_b, key="A", node_id="b") as b,
    ):
        await a.listen("127.0.0.1", port_a)
        await b.listen("127.0.0.1", port_b)
        a.add_peer("127.0.0.1", port_b)
        b.add_peer("127.0.0.1", port_a)
        await wait_connected(a, 1)
        stop = asyncio.Event()
        outcomes: Counter[str] = Counter()

        async def load() -> None:
            while not stop.is_set():
                try:
                    await a.call("node", 0.001, timeout=5)
                    outcomes["ok"] += 1
                except Exception as exc:  # pragma: no cover - the assertion shows it
                    outcomes[type(exc).__name__] += 1

        loaders = [asyncio.create_task(load()) for _ in range(8)]
        for broker in (a, b):  # step 1: present A, accept B
            broker.set_keys("A", ["B"])
        await asyncio.sleep(0.2)
        for broker in (a, b):  # step 2: present B, still accept A
            broker.set_keys("B", ["A"])
        await asyncio.sleep(0.2)
        for broker in (a, b):  # step 3: B only
            broker.set_keys("B")
        # From now on a newcomer holding only A is refused, one holding B joins.
        async with NullExecutor(Registry()) as null:
            for key, joins in (("A", False), ("B", True)):
                async with TCPClientBroker(null, key=key, connect_timeout=1) as newcomer:
                    if joins:
                        await newcomer.connect("127.0.0.1", port_a)
                        assert await newcomer.call("node", 0, timeout=5) == "served"
                    else:
                        with pytest.raises(PeerConnectionError, match="accepted key"):
                            await newcomer.connect("127.0.0.1", port_a)
        stop.set()
        await asyncio.gather(*loaders)
    assert set(outcomes) == {"ok"}, outcomes
    assert outcomes["ok"] > 50


async def test_peers_file_bad_updates_keep_the_last_good_membership(tmp_path: Path) -> None:
    port_b = free_port()
    peers_file = tmp_path / "peers"
    peers_file.write_text(f"127.0.0.1:{port_b}\n")
    async with (
        AsyncExecutor(rpc) as ex_a,
        AsyncExecutor(rpc) as ex_b,
        TCPMeshBroker(ex_a, key="k", node_id="a") as a,
        TCPMeshBroker(ex_b, key="k", node_id="b") as b,
    ):
        await b.listen("127.0.0.1", port_b)
        a.watch_peers_file(peers_file)
        await wait_connected(a, 1)
        for bad in ("not an address:xx\n", "", None):
            if bad is None:
                peers_file.unlink()
            else:
                tmp = tmp_path / "peers.tmp"
                tmp.write_text(bad)
                os.replace(tmp, peers_file)  # atomic, as Kubernetes does
            await asyncio.sleep(1.5)
            assert [p.address for p in a.peers()] == [("127.0.0.1", port_b)]
            assert await a.call("node", 0, timeout=5) == "served"


async def test_dns_membership_finds_every_record() -> None:
    port = free_port()
    async with (
        AsyncExecutor(rpc) as ex_a,
        AsyncExecutor(rpc) as ex_b,
        TCPMeshBroker(ex_a, key="k", node_id="a") as a,
        TCPMeshBroker(ex_b, key="k", node_id="b") as b,
    ):
        await b.listen("127.0.0.1", port)
        a.watch_dns("localhost", port, interval=0.5)
        await wait_connected(a, 1)
        assert ("127.0.0.1", port) in {p.address for p in a.peers()}


async def test_doubled_links_resolve_to_one_per_pair() -> None:
    ports = [free_port() for _ in range(3)]
    async with (
        AsyncExecutor(rpc) as e0,
        AsyncExecutor(rpc) as e1,
        AsyncExecutor(rpc) as e2,
    ):
        brokers = [TCPMeshBroker(e, key="k", node_id=f"n{i}") for i, e in enumerate((e0, e1, e2))]
        for broker in brokers:
            await broker.setup()
        try:
            for broker, port in zip(brokers, ports, strict=True):
                await broker.listen("127.0.0.1", port)
            for broker in brokers:  # everyone dials everyone (and itself)
                for port in ports:
                    broker.add_peer("127.0.0.1", port)
            for broker in brokers:
                await wait_connected(broker, 2)
            await asyncio.sleep(0.5)
            for broker in brokers:
                open_links = [p for p in broker.links() if not p.link.closed]
                assert len(open_links) == 2, [p.node_id for p in open_links]
                results = await asyncio.gather(*[broker.call("node", 0) for _ in range(20)])
                assert results == ["served"] * 20
        finally:
            for broker in brokers:
                await broker.close()


@pytest.mark.slow
async def test_sixteen_member_mesh_connects(processes: Processes) -> None:
    mesh = Mesh(processes, 16)
    started = time.monotonic()
    mesh.start_all()
    async with caller(mesh) as broker:
        broker.set_peers("static", parse_peers("\n".join(mesh.addresses()), mesh.port))
        await wait_connected(broker, 16)
        # Every member reports all 15 others: ask each through the mesh.
        seen = set(await asyncio.gather(*[broker.call("whoami") for _ in range(400)]))
    elapsed = time.monotonic() - started
    print(f"16-member mesh fully connected and serving in {elapsed:.2f} s")
    assert len(seen) == 16


async def _outside_load(mesh: Mesh, concurrency: tuple[int, int], calls: int) -> list[float]:
    """Two outside callers, each on its own member, in closed loops; each entry's forwarded share.

    Each caller makes ``calls`` calls per 64 in flight after as many of warm-up (the
    first calls meet a mesh whose load reports are not in yet, and are not counted);
    a call counts only if both callers were in that second half when it was made
    and when it returned.
    """
    async with (
        NullExecutor(Registry()) as null0,
        NullExecutor(Registry()) as null1,
        TCPClientBroker(null0, key=mesh.key) as client0,
        TCPClientBroker(null1, key=mesh.key) as client1,
    ):
        clients = (client0, client1)
        for client, host in zip(clients, mesh.hosts, strict=True):
            await client.connect(host, mesh.port)
        async with asyncio.timeout(20):  # the members have linked: node-0 forwards to node-1
            while (
                len(
                    {
                        r[1]
                        for r in await asyncio.gather(
                            *[client0.call("work", 0, 0.05) for _ in range(40)]
                        )
                    }
                )
                < 2
            ):
                await asyncio.sleep(0.1)

        # Only calls made while both callers are past their warm-up and still
        # making calls count: when one caller has finished, the other's member
        # rightly hands calls to the idle one, and on a loaded machine which
        # caller finishes first (and how long that tail lasts) is chance.
        totals = [calls * width // 64 for width in concurrency]
        made = [0, 0]

        def steady() -> bool:
            return all(t < m < 2 * t for t, m in zip(totals, made, strict=True))

        async def loop(index: int, served: Counter[str]) -> None:
            client, total = clients[index], totals[index]

            async def worker() -> None:
                while made[index] < 2 * total:
                    made[index] += 1
                    counted = steady()
                    node = (await client.call("work", 1, 0.02))[1]
                    if counted and steady():
                        served[node] += 1

            await asyncio.gather(*[worker() for _ in range(concurrency[index])])

        served: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
        await asyncio.gather(*[loop(i, s) for i, s in enumerate(served)])
    counted = [s.total() for s in served]
    assert min(counted) >= 500, f"too few calls made while both callers ran: {counted}"
    shares = [1 - s[f"node-{i}"] / s.total() for i, s in enumerate(served)]
    print(f"forwarded shares with {concurrency} in flight: {shares} (of {counted} calls)")
    return shares


async def test_equally_loaded_members_keep_outside_calls(processes: Processes) -> None:
    """Load figures travel between members: equal loads forward (almost) nothing."""
    mesh = Mesh(processes, 2)
    mesh.start_all()
    forwarded = await _outside_load(mesh, (64, 64), 2000)
    assert max(forwarded) <= 0.10, forwarded


async def test_calls_shift_from_a_member_twice_as_loaded(processes: Processes) -> None:
    mesh = Mesh(processes, 2)
    mesh.start_all()
    forwarded = await _outside_load(mesh, (128, 64), 2000)
    # Balanced would be 96 calls in flight on each: a quarter of node-0's calls move.
    assert forwarded[0] >= 0.10, forwarded
    assert forwarded[1] <= 0.05, forwarded
