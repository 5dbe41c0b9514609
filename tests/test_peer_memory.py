"""One link cannot hold huge memory (issue 16 item 6).

A key holder's calls wait here for an executor slot. What they hold while
they wait must be their bytes as they came, counted against a per-peer byte
budget, and a node id may hold only so many links.
"""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from patio import AsyncExecutor, ProcessPoolExecutor, Registry, TCPServerBroker, ThreadPoolExecutor
from patio.broker.tcp.links import MAX_LINKS_PER_NODE
from patio.proto import MessageType

from .test_bad_input import KEY, close_raw, handshake, scraped, sealed, wait_closed
from .test_hostile_peer import announce, raw_member

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leftover_tasks")]

MIB = 1024 * 1024


def empty_arrays_payload(count: int) -> bytes:
    """``[[[], [], ...], {}]``: one argument, a list of ``count`` empty lists.

    One byte each on the wire, a list object each once unpacked: the issue's
    2 MiB of them cost 143 MiB.
    """
    return b"\x92\x91\xdd" + count.to_bytes(4, "big") + b"\x90" * count + b"\x80"


def hold_payload(gate: Gate) -> bytes:
    return msgpack.packb([[gate.path], {}])


def bytes_payload(size: int) -> bytes:
    """``[[b"..."], {}]``: one bytes argument of ``size`` bytes."""
    return b"\x92\x91\xc6" + size.to_bytes(4, "big") + b"x" * size + b"\x80"


def hold_sync(gate: str) -> None:
    while not os.path.exists(gate):
        time.sleep(0.01)


async def hold_async(gate: str) -> None:
    await asyncio.to_thread(hold_sync, gate)


EXECUTORS: dict[str, Any] = {
    "async": (AsyncExecutor, hold_async),
    "thread": (ThreadPoolExecutor, hold_sync),
    "process": (ProcessPoolExecutor, hold_sync),
}


class Gate:
    """A file the holding task waits for (a thread or a child process sees it too)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def open(self) -> None:
        Path(self.path).touch()


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path / "gate")


async def serve(gate: Gate, kind: str = "async", **kwargs: Any) -> AsyncIterator[TCPServerBroker]:
    executor_class, hold = EXECUTORS[kind]
    rpc = Registry()
    rpc.register(hold, "hold")
    rpc.register(len, "take")
    async with (
        executor_class(rpc, max_workers=1) as executor,
        TCPServerBroker(executor, key=KEY, **kwargs) as broker,
    ):
        await broker.listen("127.0.0.1", 0)
        try:
            yield broker
        finally:
            gate.open()


@pytest.fixture(params=list(EXECUTORS))
async def server(gate: Gate, request: pytest.FixtureRequest) -> AsyncIterator[TCPServerBroker]:
    async for broker in serve(gate, request.param):
        yield broker


@pytest.fixture
async def small_budget_server(gate: Gate) -> AsyncIterator[TCPServerBroker]:
    async for broker in serve(gate, max_peer_call_bytes=4 * MIB):
        yield broker


async def until(predicate: Any, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


def raw_link(server: TCPServerBroker) -> Any:
    (view,) = [v for v in server.links() if v.node_id == "raw-peer"]
    return view


async def test_waiting_calls_hold_their_bytes_not_their_unpacked_arguments(
    server: TCPServerBroker, gate: Gate
) -> None:
    # Issue 16 item 6: arguments were unpacked before the executor granted a
    # slot, so every call waiting in its queue held them unpacked; 2 MiB of
    # msgpack empty arrays cost 143 MiB. Here the one slot is taken and
    # three calls of 1 MiB each wait for it.
    executor = server.executor
    reader, writer, conn = await handshake(server.listening[0][1])
    try:
        writer.write(sealed(conn, [MessageType.CALL, 1, "hold", hold_payload(gate), None, False]))
        await until(lambda: executor.busy == 1)
        payload = empty_arrays_payload(MIB)
        tracemalloc.start()
        try:
            for call_id in (2, 3, 4):
                call = [MessageType.CALL, call_id, "take", payload, None, False]
                writer.write(sealed(conn, call))
            await until(lambda: executor.queued == 3)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Their bytes (3 MiB) and the read buffers, not 3 x 72 MiB of lists.
        assert held < 12 * MIB, f"three waiting calls of 1 MiB hold {held / MIB:.0f} MiB"
    finally:
        close_raw(writer)
        await wait_closed(reader, 5)


async def test_a_peers_outstanding_argument_bytes_pause_its_link(
    small_budget_server: TCPServerBroker, gate: Gate
) -> None:
    # The window counts calls (at least 1,024, each up to 16 MiB): alone it
    # lets one link make us hold 16 GiB. Past the byte budget (4 MiB here)
    # the link is not read until half of it is answered.
    server = small_budget_server
    reader, writer, conn = await handshake(server.listening[0][1])
    try:
        writer.write(sealed(conn, [MessageType.CALL, 1, "hold", hold_payload(gate), None, False]))
        payload = bytes_payload(MIB)
        for call_id in range(2, 22):  # 20 MiB of arguments
            writer.write(sealed(conn, [MessageType.CALL, call_id, "take", payload, None, False]))
        await until(lambda: raw_link(server).read_paused)
        await asyncio.sleep(0.2)
        # The budget, plus the call that crossed it.
        assert raw_link(server).serving <= 1 + 5
        assert scraped(server, "patio_reads_paused_total", "bytes") == 1
        assert scraped(server, "patio_reads_paused_total", "window") == 0
        # Once the calls run, the link is read again and every call is answered.
        gate.open()
        answered: set[int] = set()
        async with asyncio.timeout(20):
            while len(answered) < 21:
                data = await reader.read(MIB)
                assert data, "the link closed"
                for event in conn.receive_data(data):
                    if event[0] == MessageType.RESULT:
                        answered.add(event[1])
                writer.write(conn.data_to_send())
        assert not raw_link(server).read_paused
    finally:
        close_raw(writer)
        await wait_closed(reader, 5)


async def test_links_per_node_id_are_capped(small_budget_server: TCPServerBroker) -> None:
    server = small_budget_server
    # Issue 16 item 6: links per peer were unbounded. One node id may hold
    # one link it dialled and one it accepted (a crossed dial), no more.
    port = server.listening[0][1]
    links = [await raw_member(port, "greedy", "instance-1") for _ in range(MAX_LINKS_PER_NODE)]
    try:
        for _, writer, conn in links:
            writer.write(announce(conn, ["mul"]))
        for _ in range(3):
            reader, writer, _ = await raw_member(port, "greedy", "instance-1")
            try:
                assert await wait_closed(reader, 3) < 3  # refused at once
            finally:
                close_raw(writer)
        assert scraped(server, "patio_links_refused_total", "too_many_links") == 3
        assert all(not reader.at_eof() for reader, _, _ in links)
    finally:
        for _, writer, _ in links:
            close_raw(writer)
    # Once they are gone the node is welcome again.
    await until(lambda: not [v for v in server.links() if v.node_id == "greedy"])
    reader, writer, _ = await raw_member(port, "greedy", "instance-1")
    try:
        await asyncio.sleep(0.2)
        assert not reader.at_eof()
    finally:
        close_raw(writer)
