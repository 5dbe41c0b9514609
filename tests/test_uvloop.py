"""The TCP brokers under uvloop, the worker's default loop."""

from __future__ import annotations

import asyncio
import ssl

import uvloop

from patio import AsyncExecutor, NullExecutor, Registry, TCPClientBroker, TCPServerBroker
from tests.conftest import free_port

rpc = Registry(project="uvloop", auto_naming=False)


@rpc("add")
async def add(a: int, b: int) -> int:
    return a + b


async def round_trip(port: int) -> list[int]:
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key="k") as server,
        NullExecutor(Registry()) as null,
        TCPClientBroker(null, key="k") as client,
    ):
        await server.listen("127.0.0.1", port)
        await client.connect("127.0.0.1", port)
        return await asyncio.gather(*[client.call("add", i, 1, timeout=5) for i in range(100)])


def test_tcp_round_trip_on_uvloop() -> None:
    port = free_port()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.get_loop().__class__.__module__.startswith("uvloop")
        assert runner.run(round_trip(port)) == [i + 1 for i in range(100)]


async def tls_round_trip(port: int, server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext) -> int:
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key="k", ssl_context=server_ssl) as server,
        NullExecutor(Registry()) as null,
        TCPClientBroker(null, key="k", ssl_context=client_ssl) as client,
    ):
        await server.listen("127.0.0.1", port)
        await client.connect("127.0.0.1", port)
        total: int = await client.call("add", 20, 22, timeout=5)
        return total


def test_tls_round_trip_on_uvloop(server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext) -> None:
    """The listener starts TLS itself (start_tls), which uvloop must hand over before reading."""
    port = free_port()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(tls_round_trip(port, server_ssl, client_ssl)) == 42
