"""Tasks the worker tests serve (imported by worker subprocesses as
``patio_worker_testtasks:rpc``; tests/worker is put on their PYTHONPATH)."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import uuid

from patio.registry import Registry

rpc = Registry(project="patio-worker-tests", auto_naming=False)

not_a_registry = {"mul": "this is a dict, not a Registry"}


@rpc("mul")
async def mul(a: int, b: int) -> int:
    return a * b


@rpc("echo")
async def echo(*args: object) -> list[object]:
    return list(args)


@rpc("sleep")
async def sleep(seconds: float) -> int:
    await asyncio.sleep(seconds)
    return os.getpid()


@rpc("fail")
async def fail(message: str) -> None:
    raise ValueError(message)


@rpc("pid")
async def pid() -> int:
    return os.getpid()


@rpc("typed")
async def typed() -> dict[str, object]:
    """Values JSON lacks, as a task might return them."""
    return {
        "when": datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC),
        "amount": decimal.Decimal("1.10"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    }


@rpc("greet")
async def greet(name: str, *, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"
