"""Tasks the worker tests serve (imported by worker subprocesses as
``patio_worker_testtasks:rpc``; tests/worker is put on their PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os

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
