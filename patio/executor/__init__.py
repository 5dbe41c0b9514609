"""Executors: run registered functions locally, bounded.

- :class:`AsyncExecutor` -- coroutine functions, inline in the caller's task.
- :class:`ThreadPoolExecutor` -- blocking functions in a pool of threads.
- :class:`ProcessPoolExecutor` -- CPU-bound functions in a pool of processes.
- :class:`NullExecutor` -- runs nothing; for processes that only call.
"""

from patio.executor.asyncio_executor import AsyncExecutor
from patio.executor.base import AbstractExecutor
from patio.executor.null import NullExecutor
from patio.executor.pool import PoolExecutor, ProcessPoolExecutor, ThreadPoolExecutor

__all__ = [
    "AbstractExecutor",
    "AsyncExecutor",
    "NullExecutor",
    "PoolExecutor",
    "ProcessPoolExecutor",
    "ThreadPoolExecutor",
]
