"""Executors over ``concurrent.futures`` pools: one base, two thin subclasses.

Coroutine functions given to a pool executor are run in the worker (thread or
process) on an event loop of their own (``asyncio.run``), one loop per call.
That costs a loop creation per call, so prefer :class:`AsyncExecutor` for
coroutines; the point is that a registry mixing sync and async functions
works under any executor.

Cancellation: a call still waiting for a slot, or handed to the pool but not
yet started, is cancelled. A call already running in a thread or a process
cannot be interrupted; the caller stops waiting and its result is discarded,
but it keeps its slot until it really finishes, so the pool never holds more
than ``max_workers`` calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import multiprocessing.context
import os
from abc import abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from patio.executor.base import AbstractExecutor, Arguments
from patio.registry import Registry

__all__ = ["PoolExecutor", "ProcessPoolExecutor", "ThreadPoolExecutor"]


def _cpu_count() -> int:
    """CPUs this process may run on (respects affinity/cpusets, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not available on macOS / Windows
        return os.cpu_count() or 1


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _run_call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Runs in the pool worker: call ``func``; run a returned awaitable on a fresh loop."""
    result = func(*args, **kwargs)
    if inspect.iscoroutine(result):
        return asyncio.run(result)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


# The registry of a ProcessPoolExecutor child, set once by the pool initializer.
_child_registry: Registry | None = None


def _init_child(registry: Registry) -> None:
    global _child_registry
    _child_registry = registry


def _run_named_in_child(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    registry = _child_registry
    if registry is None:  # pragma: no cover - only if used outside our pool
        raise RuntimeError("patio process pool worker was started without a registry")
    return _run_call(registry.resolve(name), args, kwargs)


class PoolExecutor(AbstractExecutor):
    """Base of the executors that hand calls to a ``concurrent.futures`` pool.

    The pool is created by :meth:`setup` (or lazily by the first call) and
    receives at most ``max_workers`` calls at a time; the rest wait in this
    executor's own queue, where cancelling them is free and exact.
    """

    def __init__(
        self,
        registry: Registry,
        max_workers: int | None = None,  # positional too, as in patio 0.1.4
        *,
        max_queue: int | None = None,
    ) -> None:
        super().__init__(registry, max_workers=max_workers, max_queue=max_queue)
        self._pool: concurrent.futures.Executor | None = None

    @abstractmethod
    def _create_pool(self) -> concurrent.futures.Executor:
        """Build the underlying pool (called once)."""

    @abstractmethod
    def _pool_call(
        self,
        func: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """What to hand to ``pool.submit`` for this call: (callable, its arguments)."""

    def _get_pool(self) -> concurrent.futures.Executor:
        pool = self._pool
        if pool is None:
            pool = self._pool = self._create_pool()
        return pool

    async def setup(self) -> None:
        await super().setup()
        self._get_pool()

    async def submit(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = self._pool_call(func, args, kwargs)
        return await self._run_in_pool(lambda: call)

    async def execute(self, func: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = self._pool_call(self._resolve_for_pool(func), args, kwargs)
        return await self._run_in_pool(lambda: call)

    async def execute_deferred(self, name: str, arguments: Arguments) -> Any:
        func = self._resolve_for_pool(name)

        def call() -> tuple[Callable[..., Any], tuple[Any, ...]]:
            args, kwargs = arguments()
            return self._pool_call(func, tuple(args), dict(kwargs))

        return await self._run_in_pool(call)

    def _resolve_for_pool(self, func: str | Callable[..., Any]) -> str | Callable[..., Any]:
        return self.registry.resolve(func)

    async def _run_in_pool(
        self, make: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> Any:
        """Hand the pool what ``make()`` gives (a callable and its arguments), calling
        it once a slot is ours: a deferred call's arguments are decoded only then."""
        await self._acquire()
        try:
            target, call_args = make()
            try:
                cfuture = self._get_pool().submit(target, *call_args)
            except concurrent.futures.BrokenExecutor:
                # A worker died (a process killed, say): the pool refuses all
                # work from now on. Replace it once instead of failing forever.
                self._replace_broken_pool()
                cfuture = self._get_pool().submit(target, *call_args)
        except BaseException:
            self._release()
            raise
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wrap_future(cfuture, loop=loop)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if cfuture.cancelled() and self._closed and task is not None and not task.cancelling():
                # Our shutdown cancelled it before it started: it did not run.
                raise self._refused() from None
            raise
        finally:
            if cfuture.done():
                self._release()
            else:
                # Still running in the pool (the caller was cancelled): keep the
                # slot until it finishes so the pool never holds more than
                # max_workers calls.
                cfuture.add_done_callback(lambda _: self._release_threadsafe(loop))

    def _replace_broken_pool(self) -> None:
        broken, self._pool = self._pool, None
        if broken is not None:
            # Its workers are gone or going; do not block the loop on them.
            broken.shutdown(wait=False, cancel_futures=True)

    def _release_threadsafe(self, loop: asyncio.AbstractEventLoop) -> None:
        # A closed loop raises RuntimeError: nobody is left to count slots then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._release)

    async def _stop_running(self) -> None:
        pool = self._pool
        if pool is not None:
            # Blocking until running calls finish: do it off the loop.
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


class ThreadPoolExecutor(PoolExecutor):
    """Runs calls in a pool of threads.

    ``DEFAULT_MAX_WORKERS`` is ``min(32, cpus + 4)``, the standard library's
    choice: enough threads to overlap blocking I/O, not so many that a CPU-bound
    registry thrashes.
    """

    DEFAULT_MAX_WORKERS: ClassVar[int] = min(32, _cpu_count() + 4)

    def _create_pool(self) -> concurrent.futures.Executor:
        return concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_workers,
            thread_name_prefix="patio-worker",
        )

    def _pool_call(
        self,
        func: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if isinstance(func, str):
            func = self.registry.resolve(func)
        return _run_call, (func, args, kwargs)


class ProcessPoolExecutor(PoolExecutor):
    """Runs calls in a pool of processes.

    The registry is shipped to every child once, by the pool initializer;
    each call then sends only ``(name, args, kwargs)``, so arguments and
    results must be picklable and a function given to :meth:`submit` must be
    registered (it is sent by its first registered name). Register everything
    before the first call: children started later see the registry as it is
    then.

    ``DEFAULT_MAX_WORKERS`` is the number of CPUs this process may use:
    processes are for CPU-bound work, and more of them than CPUs only adds
    context switches.

    :param mp_context: a ``multiprocessing`` context (``None``: the platform
        default). With ``spawn``/``forkserver`` the registry is pickled, so
        its functions must be importable by the children.
    """

    DEFAULT_MAX_WORKERS: ClassVar[int] = _cpu_count()

    def __init__(
        self,
        registry: Registry,
        max_workers: int | None = None,  # positional too, as in patio 0.1.4
        *,
        max_queue: int | None = None,
        mp_context: multiprocessing.context.BaseContext | None = None,
    ) -> None:
        super().__init__(registry, max_workers=max_workers, max_queue=max_queue)
        self._mp_context = mp_context

    def _create_pool(self) -> concurrent.futures.Executor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.max_workers,
            mp_context=self._mp_context,
            initializer=_init_child,
            initargs=(self.registry,),
        )

    def _resolve_for_pool(self, func: str | Callable[..., Any]) -> str | Callable[..., Any]:
        # Check the name here (clear, early error), send only the name.
        if isinstance(func, str):
            self.registry.resolve(func)
            return func
        return self.registry.get_name(func)

    def _pool_call(
        self,
        func: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        name = func if isinstance(func, str) else self.registry.get_name(func)
        return _run_named_in_child, (name, args, kwargs)
