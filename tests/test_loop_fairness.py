"""A task looping over calls served in-process must not starve the event loop.

Such calls can complete without suspending (the executor runs them inline and
the function never awaits); without care a loop over them never gives the
event loop a turn, and timers, heartbeats and health checks stop with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from patio import AsyncExecutor, MemoryBroker, Registry, TCPMeshBroker
from patio.broker import AbstractBroker

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftover_tasks")]


async def amul(a: int, b: int) -> int:
    return a * b  # never awaits: completes inline


def mul(a: int, b: int) -> int:
    return a * b


async def timer_delay_while_calling(broker: AbstractBroker, *, give_up: float = 2.0) -> float:
    """Seconds a 0.2 s timer took to fire while another task loops over calls.

    The calling task stops on its own after ``give_up`` seconds (wall clock),
    so a starved loop shows up as a late timer instead of a hung test.
    """
    loop = asyncio.get_running_loop()
    calls = 0
    stop = False

    async def caller() -> None:
        nonlocal calls
        end = time.monotonic() + give_up
        while not stop and time.monotonic() < end:
            assert await broker.call("mul", 6, 7) == 42
            calls += 1

    fired = loop.create_future()
    started = time.monotonic()
    loop.call_later(0.2, lambda: fired.done() or fired.set_result(time.monotonic()))
    task = asyncio.create_task(caller())
    try:
        delay = await fired - started
    finally:
        stop = True
        await task
    assert calls > 100, "the calls did not run at all"
    return float(delay)


@contextlib.asynccontextmanager
async def memory_broker(func: Callable[..., Any]) -> AsyncIterator[AbstractBroker]:
    rpc = Registry()
    rpc.register(func, "mul")
    async with AsyncExecutor(rpc) as executor, MemoryBroker(executor) as broker:
        yield broker


@contextlib.asynccontextmanager
async def mesh_member(func: Callable[..., Any]) -> AsyncIterator[AbstractBroker]:
    rpc = Registry()
    rpc.register(func, "mul")
    async with (
        AsyncExecutor(rpc) as executor,
        TCPMeshBroker(executor, key=b"fairness-test-key") as broker,
    ):
        await broker.listen("127.0.0.1", 0)
        yield broker


@pytest.mark.parametrize("make", [memory_broker, mesh_member], ids=["memory", "mesh-self"])
@pytest.mark.parametrize("func", [amul, mul], ids=["async", "sync"])
async def test_timer_fires_on_time_while_a_task_loops_over_inline_calls(
    make: Any, func: Callable[..., Any]
) -> None:
    async with make(func) as broker:
        assert await timer_delay_while_calling(broker) < 0.25


async def test_calls_that_suspend_are_not_slowed_by_extra_turns() -> None:
    """Calls that suspend anyway already give the loop turns: none is added to them."""

    async def suspends(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a * b

    async with memory_broker(suspends) as broker:
        turns = 0
        original = asyncio.sleep

        async def counting_sleep(delay: float, *args: Any) -> Any:
            nonlocal turns
            turns += 1
            return await original(delay, *args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(asyncio, "sleep", counting_sleep)
            for _ in range(500):
                await broker.call("mul", 6, 7)
        assert turns == 500  # the task's own sleeps only
