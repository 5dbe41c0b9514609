"""What every executor shares: the bound on concurrent calls and the lifecycle.

Bounding rules, in one place:

- at most ``max_workers`` calls run at once (``busy``);
- further calls wait in a FIFO of plain futures (``queued``), one future per
  waiting call and no extra task; a slot freed by a finishing call is handed
  straight to the oldest waiter, so nobody can overtake the queue;
- when ``max_queue`` is set and that many calls are already waiting, a new
  call is refused at once with :class:`~patio.errors.ExecutionRefusedError`
  (load shedding: the caller may retry on another peer, nothing ran);
- after :meth:`AbstractExecutor.shutdown` starts, every new call and every
  call still waiting for a slot fails with ``ExecutionRefusedError``.

``ExecutionRefusedError`` therefore always means "this call did not run";
a broker may safely retry it elsewhere.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Self

from patio.errors import ExecutionRefusedError
from patio.registry import Registry

__all__ = ["AbstractExecutor", "Arguments"]

#: Makes a call's ``(args, kwargs)``; see :meth:`AbstractExecutor.execute_deferred`.
Arguments = Callable[[], tuple[Sequence[Any], Mapping[str, Any]]]


def call_with(func: Callable[..., Any], arguments: Arguments) -> Any:
    """Call ``func`` with what ``arguments()`` makes (in the slot, wherever it runs)."""
    args, kwargs = arguments()
    return func(*args, **kwargs)


class AbstractExecutor(ABC):
    """Runs registered functions, at most ``max_workers`` at once.

    :param registry: where :meth:`execute` looks task names up.
    :param max_workers: how many calls may run at once.
    :param max_queue: how many calls may wait for a slot; ``None`` (default)
        means unbounded, the caller side (broker) being expected to bound
        what it accepts.
    """

    DEFAULT_MAX_WORKERS: ClassVar[int] = 4

    #: Whether this executor runs anything at all; brokers advertise no task
    #: names for an executor that does not (see :class:`NullExecutor`).
    accepts_calls: ClassVar[bool] = True

    def __init__(
        self,
        registry: Registry,
        max_workers: int | None = None,  # positional too, as in patio 0.1.4
        *,
        max_queue: int | None = None,
    ) -> None:
        if max_workers is None:
            max_workers = self.DEFAULT_MAX_WORKERS
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}")
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 0):
            raise ValueError(f"max_queue must be a non-negative integer or None, got {max_queue!r}")
        self.registry = registry
        self.max_workers = max_workers
        self.max_queue = max_queue
        self._busy = 0
        self._queued = 0
        # Waiters for a slot. Cancelled waiters stay in the deque (removing
        # from the middle is O(n)); _release skips them.
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Futures resolved when busy == queued == 0 (drain/shutdown wait on them).
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._setup_done = False

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} max_workers={self.max_workers} busy={self._busy} "
            f"queued={self._queued}{' closed' if self._closed else ''}>"
        )

    # -- state -----------------------------------------------------------

    @property
    def busy(self) -> int:
        """Calls holding a slot now (running, or finishing in a pool)."""
        return self._busy

    @property
    def queued(self) -> int:
        """Calls waiting for a slot."""
        return self._queued

    @property
    def is_closed(self) -> bool:
        return self._closed

    # -- slots -------------------------------------------------------------

    def _refused(self) -> ExecutionRefusedError:
        return ExecutionRefusedError(f"{type(self).__name__}: executor is shut down")

    async def _acquire(self) -> None:
        """Take a slot, waiting in FIFO order if none is free."""
        if self._closed:
            raise self._refused()
        if self._busy < self.max_workers and not self._queued:
            self._busy += 1
            return
        await self._wait_for_slot()

    async def _wait_for_slot(self) -> None:
        if self.max_queue is not None and self._queued >= self.max_queue:
            raise ExecutionRefusedError(
                f"{type(self).__name__}: queue is full ({self._queued} calls waiting "
                f"for {self.max_workers} workers)",
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._queued += 1
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release()
            raise
        finally:
            self._queued -= 1
            if self._idle_waiters and self._busy <= 1 and not self._queued:
                self._notify_idle()
        if self._closed:
            # The slot was handed over just before shutdown began: the call has
            # not started, so refuse it rather than run it behind shutdown's back.
            self._release()
            raise self._refused()

    def _release(self) -> None:
        """Give the slot to the oldest live waiter, or free it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter, busy unchanged
                return
        self._busy -= 1
        # <= 1, not == 0: shutdown() called from inside a call waits for
        # everything but its own slot (see _slots_held_by_current_task).
        if self._idle_waiters and self._busy <= 1 and not self._queued:
            self._notify_idle()

    def _notify_idle(self) -> None:
        idle, self._idle_waiters = self._idle_waiters, []
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_idle(self, own_slots: int = 0) -> None:
        while self._busy > own_slots or self._queued:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _fail_waiters(self) -> None:
        """Refuse every call still waiting for a slot (they never started)."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(self._refused())

    # -- public API ----------------------------------------------------------

    async def setup(self) -> None:
        """Start what the executor needs (pools). Idempotent."""
        if self._closed:
            raise self._refused()
        self._setup_done = True

    @abstractmethod
    async def submit(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` within this executor's bounds and return its result."""

    async def execute(self, func: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Resolve ``func`` (a task name or a registered function) and :meth:`submit` it."""
        return await self.submit(self.registry.resolve(func), *args, **kwargs)

    async def execute_deferred(self, name: str, arguments: Arguments) -> Any:
        """Run task ``name`` with the ``(args, kwargs)`` that ``arguments()`` returns,
        calling it only once the call holds a slot.

        Brokers use it to keep a waiting call's arguments as the bytes they
        came as: decoded, a megabyte can be seventy times that. An executor
        whose :meth:`execute` is its own gets the arguments decoded at once.
        """
        func = self.registry.resolve(name)
        if type(self).execute is not AbstractExecutor.execute:
            args, kwargs = arguments()
            return await self.execute(name, *args, **kwargs)
        return await self.submit(call_with, func, arguments)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until no call runs or waits; ``False`` if ``timeout`` passed first.

        New calls are still accepted meanwhile (a graceful drain stops the
        broker from sending them first).
        """
        try:
            async with asyncio.timeout(timeout):
                await self._wait_idle()
        except TimeoutError:
            return False
        return True

    async def shutdown(self) -> None:
        """Stop accepting calls, refuse the waiting ones and stop the running ones.

        Idempotent. When it returns nothing of this executor is running.
        """
        self._closed = True
        self._fail_waiters()
        await self._stop_running()
        # A task function may shut its own executor down: do not wait for it.
        await self._wait_idle(self._slots_held_by_current_task())

    def _slots_held_by_current_task(self) -> int:
        """Slots held by the task calling us (only AsyncExecutor runs calls in it)."""
        return 0

    @abstractmethod
    async def _stop_running(self) -> None:
        """Cancel or finish the calls holding a slot (called once closed)."""

    async def __aenter__(self) -> Self:
        await self.setup()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()
