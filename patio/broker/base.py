"""What every broker shares: lifecycle, registry locking, naming a call."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from patio.broker.serializer import AbstractSerializer, MsgpackSerializer
from patio.executor import AbstractExecutor
from patio.stats import BrokerStats

log = logging.getLogger("patio.broker")

T = TypeVar("T")

#: Seconds, as patio 0.1.4 spells the type of its ``timeout`` parameters.
TimeoutType = int | float

#: Calls a task may complete in a row without the event loop getting a turn.
#: A call served in-process can finish without suspending (an async function
#: that never awaits, a plain function); a task looping over such calls would
#: otherwise keep the loop from its timers, I/O and other tasks forever. At a
#: few microseconds a call, 128 calls hold the loop for about a millisecond,
#: and the yield costs about one call more per 128. Fewer calls per turn make
#: more calls wait while other tasks take theirs (measured with 256 tasks:
#: 64 put that wait into the p99 latency, 128 into the p99.9 only).
LOOP_TURN_EVERY: Final = 128


class LoopTurns:
    """Tells a fast path when to let the event loop run.

    ``due()`` counts completions since the loop last ran a callback of ours;
    the first one of a streak schedules a callback that resets the count, so
    calls that suspend anyway (the loop runs between them) never yield extra.
    The count is shared by every task calling through one broker: the task
    that reaches the limit starts the next streak at zero as it yields, so
    the tasks queued behind it each get a full streak, not an instant yield.
    """

    __slots__ = ("_streak",)

    def __init__(self) -> None:
        self._streak = 0

    def _reset(self) -> None:
        self._streak = 0

    def due(self) -> bool:
        streak = self._streak
        if streak == 0:
            asyncio.get_running_loop().call_soon(self._reset)
        elif streak >= LOOP_TURN_EVERY:
            self._streak = 0
            return True
        self._streak = streak + 1
        return False


class AbstractBroker(ABC):
    """Carries calls to an executor, local or remote.

    The first broker set up with a registry locks it: the set of task names a
    broker advertises must not change under its peers' feet.
    """

    def __init__(
        self,
        executor: AbstractExecutor,
        *,
        serializer: AbstractSerializer | None = None,
    ) -> None:
        self.executor = executor
        self.registry = executor.registry
        self.serializer = serializer if serializer is not None else MsgpackSerializer()
        self.stats = BrokerStats()
        self._closing = False
        self._closed_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _closed(self) -> asyncio.Event:
        if self._closed_event is None:
            self._closed_event = asyncio.Event()
        return self._closed_event

    def task_name(self, func: str | Callable[..., Any]) -> str:
        """The name a call travels under: a string as is, a function by its registration."""
        if isinstance(func, str):
            return func
        return self.registry.get_name(func)

    async def setup(self) -> None:
        self._closed()
        if not self.registry.is_locked:
            self.registry.lock(by=self)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop (patio 0.1.4 API)."""
        return asyncio.get_running_loop()

    def create_task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task the broker cancels when it closes (patio 0.1.4 API)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        self._closing = True
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._closed().set()

    async def join(self) -> None:
        """Wait until the broker is closed (by :meth:`close` or a signal handler)."""
        await self._closed().wait()

    @abstractmethod
    async def call(
        self,
        func: str | Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``func(*args, **kwargs)`` somewhere and return its result."""

    async def __aenter__(self) -> Self:
        await self.setup()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
