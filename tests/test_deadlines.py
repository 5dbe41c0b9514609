"""The executing side enforces a call's deadline itself, even if the caller never cancels."""

from __future__ import annotations

import asyncio

from patio import AsyncExecutor, Registry, TCPServerBroker
from patio.broker import MsgpackSerializer
from patio.proto import ErrorKind, MessageType
from tests.test_bad_input import KEY, _reply_for, close_raw, handshake


async def test_a_call_overrunning_its_deadline_is_cancelled_and_answered_timeout() -> None:
    cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(30)
        finally:
            cancelled.set()
        return "too late"

    rpc = Registry()
    rpc.register(slow, "slow")
    async with AsyncExecutor(rpc) as executor, TCPServerBroker(executor, key=KEY) as server:
        await server.listen("127.0.0.1", 0)
        reader, writer, conn = await handshake(server.listening[0][1])
        try:
            conn.send_call(7, "slow", MsgpackSerializer().pack([[], {}]), 0.2, False)
            writer.write(conn.data_to_send())
            reply = await _reply_for(reader, writer, conn, 7, 3)
            assert reply is not None
            assert reply[0] == MessageType.ERROR and reply[2] == ErrorKind.TIMEOUT, reply
            await asyncio.wait_for(cancelled.wait(), 1)
            assert server.stats.calls_finished[("slow", "executor", "timeout")] == 1
            (peer,) = server.links()
            assert peer.serving == 0 and peer.deadlines == 0 and peer.expired == 0
        finally:
            close_raw(writer)


async def test_a_call_within_its_deadline_keeps_no_timer() -> None:
    async def quick() -> int:
        return 1

    rpc = Registry()
    rpc.register(quick, "quick")
    async with AsyncExecutor(rpc) as executor, TCPServerBroker(executor, key=KEY) as server:
        await server.listen("127.0.0.1", 0)
        reader, writer, conn = await handshake(server.listening[0][1])
        try:
            conn.send_call(1, "quick", MsgpackSerializer().pack([[], {}]), 5.0, False)
            writer.write(conn.data_to_send())
            reply = await _reply_for(reader, writer, conn, 1, 3)
            assert reply is not None and reply[0] == MessageType.RESULT
            (peer,) = server.links()
            assert peer.deadlines == 0
        finally:
            close_raw(writer)
