"""Tasks served by the workers of ``patio local`` (registry ``patio.worker.demo.tasks:rpc``).

A small mix that shows what a patio mesh does with different kinds of work:

- ``mul``: CPU-light and async; the executor runs it inline.
- ``sha256``: a blocking hash pushed to a thread, so the event loop stays free.
- ``lookup``: waits on simulated I/O (a short sleep), like a call to a database.
- ``flaky``: fails for one argument in ten, to show how remote errors come back
  to the caller (as the exception raised, with the remote traceback) and how
  they are counted in ``patio_calls_finished_total{outcome="error"}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from functools import reduce

from patio.registry import Registry

rpc = Registry(project="patio-local", auto_naming=False)


@rpc("mul")
async def mul(*numbers: int) -> int:
    return reduce(lambda a, b: a * b, numbers, 1)


def _hash(data: bytes, rounds: int) -> str:
    digest = data
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


@rpc("sha256")
async def sha256(text: str, rounds: int = 1000) -> str:
    """``rounds`` chained SHA-256 digests of ``text`` (hex), computed in a thread."""
    return await asyncio.to_thread(_hash, text.encode(), rounds)


@rpc("lookup")
async def lookup(key: str, delay_ms: float = 2.0) -> dict[str, object]:
    await asyncio.sleep(delay_ms / 1000)
    return {"key": key, "value": len(key), "served_by": os.getpid()}


@rpc("flaky")
async def flaky(n: int) -> int:
    if n % 10 == 0:
        # A builtin exception comes back to the caller as itself (ValueError);
        # one of your own classes arrives as RemoteError naming it.
        raise ValueError(f"flaky({n}) fails on purpose (multiples of 10 do)")
    return n * n
