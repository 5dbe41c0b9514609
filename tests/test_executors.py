"""Executors: bounds, inline execution, pools, cancellation, shutdown, drain."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from patio.errors import ExecutionRefusedError, TaskNotFoundError
from patio.executor import (
    AbstractExecutor,
    AsyncExecutor,
    NullExecutor,
    PoolExecutor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from patio.registry import Registry

# Module-level functions so process pools can reach them by reference.


def multiply(a: int, b: int) -> int:
    return a * b


async def async_multiply(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a * b


def getpid() -> int:
    return os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


def not_registered() -> None:
    return None


def make_registry() -> Registry:
    rpc = Registry(project="tests")
    rpc.register(multiply, "mul")
    rpc.register(async_multiply, "amul")
    rpc.register(getpid, "pid")
    rpc.register(fail, "fail")
    return rpc


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


# -- construction / common contract -------------------------------------------


def test_defaults_and_validation() -> None:
    rpc = make_registry()
    assert AsyncExecutor(rpc).max_workers == 1024
    assert ThreadPoolExecutor(rpc).max_workers == min(32, len(os.sched_getaffinity(0)) + 4)
    assert ProcessPoolExecutor(rpc).max_workers == len(os.sched_getaffinity(0))
    assert issubclass(ThreadPoolExecutor, PoolExecutor)
    assert issubclass(ProcessPoolExecutor, PoolExecutor)
    for cls in (AsyncExecutor, ThreadPoolExecutor, ProcessPoolExecutor):
        assert cls.accepts_calls
        with pytest.raises(ValueError):
            cls(rpc, max_workers=0)
        with pytest.raises(ValueError):
            cls(rpc, max_workers=2, max_queue=-1)
    assert not NullExecutor.accepts_calls


@pytest.mark.parametrize("cls", [AsyncExecutor, ThreadPoolExecutor, ProcessPoolExecutor])
async def test_execute_by_name_and_by_function(cls: type[AbstractExecutor]) -> None:
    async with cls(make_registry(), max_workers=2) as executor:
        assert await executor.execute("mul", 6, 7) == 42
        assert await executor.execute(multiply, 2, b=5) == 10
        assert await executor.execute("amul", 3, 4) == 12
        assert await executor.submit(multiply, 3, 3) == 9
        with pytest.raises(ValueError, match="boom"):
            await executor.execute("fail", "boom")
        with pytest.raises(TaskNotFoundError, match="nope"):
            await executor.execute("nope")
        with pytest.raises(TaskNotFoundError):
            await executor.execute(not_registered)
        assert executor.busy == 0 and executor.queued == 0


async def test_setup_and_shutdown_are_idempotent() -> None:
    executor = ThreadPoolExecutor(make_registry(), max_workers=2)
    await executor.setup()
    await executor.setup()
    assert await executor.execute("mul", 2, 2) == 4
    await executor.shutdown()
    await executor.shutdown()
    with pytest.raises(ExecutionRefusedError, match="shut down"):
        await executor.execute("mul", 1, 1)
    with pytest.raises(ExecutionRefusedError):
        await executor.setup()


# -- AsyncExecutor ------------------------------------------------------------


async def test_async_executor_runs_inline_in_the_callers_task() -> None:
    seen: list[asyncio.Task[Any] | None] = []

    async def where() -> None:
        seen.append(asyncio.current_task())

    rpc = Registry()
    rpc.register(where, "where")
    async with AsyncExecutor(rpc, max_workers=2) as executor:
        tasks_before = len(asyncio.all_tasks())
        await executor.execute("where")
        assert seen == [asyncio.current_task()]
        assert len(asyncio.all_tasks()) == tasks_before


async def test_async_executor_flood_never_exceeds_max_workers() -> None:
    running = 0
    peak = 0
    done = 0

    async def work(i: int) -> int:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1
        done += 1
        return i

    rpc = Registry()
    rpc.register(work, "work")
    async with AsyncExecutor(rpc, max_workers=4) as executor:
        calls = [asyncio.ensure_future(executor.execute("work", i)) for i in range(10_000)]
        await asyncio.sleep(0)
        assert executor.busy == 4
        assert executor.queued == 10_000 - 4
        results = await asyncio.gather(*calls)
    assert results == list(range(10_000))
    assert peak == 4
    assert done == 10_000


async def test_waiters_are_served_in_fifo_order() -> None:
    gate = asyncio.Event()
    order: list[int] = []

    async def work(i: int) -> None:
        if i == 0:
            await gate.wait()
        order.append(i)

    rpc = Registry()
    rpc.register(work, "work")
    async with AsyncExecutor(rpc, max_workers=1) as executor:
        calls = [asyncio.ensure_future(executor.execute("work", i)) for i in range(6)]
        await wait_until(lambda: executor.queued == 5)
        gate.set()
        await asyncio.gather(*calls)
    assert order == [0, 1, 2, 3, 4, 5]


async def test_max_queue_refuses_when_full() -> None:
    gate = asyncio.Event()

    async def block() -> None:
        await gate.wait()

    rpc = Registry()
    rpc.register(block, "block")
    async with AsyncExecutor(rpc, max_workers=1, max_queue=2) as executor:
        calls = [asyncio.ensure_future(executor.execute("block")) for _ in range(3)]
        await wait_until(lambda: executor.queued == 2)
        with pytest.raises(ExecutionRefusedError, match="queue is full"):
            await executor.execute("block")
        gate.set()
        await asyncio.gather(*calls)


async def test_cancelling_the_caller_cancels_async_work() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    rpc = Registry()
    rpc.register(slow, "slow")
    async with AsyncExecutor(rpc, max_workers=1) as executor:
        call = asyncio.ensure_future(executor.execute("slow"))
        await started.wait()
        assert executor.busy == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert cancelled.is_set()
        assert executor.busy == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    gate = asyncio.Event()

    async def block() -> str:
        await gate.wait()
        return "ok"

    rpc = Registry()
    rpc.register(block, "block")
    async with AsyncExecutor(rpc, max_workers=1) as executor:
        first = asyncio.ensure_future(executor.execute("block"))
        second = asyncio.ensure_future(executor.execute("block"))
        third = asyncio.ensure_future(executor.execute("block"))
        await wait_until(lambda: executor.queued == 2)
        second.cancel()
        await asyncio.sleep(0)
        assert executor.queued == 1
        gate.set()
        assert await first == "ok"
        assert await third == "ok"
        assert second.cancelled()
        assert executor.busy == 0 and executor.queued == 0


async def test_slot_handed_over_while_waiter_is_cancelled_is_passed_on() -> None:
    gate = asyncio.Event()

    async def block() -> str:
        await gate.wait()
        return "ok"

    rpc = Registry()
    rpc.register(block, "block")
    async with AsyncExecutor(rpc, max_workers=1) as executor:
        first = asyncio.ensure_future(executor.execute("block"))
        second = asyncio.ensure_future(executor.execute("block"))
        third = asyncio.ensure_future(executor.execute("block"))
        await wait_until(lambda: executor.queued == 2)
        gate.set()
        await first  # its release handed the slot to `second`'s waiter...
        second.cancel()  # ...which is cancelled before it could run
        assert await third == "ok"
        assert executor.busy == 0 and executor.queued == 0


async def test_async_shutdown_cancels_running_and_refuses_waiting() -> None:
    cancelled = 0

    async def slow() -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    rpc = Registry()
    rpc.register(slow, "slow")
    executor = AsyncExecutor(rpc, max_workers=2)
    await executor.setup()
    calls = [asyncio.ensure_future(executor.execute("slow")) for _ in range(5)]
    await wait_until(lambda: executor.busy == 2 and executor.queued == 3)
    await executor.shutdown()
    assert executor.busy == 0 and executor.queued == 0
    assert cancelled == 2
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 2
    assert sum(isinstance(r, ExecutionRefusedError) for r in results) == 3
    with pytest.raises(ExecutionRefusedError, match="shut down"):
        await executor.execute("slow")


async def test_drain_waits_for_idle_without_refusing() -> None:
    gate = asyncio.Event()

    async def block() -> None:
        await gate.wait()

    rpc = Registry()
    rpc.register(block, "block")
    rpc.register(multiply, "mul")
    async with AsyncExecutor(rpc, max_workers=1) as executor:
        assert await executor.drain(0.01)
        call = asyncio.ensure_future(executor.execute("block"))
        await wait_until(lambda: executor.busy == 1)
        assert not await executor.drain(0.01)
        drained = asyncio.ensure_future(executor.drain(5))
        await asyncio.sleep(0)
        assert not drained.done()
        gate.set()
        assert await drained
        await call
        assert await executor.execute("mul", 2, 3) == 6  # still accepting


async def test_async_executor_overhead_is_a_few_microseconds() -> None:
    async def noop() -> None:
        return None

    rpc = Registry()
    rpc.register(noop, "noop")
    n = 20_000
    async with AsyncExecutor(rpc, max_workers=4) as executor:
        execute = executor.execute
        best_direct = best_exec = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(n):
                await noop()
            best_direct = min(best_direct, time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(n):
                await execute("noop")
            best_exec = min(best_exec, time.perf_counter() - start)
    overhead_us = (best_exec - best_direct) / n * 1e6
    # ~1.3 µs measured on a 2-core machine; generous bound for loaded CI.
    assert overhead_us < 15, overhead_us


# -- ThreadPoolExecutor -------------------------------------------------------


async def test_thread_pool_runs_in_threads_and_bounds_them() -> None:
    lock = threading.Lock()
    running = 0
    peak = 0
    threads: set[str] = set()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.current_thread().name)
        time.sleep(0.002)
        with lock:
            running -= 1
        return i

    rpc = Registry()
    rpc.register(work, "work")
    async with ThreadPoolExecutor(rpc, max_workers=3) as executor:
        calls = [asyncio.ensure_future(executor.execute("work", i)) for i in range(60)]
        await asyncio.sleep(0)
        assert executor.busy == 3 and executor.queued == 57
        assert await asyncio.gather(*calls) == list(range(60))
    assert peak <= 3
    assert threading.current_thread().name not in threads
    assert all(name.startswith("patio-worker") for name in threads)


async def test_thread_pool_runs_coroutine_functions_on_their_own_loop() -> None:
    caller_loop = asyncio.get_running_loop()

    async def which_loop() -> bool:
        return asyncio.get_running_loop() is not caller_loop

    rpc = Registry()
    rpc.register(which_loop, "which")
    async with ThreadPoolExecutor(rpc, max_workers=1) as executor:
        assert await executor.execute("which") is True


async def test_thread_pool_cancelled_caller_keeps_slot_until_thread_finishes() -> None:
    release = threading.Event()
    finished = threading.Event()

    def block() -> str:
        release.wait(10)
        finished.set()
        return "discarded"

    rpc = Registry()
    rpc.register(block, "block")
    rpc.register(multiply, "mul")
    async with ThreadPoolExecutor(rpc, max_workers=1) as executor:
        call = asyncio.ensure_future(executor.execute("block"))
        await wait_until(lambda: executor.busy == 1)
        await asyncio.sleep(0.05)  # let the thread start
        queued = asyncio.ensure_future(executor.execute("mul", 2, 2))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The thread still runs: the slot is held, the next call waits.
        await asyncio.sleep(0.05)
        assert executor.busy == 1 and not queued.done()
        release.set()
        assert await queued == 4
        assert finished.is_set()


async def test_thread_pool_cancelled_waiter_never_runs() -> None:
    release = threading.Event()
    ran: list[int] = []

    def block(i: int) -> None:
        if i == 0:
            release.wait(10)
        ran.append(i)

    rpc = Registry()
    rpc.register(block, "block")
    async with ThreadPoolExecutor(rpc, max_workers=1) as executor:
        first = asyncio.ensure_future(executor.execute("block", 0))
        second = asyncio.ensure_future(executor.execute("block", 1))
        await wait_until(lambda: executor.queued == 1)
        second.cancel()
        release.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await second
    assert ran == [0]


async def test_thread_pool_shutdown_waits_for_running_and_refuses_waiting() -> None:
    release = threading.Event()
    finished = threading.Event()

    def block() -> str:
        release.wait(10)
        finished.set()
        return "done"

    rpc = Registry()
    rpc.register(block, "block")
    executor = ThreadPoolExecutor(rpc, max_workers=1)
    await executor.setup()
    running = asyncio.ensure_future(executor.execute("block"))
    waiting = asyncio.ensure_future(executor.execute("block"))
    await wait_until(lambda: executor.busy == 1 and executor.queued == 1)
    shutdown = asyncio.ensure_future(executor.shutdown())
    await asyncio.sleep(0.05)
    assert not shutdown.done()  # blocked on the running thread, loop still free
    release.set()
    await shutdown
    assert finished.is_set()
    assert executor.busy == 0 and executor.queued == 0
    assert await running == "done"
    with pytest.raises(ExecutionRefusedError, match="shut down"):
        await waiting


# -- ProcessPoolExecutor ------------------------------------------------------


async def test_process_pool_runs_in_other_processes() -> None:
    async with ProcessPoolExecutor(make_registry(), max_workers=2) as executor:
        pids = set(await asyncio.gather(*[executor.execute("pid") for _ in range(8)]))
        assert os.getpid() not in pids
        assert await executor.execute("amul", 5, 5) == 25  # coroutine in the child


async def test_process_pool_with_spawn_ships_the_registry() -> None:
    context = multiprocessing.get_context("spawn")
    async with ProcessPoolExecutor(make_registry(), max_workers=1, mp_context=context) as ex:
        assert await ex.execute("mul", 7, 6) == 42
        assert await ex.submit(multiply, 2, 21) == 42
        assert await ex.execute("pid") != os.getpid()


async def test_process_pool_rejects_unregistered_function() -> None:
    async with ProcessPoolExecutor(make_registry(), max_workers=1) as executor:
        with pytest.raises(TaskNotFoundError, match="not registered"):
            await executor.submit(not_registered)
        assert executor.busy == 0


# -- NullExecutor -------------------------------------------------------------


async def test_null_executor_refuses_everything() -> None:
    async with NullExecutor(make_registry()) as executor:
        with pytest.raises(ExecutionRefusedError, match="NullExecutor does not execute tasks"):
            await executor.execute("mul", 1, 2)
        with pytest.raises(ExecutionRefusedError, match="NullExecutor does not execute tasks"):
            await executor.submit(multiply, 1, 2)
        with pytest.raises(ExecutionRefusedError):
            await executor.execute("not-even-registered")
        assert executor.busy == 0


async def test_call_handed_a_slot_just_before_shutdown_is_refused_not_run() -> None:
    ran: list[int] = []

    async def record(i: int) -> None:
        ran.append(i)

    rpc = Registry()
    rpc.register(record, "record")
    executor = AsyncExecutor(rpc, max_workers=1)
    await executor._acquire()  # hold the only slot, as a running call would
    waiting = asyncio.ensure_future(executor.execute("record", 1))
    await wait_until(lambda: executor.queued == 1)
    executor._release()  # the slot goes to `waiting`, which has not resumed yet
    await executor.shutdown()  # closes before `waiting` gets to run
    with pytest.raises(ExecutionRefusedError, match="shut down"):
        await waiting
    assert ran == []
    assert executor.busy == 0 and executor.queued == 0


def die() -> None:
    os._exit(13)


async def test_process_pool_recovers_from_a_dead_worker() -> None:
    from concurrent.futures.process import BrokenProcessPool

    rpc = make_registry()
    rpc.register(die, "die")
    async with ProcessPoolExecutor(rpc, max_workers=1) as executor:
        with pytest.raises(BrokenProcessPool):
            await executor.execute("die")
        assert await executor.execute("mul", 3, 3) == 9
        assert executor.busy == 0


async def test_a_task_may_shut_down_its_own_executor() -> None:
    rpc = Registry()
    executor = AsyncExecutor(rpc, max_workers=2)

    async def stop() -> str:
        await executor.shutdown()
        return "stopped"

    async def slow() -> None:
        await asyncio.sleep(60)

    rpc.register(stop, "stop")
    rpc.register(slow, "slow")
    await executor.setup()
    other = asyncio.ensure_future(executor.execute("slow"))
    await wait_until(lambda: executor.busy == 1)
    assert await asyncio.wait_for(executor.execute("stop"), 5) == "stopped"
    with pytest.raises(asyncio.CancelledError):
        await other
    assert executor.busy == 0


class OwnExecute(AsyncExecutor):
    """A user's executor with its own ``execute``: it is given decoded arguments."""

    seen: list[tuple[Any, ...]]

    async def execute(self, func: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.seen = [*getattr(self, "seen", []), args]
        return await super().execute(func, *args, **kwargs)


@pytest.mark.parametrize(
    "cls", [AsyncExecutor, ThreadPoolExecutor, ProcessPoolExecutor, OwnExecute]
)
async def test_execute_deferred_makes_the_arguments_once_a_slot_is_free(
    cls: type[AbstractExecutor],
) -> None:
    # A broker keeps a waiting call's arguments as bytes (issue 16 item 6):
    # they are made only when the call holds a slot.
    made: list[str] = []

    def arguments(tag: str) -> Callable[[], tuple[list[int], dict[str, int]]]:
        def make() -> tuple[list[int], dict[str, int]]:
            made.append(tag)
            return [6], {"b": 7}

        return make

    async with cls(make_registry(), max_workers=1) as executor:
        await executor._acquire()  # the one slot is taken
        waiting = asyncio.ensure_future(executor.execute_deferred("mul", arguments("waiting")))
        if cls is OwnExecute:  # its own execute is given them decoded, at once
            await wait_until(lambda: made == ["waiting"])
        else:
            await wait_until(lambda: executor.queued == 1)
            await asyncio.sleep(0.05)
            assert made == []
        executor._release()
        assert await waiting == 42
        assert made == ["waiting"]
        with pytest.raises(TaskNotFoundError):
            await executor.execute_deferred("nope", arguments("never"))
        assert made == ["waiting"] and executor.busy == 0
    if isinstance(executor, OwnExecute):
        assert executor.seen == [(6,)]


async def test_null_executor_refuses_deferred_calls_without_making_arguments() -> None:
    def arguments() -> tuple[list[int], dict[str, int]]:
        raise AssertionError("made")

    async with NullExecutor(make_registry()) as executor:
        with pytest.raises(ExecutionRefusedError, match="'mul'"):
            await executor.execute_deferred("mul", arguments)
