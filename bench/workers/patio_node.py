"""One benchmark process driving a patio package through its public API.

Run as ``<python> bench/workers/patio_node.py '<json config>'`` by the
orchestrator (``bench/runner.py``). The same file runs under our ``.venv``
(our patio) and under the original ``patio==0.1.4`` virtualenv, so it only
uses the API both share: ``Registry``, ``AsyncExecutor``, ``MemoryBroker``,
``TCPServerBroker``/``TCPClientBroker`` with ``listen``/``connect``/``call``,
and ``key=``. Each package keeps its *default* serializer.

Roles:
  memory  caller and executor in this process, ``MemoryBroker``
  server  executes tasks: ``TCPServerBroker.listen``; waits for ``stop``
  client  calls: ``TCPClientBroker.connect`` to every port in ``peers``
  mesh    both: listens on ``port``, then (``go``) connects to ``peers``,
          then (``start``) runs its load, then (``stop``) exits. Uses
          ``patio.broker.TCPMeshBroker`` when the package has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
from importlib import metadata
from typing import Any

import _bench_common as common  # type: ignore[import-not-found]

import patio
from patio import Registry
from patio.broker import MemoryBroker
from patio.executor import AsyncExecutor

HOST = "127.0.0.1"


def _tcp_classes() -> tuple[Any, Any]:
    try:
        from patio.broker.tcp import TCPClientBroker, TCPServerBroker
    except ImportError:
        from patio.broker import (
            TCPClientBroker,
            TCPServerBroker,
        )
    return TCPServerBroker, TCPClientBroker


def _mesh_class() -> Any:
    import patio.broker as broker_mod

    return getattr(broker_mod, "TCPMeshBroker", None)


def make_registry(with_tasks: bool) -> Registry:
    rpc = Registry(project="bench", auto_naming=False)
    if with_tasks:
        rpc.register(common.echo, "echo")
        rpc.register(common.slow, "slow")
    return rpc


def serializer_name(broker: Any) -> str:
    for holder in (broker, getattr(broker, "protocol", None), getattr(broker, "_protocol", None)):
        if holder is None:
            continue
        for attr in ("serializer", "_serializer"):
            ser = getattr(holder, attr, None)
            if ser is not None:
                return type(ser).__name__
    return "package default"


def describe() -> dict[str, Any]:
    try:
        version = metadata.version("patio")
    except metadata.PackageNotFoundError:
        version = getattr(patio, "__version__", "unknown")
    return {
        "patio_version": version,
        "patio_file": getattr(patio, "__file__", None),
        "python": sys.version.split()[0],
        "loop": common.loop_name(),
    }


def options(cfg: dict[str, Any]) -> dict[str, Any]:
    """Broker keyword arguments a scenario sets (only ours knows ``frame_mac``)."""
    return {} if cfg.get("frame_mac", True) else {"frame_mac": False}


def make_call(broker: Any, name: str, timeout: float | None) -> common.CallFn:
    if timeout is None:

        async def call(*args: Any) -> Any:
            return await broker.call(name, *args)
    else:

        async def call(*args: Any) -> Any:
            return await broker.call(name, *args, timeout=timeout)

    return call


async def run_load(cfg: dict[str, Any], broker: Any) -> dict[str, Any]:
    args = (common.make_payload(cfg.get("payload", 0)),)
    if cfg["mode"] == "flood":
        start = functools.partial(broker.call, cfg["task"])
        flooded: dict[str, Any] = await common.flood(start, args, cfg["count"], cfg["max_seconds"])
        return flooded
    call = make_call(broker, cfg["task"], cfg.get("call_timeout"))
    looped: dict[str, Any] = await common.closed_loop(
        call, args, cfg["concurrency"], cfg["count"], cfg["max_seconds"], cfg["warmup"]
    )
    return looped


async def close_quietly(*objs: Any) -> None:
    for obj in objs:
        if obj is None:
            continue
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(obj.__aexit__(None, None, None), timeout=5)


async def role_memory(cfg: dict[str, Any]) -> None:
    rpc = make_registry(True)
    executor = AsyncExecutor(rpc, max_workers=cfg["workers"])
    await executor.__aenter__()
    broker = MemoryBroker(executor)
    await broker.__aenter__()
    try:
        result = await run_load(cfg, broker)
        common.emit(
            "result", **result, **describe(), serializer="none (in-process)", usage=common.usage()
        )
    finally:
        await close_quietly(broker, executor)


async def role_server(cfg: dict[str, Any], control: common.Control) -> None:
    server_cls, _ = _tcp_classes()
    rpc = make_registry(True)
    executor = AsyncExecutor(rpc, max_workers=cfg["workers"])
    await executor.__aenter__()
    broker = server_cls(executor, key=cfg["key"].encode(), **options(cfg))
    await broker.__aenter__()
    try:
        await broker.listen(HOST, cfg["port"])
        common.emit("ready", **describe(), serializer=serializer_name(broker))
        await control.wait("stop")
        common.emit("stats", usage=common.usage())
    finally:
        await close_quietly(broker, executor)


async def role_client(cfg: dict[str, Any]) -> None:
    _, client_cls = _tcp_classes()
    rpc = make_registry(False)
    executor = AsyncExecutor(rpc, max_workers=cfg["workers"])
    await executor.__aenter__()
    broker = client_cls(executor, key=cfg["key"].encode(), **options(cfg))
    await broker.__aenter__()
    try:
        for port in cfg["peers"]:
            await asyncio.wait_for(broker.connect(HOST, port), timeout=20)
        result = await run_load(cfg, broker)
        common.emit(
            "result",
            **result,
            **describe(),
            serializer=serializer_name(broker),
            usage=common.usage(),
        )
    finally:
        await close_quietly(broker, executor)


def mesh_registry(cfg: dict[str, Any]) -> Registry:
    """In ``remote_only`` meshes node ``i`` calls ``echo<i>``, which every
    node but ``i`` serves: each call crosses the network (no local shortcut)."""
    if not cfg.get("remote_only"):
        return make_registry(True)
    rpc = Registry(project="bench", auto_naming=False)
    for j in range(cfg["nodes"]):
        if j != cfg["index"]:
            rpc.register(common.echo, f"echo{j}")
    return rpc


async def role_mesh(cfg: dict[str, Any], control: common.Control) -> None:
    mesh_cls = _mesh_class()
    rpc = mesh_registry(cfg)
    if cfg.get("remote_only"):
        cfg = {**cfg, "task": f"echo{cfg['index']}"}
    if mesh_cls is not None:
        await mesh_native(cfg, control, mesh_cls, rpc)
        return
    # No mesh broker: every process runs a TCPServerBroker (executes what
    # the others send) and one TCPClientBroker connected to the other three
    # (issues this process's calls, round-robin over its connections).
    server_cls, client_cls = _tcp_classes()
    executor = AsyncExecutor(rpc, max_workers=cfg["workers"])
    await executor.__aenter__()
    client_executor = AsyncExecutor(rpc, max_workers=cfg["workers"])
    await client_executor.__aenter__()
    server = server_cls(executor, key=cfg["key"].encode(), **options(cfg))
    await server.__aenter__()
    client = client_cls(client_executor, key=cfg["key"].encode(), **options(cfg))
    await client.__aenter__()
    try:
        await server.listen(HOST, cfg["port"])
        common.emit(
            "ready", **describe(), serializer=serializer_name(server), mesh="server+client brokers"
        )
        await control.wait("go")
        for port in cfg["peers"]:
            await asyncio.wait_for(client.connect(HOST, port), timeout=20)
        common.emit("connected")
        await control.wait("start")
        result = await run_load(cfg, client)
        common.emit(
            "result",
            **result,
            **describe(),
            serializer=serializer_name(client),
            usage=common.usage(),
        )
        await control.wait("stop")
        common.emit("stats", usage=common.usage())
    finally:
        await close_quietly(client, server, client_executor, executor)


async def mesh_connect(broker: Any, ports: list[int]) -> None:
    """Dial every peer and wait (bounded) until each one is connected."""
    if not hasattr(broker, "add_peer"):
        for port in ports:
            await asyncio.wait_for(broker.connect(HOST, port), timeout=20)
        return
    for port in ports:
        broker.add_peer(HOST, port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        connected = [p for p in broker.peers() if getattr(p, "connected", False)]
        if len(connected) >= len(ports):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"mesh: only {len(connected)} of {len(ports)} peers connected")


def served_for_peers(broker: Any) -> int | None:
    """Calls this broker has executed for other processes so far (None: it cannot tell)."""
    stats = getattr(broker, "stats", None)
    started = getattr(stats, "calls_started", None)
    if started is None:
        return None
    return sum(n for (_, side), n in started.items() if side == "executor")


async def mesh_native(
    cfg: dict[str, Any], control: common.Control, mesh_cls: Any, rpc: Registry
) -> None:
    executor = AsyncExecutor(rpc, max_workers=cfg["workers"])
    await executor.__aenter__()
    broker = mesh_cls(executor, key=cfg["key"].encode(), **options(cfg))
    await broker.__aenter__()
    try:
        await broker.listen(HOST, cfg["port"])
        common.emit(
            "ready", **describe(), serializer=serializer_name(broker), mesh=mesh_cls.__name__
        )
        await control.wait("go")
        await mesh_connect(broker, cfg["peers"])
        common.emit("connected")
        await control.wait("start")
        served_before = served_for_peers(broker)
        result = await run_load(cfg, broker)
        common.emit(
            "result",
            **result,
            **describe(),
            serializer=serializer_name(broker),
            usage=common.usage(),
        )
        await control.wait("stop")
        served = served_for_peers(broker)
        remote = None if served is None or served_before is None else served - served_before
        # Executions for other members over the whole load (warm-up included):
        # the runner tells local from remote execution with it.
        common.emit("stats", usage=common.usage(), served_remote=remote)
    finally:
        await close_quietly(broker, executor)


async def main(cfg: dict[str, Any]) -> None:
    control = common.Control()
    role = cfg["role"]
    if role == "memory":
        await role_memory(cfg)
    elif role == "server":
        await role_server(cfg, control)
    elif role == "client":
        await role_client(cfg)
    elif role == "mesh":
        await role_mesh(cfg, control)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    if config.get("tracemalloc"):
        import tracemalloc

        tracemalloc.start(1)
    try:
        common.run(main(config), config["use_uvloop"])
    except Exception as exc:  # report, then fail
        common.emit("error", error=f"{type(exc).__name__}: {exc}"[:1000])
        raise
