"""What a broker tells its operator: logs that say what failed, once, and exact durations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop

from patio import (
    AsyncExecutor,
    NullExecutor,
    Registry,
    TCPClientBroker,
    TCPMeshBroker,
    TCPServerBroker,
)
from patio.broker.tcp.server import TaskErrorLog

pytestmark = [pytest.mark.timeout(60)]

rpc = Registry(project="logs", auto_naming=False)
# Strong keys: weak ones all share one published fingerprint (patio.proto.keys).
STRONG_A = b"a-strong-key-for-side-a-0123456789abcdef"
STRONG_B = b"b-strong-key-for-side-b-fedcba9876543210"


@rpc("quick")
async def quick(x: int) -> int:
    return x


@rpc("broken")
async def broken(x: int) -> int:
    raise KeyError(f"no record {x}")


@contextlib.asynccontextmanager
async def server(key: bytes = b"k") -> AsyncIterator[TCPServerBroker]:
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key=key, node_id="server") as broker,
    ):
        await broker.listen("127.0.0.1", 0)
        yield broker


@contextlib.asynccontextmanager
async def client(port: int, key: bytes = b"k", node: str = "caller") -> AsyncIterator[Any]:
    async with (
        NullExecutor(Registry()) as executor,
        TCPClientBroker(executor, key=key, node_id=node) as broker,
    ):
        await broker.connect("127.0.0.1", port)
        yield broker


def records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def test_a_failing_task_is_a_warning_once_and_each_call_a_debug_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="patio")
    async with server() as srv, client(srv.listening[0][1]) as caller:
        for i in range(5):
            with pytest.raises(KeyError):
                await caller.call("broken", i)
        assert await caller.call("quick", 7) == 7
    warnings = records(caplog, logging.WARNING, "task 'broken' raised KeyError")
    assert len(warnings) == 1, caplog.text  # rate-limited per task
    assert "no record 0" in warnings[0].getMessage() and "caller" in warnings[0].getMessage()
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum("call 'broken' from 'caller': error" in m for m in debug) == 5, debug
    assert any("call 'quick' from 'caller': ok in" in m for m in debug), debug


def test_task_error_log_says_how_many_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    errors = TaskErrorLog(interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="patio.broker"):
        for _ in range(4):
            errors.report("t", ValueError("bad"), "a")
        now[0] += 11
        errors.report("t", ValueError("bad"), "a")
        errors.report("other", ValueError("x" * 2000), "a")

        class Unprintable(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no str")

        errors.report("odd", Unprintable(), "a")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[1].endswith("; 3 more failures of it in the last 11s"), lines
    assert len(lines[2]) < 700  # a huge message is cut
    assert "cannot be printed" in lines[3]


async def test_short_lived_callers_make_no_info_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="patio")
    async with server() as srv:
        for n in range(3):
            async with client(srv.listening[0][1], node=f"one-off-{n}") as caller:
                assert await caller.call("quick", n) == n
        await asyncio.sleep(0.1)
    noisy = [r.getMessage() for r in caplog.records if "one-off" in r.getMessage()]
    assert noisy == []


async def test_a_key_mismatch_is_logged_once_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="patio")
    async with (
        AsyncExecutor(rpc) as ex_a,
        AsyncExecutor(rpc) as ex_b,
        TCPMeshBroker(ex_a, key=STRONG_A, node_id="mesh-a") as a,
        TCPMeshBroker(ex_b, key=STRONG_B, node_id="mesh-b") as b,
    ):
        await a.listen("127.0.0.1", 0)
        await b.listen("127.0.0.1", 0)
        a.add_peer("127.0.0.1", b.listening[0][1])
        await asyncio.sleep(4)  # the dialler retries every 0.1-2 s meanwhile
        attempts = sum(b.stats.handshake_failures.values())
    assert attempts >= 3, attempts
    refused = [
        r for r in records(caplog, logging.WARNING, "did not prove it holds an accepted key")
        if r.name == "patio.transport"
    ]  # fmt: skip
    assert len(refused) == 2, [r.getMessage() for r in refused]  # once on each side
    for record in refused:  # both keys named, so one log tells which differ
        assert a.key_fingerprint in record.getMessage(), record.getMessage()
        assert b.key_fingerprint in record.getMessage(), record.getMessage()
    joins = records(caplog, logging.WARNING, "cannot join")
    assert len(joins) == 1, [r.getMessage() for r in joins]
    assert a.key_fingerprint in joins[0].getMessage()


def test_call_durations_are_finer_than_the_loop_clock() -> None:
    """uvloop's loop.time() moves in whole milliseconds; a histogram needs better."""
    seen: list[float] = []

    async def main() -> None:
        async with server() as srv, client(srv.listening[0][1]) as caller:
            srv.stats.call_observer = lambda task, side, outcome, seconds: seen.append(seconds)
            for i in range(50):
                await caller.call("quick", i)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert len(seen) == 50
    off_the_millisecond = [s for s in seen if abs(s * 1000 - round(s * 1000)) > 1e-6]
    assert off_the_millisecond, seen
