"""The in-process broker: calls go straight to the executor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from patio.broker.base import AbstractBroker, LoopTurns
from patio.broker.tcp.codec import outcome_of
from patio.errors import CallTimeoutError, NoRouteError, PatioError
from patio.stats import OUTCOME_OK, SIDE_CALLER


class MemoryBroker(AbstractBroker):
    """Distributes calls within one process.

    Values are passed as they are (no serialization), so switching to a TCP
    broker later is the point where arguments must become serializable.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = LoopTurns()

    async def call(
        self,
        func: str | Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        name = self.task_name(func)
        stats = self.stats
        stats.calls_started[(name, SIDE_CALLER)] += 1
        try:
            if self.executor.accepts_calls and name not in self.registry:
                raise NoRouteError(f"no task named {name!r} in the registry of this MemoryBroker")
            if self._turns.due():
                # The executor may complete the call without suspending: let
                # the loop run now and then, or a loop of calls starves it.
                await asyncio.sleep(0)
            if timeout is None:
                result = await self.executor.execute(name, *args, **kwargs)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        result = await self.executor.execute(name, *args, **kwargs)
                except TimeoutError as exc:
                    if isinstance(exc, PatioError):
                        raise
                    raise CallTimeoutError(
                        f"call to {name!r} did not finish within {timeout} s"
                    ) from None
        except BaseException as exc:
            # Counted as the TCP brokers count it: the one table in codec.
            stats.calls_finished[(name, SIDE_CALLER, outcome_of(exc))] += 1
            raise
        stats.calls_finished[(name, SIDE_CALLER, OUTCOME_OK)] += 1
        return result
