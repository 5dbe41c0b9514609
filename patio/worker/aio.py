"""Running the worker's coroutines: on uvloop when it is installed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``auto``: uvloop when installed; ``uvloop``: required; ``asyncio``: the standard loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional dependency
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_async(coro: Coroutine[Any, Any, T], *, event_loop: str = "auto") -> T:
    """``asyncio.run`` with uvloop when available (about twice the calls per second)."""
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        return runner.run(coro)
