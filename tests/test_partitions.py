"""Partitions and grey failures between real member processes in network namespaces.

Four members (tests/mesh_member.py, heartbeat 1 s) each in its own namespace,
on a bridge (tests/partition/lab.py). Two kinds of load run throughout:

- direct: this process is a mesh member connected to all four;
- via m2: a client connected to member 2 only, which serves or forwards.

For each fault, applied inside member 1's namespace and then removed, it
measures how long until calls route around member 1, whether any call
outlives its deadline, and how long member 1 takes to serve again once
healed. Every call is ``retryable`` with a CALL_TIMEOUT deadline. The table
printed at the end is the one in docs/hardening.md.

Needs root, ``ip`` and ``iptables`` (scripts/test.sh installs them). About 2 min.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from patio import NullExecutor, Registry, TCPClientBroker, TCPMeshBroker
from patio.broker.base import AbstractBroker
from tests.conftest import free_port
from tests.partition.lab import Lab, missing_tools

# Members listen on non-loopback addresses: a weak key would be refused there.
KEY = secrets.token_urlsafe(32)
SIZE = 4
VICTIM = 1
ENTRY = 2
CALL_TIMEOUT = 4.0
HANG_MARGIN = 1.0  # a call still running this long after its deadline hangs
SLOW = 1.0  # a call slower than this (normal: ~10 ms) was hurt by the fault
FAULT_SECONDS = 9.0
REJOIN_LIMIT = 15.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


@dataclass
class Call:
    lane: str
    started: float
    ended: float = 0.0
    node: str = ""
    error: str = ""


@dataclass
class Load:
    calls: list[Call] = field(default_factory=list)
    running: bool = True

    async def lane(self, name: str, broker: AbstractBroker) -> None:
        n = 0
        while self.running:
            n += 1
            call = Call(name, time.monotonic())
            self.calls.append(call)
            try:
                async with asyncio.timeout(CALL_TIMEOUT + HANG_MARGIN + 5):
                    result = await broker.call(
                        "work", n, 0.01, timeout=CALL_TIMEOUT, retryable=True
                    )
                call.node = str(result[1])
            except Exception as exc:
                call.error = type(exc).__name__
            call.ended = time.monotonic()
            if call.error:
                await asyncio.sleep(0.05)


@dataclass
class Outcome:
    fault: str
    route_around: dict[str, float]
    worst: dict[str, float]
    hung: int
    failed: Counter[str]
    victim_share: dict[str, str]
    link_down: float | None
    rejoin: float | None
    calls: int


def analyse(
    load: Load, fault: str, fault_at: float, heal_at: float, link_down: float | None
) -> Outcome:
    # Calls the fault could touch: in flight when it began, or started while it lasted.
    touched = [c for c in load.calls if c.ended >= fault_at and c.started < heal_at]
    hung = sum(1 for c in touched if c.ended - c.started > CALL_TIMEOUT + HANG_MARGIN)
    route_around: dict[str, float] = {}
    worst: dict[str, float] = {}
    share: dict[str, str] = {}
    for lane in ("direct", "via-m2"):
        mine = [c for c in touched if c.lane.startswith(lane)]
        hurt = [c for c in mine if c.error or c.ended - c.started > SLOW]
        # New calls are no longer hurt once started this long after the fault.
        route_around[lane] = round(max([0.0, *(c.started - fault_at for c in hurt)]), 1)
        worst[lane] = round(max([0.0, *(c.ended - c.started for c in mine)]), 2)
        late = [c for c in mine if not c.error and c.started >= fault_at + FAULT_SECONDS / 2]
        on_victim = sum(1 for c in late if c.node == f"node-{VICTIM}")
        share[lane] = f"{on_victim}/{len(late)}"
    back = [
        c.ended - heal_at
        for c in load.calls
        if c.started >= heal_at and not c.error and c.node == f"node-{VICTIM}"
    ]
    return Outcome(
        fault=fault,
        route_around=route_around,
        worst=worst,
        hung=hung,
        failed=Counter(c.error for c in touched if c.error),
        victim_share=share,
        link_down=link_down,
        rejoin=round(min(back), 1) if back else None,
        calls=len(touched),
    )


async def watch_link(broker: TCPMeshBroker, since: float, found: list[float]) -> None:
    """Note when the direct caller stops counting m1 as connected."""
    while not found:
        if not any(p.node_id == f"node-{VICTIM}" and p.connected for p in broker.peers()):
            found.append(round(time.monotonic() - since, 1))
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"missing {missing}: scripts/test.sh installs iproute2 and iptables")
    lab = Lab(SIZE)
    lab.setup()
    try:
        yield lab
    finally:
        lab.teardown()


FAULTS: dict[str, Callable[[Lab], None]] = {
    "silent link (all packets dropped, no RST)": lambda lab: lab.silence(VICTIM),
    "one-way partition (m1 receives nothing)": lambda lab: lab.deafen(VICTIM),
    "m1 cut from half the mesh (m2, m3)": lambda lab: lab.cut(VICTIM, [2, 3]),
    "+200 ms latency (m1's packets)": lambda lab: lab.delay(VICTIM, 200),
    "5% packet loss (m1, both ways)": lambda lab: lab.lose(VICTIM, 0.05),
}


async def test_partitions_and_grey_failures(lab: Lab) -> None:
    port = free_port()
    addresses = [f"{lab.address(i)}:{port}" for i in range(SIZE)]
    for index in range(SIZE):
        peers = [a for a in addresses if not a.startswith(lab.address(index) + ":")]
        proc = lab.python(
            index, "-m", "tests.mesh_member", f"node-{index}", lab.address(index), str(port), KEY,
            *peers,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == b"READY", line
    outcomes = []
    async with (
        TCPMeshBroker(
            NullExecutor(Registry()), key=KEY, node_id="caller", heartbeat_interval=1.0
        ) as direct,
        NullExecutor(Registry()) as null,
        TCPClientBroker(null, key=KEY, heartbeat_interval=1.0) as via,
    ):
        for index in range(SIZE):
            direct.add_peer(lab.address(index), port)
        await via.connect(lab.address(ENTRY), port)
        async with asyncio.timeout(30):
            while sum(1 for p in direct.peers() if p.connected and p.names) < SIZE:
                await asyncio.sleep(0.1)
        for fault, apply in FAULTS.items():
            await wait_serving(direct, via)
            load = Load()
            lanes = [asyncio.create_task(load.lane(f"direct-{i}", direct)) for i in range(4)]
            lanes += [asyncio.create_task(load.lane(f"via-m2-{i}", via)) for i in range(2)]
            await asyncio.sleep(1.0)
            fault_at = time.monotonic()
            apply(lab)
            link_down: list[float] = []
            watcher = asyncio.create_task(watch_link(direct, fault_at, link_down))
            await asyncio.sleep(FAULT_SECONDS)
            watcher.cancel()
            heal_at = time.monotonic()
            lab.heal(VICTIM)
            deadline = heal_at + REJOIN_LIMIT
            while time.monotonic() < deadline and not any(
                c.started >= heal_at and c.node == f"node-{VICTIM}" for c in load.calls
            ):
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            load.running = False
            await asyncio.gather(*lanes)
            outcome = analyse(load, fault, fault_at, heal_at, link_down[0] if link_down else None)
            print(outcome)
            outcomes.append(outcome)
    print_table(outcomes)
    for outcome in outcomes:
        assert outcome.hung == 0, outcome
        assert outcome.rejoin is not None and outcome.rejoin < REJOIN_LIMIT, outcome
    for outcome in outcomes[:3]:  # the hard faults: traffic leaves m1 within seconds
        for lane, seconds in outcome.route_around.items():
            assert seconds is not None and seconds < 3 * 1.0 + CALL_TIMEOUT + 2, (lane, outcome)


async def wait_serving(direct: TCPMeshBroker, via: TCPClientBroker) -> None:
    """Every member serves the direct caller, and member 2 answers."""
    async with asyncio.timeout(REJOIN_LIMIT + 10):
        while True:
            seen = await asyncio.gather(
                *[direct.call("work", i, 0.0, timeout=2) for i in range(40)],
                return_exceptions=True,
            )
            nodes = {r[1] for r in seen if isinstance(r, list)}
            if len(nodes) == SIZE:
                break
            await asyncio.sleep(0.2)
        await via.call("work", 0, 0.0, timeout=2)


def print_table(outcomes: list[Outcome]) -> None:
    print()
    print(
        "| fault | new calls avoid m1 after (direct / via m2) | slowest call (direct / via m2) "
        "| hung past deadline | failed | m1's share once settled (direct / via m2) "
        "| caller drops m1's link after | m1 serves again after heal |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in outcomes:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(o.failed.items())) or "none"
        down = "kept" if o.link_down is None else f"{o.link_down} s"
        print(
            f"| {o.fault} | {o.route_around['direct']} s / {o.route_around['via-m2']} s "
            f"| {o.worst['direct']} s / {o.worst['via-m2']} s "
            f"| {o.hung} of {o.calls} | {failed} "
            f"| {o.victim_share['direct']} / {o.victim_share['via-m2']} "
            f"| {down} | {o.rejoin} s |"
        )
