"""Helpers shared by the benchmark worker processes.

This module is imported by ``patio_node.py`` and ``raw_node.py``, which run
under *different* interpreters (our ``.venv`` and the original patio's own
virtualenv), so it depends on the standard library only and never on the
``bench`` package or on ``patio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

CallFn = Callable[..., Awaitable[Any]]

SLOW_TASK_SECONDS = 0.01


def emit(event: str, **fields: Any) -> None:
    """Write one control/result line (JSON) to stdout for the orchestrator."""
    fields["event"] = event
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def usage() -> dict[str, float]:
    """Peak RSS (MiB) and CPU seconds of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "maxrss_mb": round(ru.ru_maxrss / 1024.0, 2),  # Linux reports KiB
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 4),
    }


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        runner.run(main)


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return f"{type(loop).__module__}.{type(loop).__name__}"


class Control:
    """Line-oriented commands from the orchestrator on stdin."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None

    async def _ensure(self) -> asyncio.StreamReader:
        if self._reader is None:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            self._reader = reader
        return self._reader

    async def wait(self, command: str) -> None:
        """Wait until ``command`` (or EOF, which means: stop) arrives."""
        reader = await self._ensure()
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.decode().strip() == command:
                return


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


async def closed_loop(
    call: CallFn,
    args: tuple[Any, ...],
    concurrency: int,
    count: int,
    max_seconds: float,
    warmup: int,
) -> dict[str, Any]:
    """``concurrency`` callers issue calls back to back until ``count`` calls
    were issued or ``max_seconds`` elapsed; every issued call is awaited."""
    perf = time.perf_counter
    first_error: list[str] = []

    # warm-up: connections, caches, JIT-less but lazy imports, etc.
    if warmup:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                await call(*args)

        await asyncio.gather(*(one() for _ in range(warmup)))

    latencies: list[float] = []
    issued = 0
    errors = 0
    deadline = perf() + max_seconds

    async def worker() -> None:
        nonlocal issued, errors
        append = latencies.append
        while issued < count and perf() < deadline:
            issued += 1
            t0 = perf()
            try:
                await call(*args)
            except Exception as exc:
                errors += 1
                if not first_error:
                    first_error.append(repr(exc)[:300])
                continue
            append(perf() - t0)

    cpu0 = cpu_seconds()
    wall0 = time.time()
    t0 = perf()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = perf() - t0
    wall1 = time.time()
    cpu = cpu_seconds() - cpu0
    latencies.sort()
    done = len(latencies)
    return {
        "issued": issued,
        "completed": done,
        "errors": errors,
        "first_error": first_error[0] if first_error else None,
        "elapsed_s": elapsed,
        "calls_per_s": done / elapsed if elapsed > 0 else 0.0,
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "wall_start": wall0,
        "wall_end": wall1,
        "load_cpu_s": cpu,
    }


async def flood(
    start: Callable[..., Awaitable[Any]], args: tuple[Any, ...], count: int, max_seconds: float
) -> dict[str, Any]:
    """Issue ``count`` calls at once and count how many complete.

    ``start(*args)`` must return the package's own call awaitable (e.g. the
    ``broker.call(...)`` coroutine), which is wrapped in a task as is: no
    extra coroutine frame per call is added by the harness, so the caller's
    RSS is the package's own cost plus one task per call.
    """
    completed = 0
    errors = 0
    first_error: list[str] = []
    all_done = asyncio.get_running_loop().create_future()
    finished = 0

    def on_done(task: asyncio.Future[Any]) -> None:
        nonlocal completed, errors, finished
        finished += 1
        if task.cancelled():
            errors += 1
        elif task.exception() is not None:
            errors += 1
            if not first_error:
                first_error.append(repr(task.exception())[:300])
        else:
            completed += 1
        if finished == count and not all_done.done():
            all_done.set_result(None)

    t0 = time.perf_counter()
    tasks = []
    for _ in range(count):
        task = asyncio.ensure_future(start(*args))
        task.add_done_callback(on_done)
        tasks.append(task)
    memory_report: list[dict[str, Any]] | None = None
    if tracemalloc_on():
        await asyncio.sleep(0)  # every call ran up to its first suspension
        memory_report = allocation_report(count)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(all_done), timeout=max_seconds)
    elapsed = time.perf_counter() - t0
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        with contextlib.suppress(BaseException):
            await asyncio.wait(pending, timeout=5)
    return {
        "issued": count,
        "completed": completed,
        "errors": errors,
        "timed_out": len(pending),
        "first_error": first_error[0] if first_error else None,
        "elapsed_s": elapsed,
        "calls_per_s": completed / elapsed if elapsed > 0 else 0.0,
        **({"allocations": memory_report} if memory_report is not None else {}),
    }


def tracemalloc_on() -> bool:
    import tracemalloc

    return tracemalloc.is_tracing()


def allocation_report(count: int, top: int = 25) -> list[dict[str, Any]]:
    """Live allocations by source line while ``count`` calls are pending."""
    import tracemalloc

    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    out = []
    for stat in snap.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        out.append(
            {
                "where": f"{frame.filename}:{frame.lineno}",
                "mb": round(stat.size / 1e6, 2),
                "bytes_per_call": round(stat.size / count, 1),
                "blocks": stat.count,
            }
        )
    return out


async def echo(value: Any) -> Any:
    """The tiny task: returns its argument."""
    return value


async def slow(value: Any) -> Any:
    """The slow task of the flood scenario."""
    await asyncio.sleep(SLOW_TASK_SECONDS)
    return value


def make_payload(size: int) -> Any:
    """Argument of a call: a small int, or ``size`` bytes."""
    if size <= 0:
        return 7
    return b"\xa5" * size
