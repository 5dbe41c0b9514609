"""NullExecutor: an executor that runs nothing, for processes that only call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from patio.errors import ExecutionRefusedError
from patio.executor.base import AbstractExecutor, Arguments

__all__ = ["NullExecutor"]


class NullExecutor(AbstractExecutor):
    """Refuses every call with :class:`~patio.errors.ExecutionRefusedError`.

    Give it to a broker in a process that only sends calls: the broker then
    advertises no task names (``accepts_calls`` is ``False``), so no peer
    routes work here, and anything that arrives anyway is refused rather
    than run. ``max_workers`` is accepted for signature compatibility and
    reported as given (default 1); nothing ever runs.
    """

    DEFAULT_MAX_WORKERS: ClassVar[int] = 1
    accepts_calls: ClassVar[bool] = False

    async def submit(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = getattr(func, "__qualname__", repr(func))
        raise ExecutionRefusedError(f"NullExecutor does not execute tasks (refused {name!r})")

    async def execute(self, func: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = func if isinstance(func, str) else getattr(func, "__qualname__", repr(func))
        raise ExecutionRefusedError(f"NullExecutor does not execute tasks (refused {name!r})")

    async def execute_deferred(self, name: str, arguments: Arguments) -> Any:
        raise ExecutionRefusedError(f"NullExecutor does not execute tasks (refused {name!r})")

    async def _stop_running(self) -> None:
        return None
