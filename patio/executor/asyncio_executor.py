"""AsyncExecutor: runs coroutine functions in the caller's own task."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from patio.executor.base import AbstractExecutor
from patio.registry import Registry

__all__ = ["AsyncExecutor"]


class AsyncExecutor(AbstractExecutor):
    """Runs coroutine functions on the event loop, at most ``max_workers`` at once.

    The call runs *inline*, in the task that awaits :meth:`submit`: when a slot
    is free, ``await func(*args, **kwargs)`` happens directly, with no task
    created per call (a per-call task is the largest single cost of an RPC
    at high concurrency). Cancelling the awaiting task therefore cancels the
    work itself.

    Plain (synchronous) functions are called directly too, on the loop: keep
    them short, or use :class:`ThreadPoolExecutor`. If a plain function returns
    an awaitable it is awaited.

    ``DEFAULT_MAX_WORKERS`` is 1024: a suspended coroutine costs a few KiB, so
    the bound is there to cap memory and fan-out to downstream services, not
    CPU; 1024 concurrent calls keeps a 2-core worker busy without letting a
    flood of calls grow memory without limit.

    :meth:`shutdown` cancels the tasks currently running a call (the
    callers' tasks, which then see ``CancelledError``) and waits until they
    have left the executor.
    """

    DEFAULT_MAX_WORKERS: ClassVar[int] = 1024

    def __init__(
        self,
        registry: Registry,
        max_workers: int | None = None,  # positional too, as in patio 0.1.4
        *,
        max_queue: int | None = None,
    ) -> None:
        super().__init__(registry, max_workers=max_workers, max_queue=max_queue)
        self._running: set[asyncio.Task[Any]] = set()

    async def submit(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Fast path inlined from _acquire: one comparison and an increment.
        if self._closed:
            raise self._refused()
        if self._busy < self.max_workers and not self._queued:
            self._busy += 1
        else:
            await self._wait_for_slot()
        task = asyncio.current_task()
        running = self._running
        # A task function may call the executor again from inside a call:
        # only the outermost call tracks (and untracks) the task.
        tracked = False
        if task is not None and task not in running:
            running.add(task)
            tracked = True
        try:
            result = func(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            if tracked:
                running.discard(task)
            self._release()

    async def _stop_running(self) -> None:
        current = asyncio.current_task()
        for task in list(self._running):
            if task is not current:
                task.cancel()

    def _slots_held_by_current_task(self) -> int:
        return 1 if asyncio.current_task() in self._running else 0
