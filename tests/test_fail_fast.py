"""Errors come at once when the answer is already known.

A wrong key is not a network blip (retrying cannot fix it), and a peer that
refuses connections is not a peer that is still starting: neither makes a
caller wait for a timeout. Peers still connecting are waited for briefly.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from patio import AsyncExecutor, NullExecutor, Registry
from patio.broker import TCPClientBroker, TCPMeshBroker, TCPServerBroker
from patio.errors import (
    AuthenticationError,
    FrameMacMismatchError,
    FrameMacRefusedError,
    NoRouteError,
    PeerConnectionError,
    PeersUnreachableError,
)
from patio.proto import KeySet
from tests.conftest import free_port

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftover_tasks")]

# Strong keys: every weak key has the same fingerprint (patio/proto/keys.py),
# and the first test tells our key's fingerprint from theirs.
KEY = b"fail-fast-test-key-0123456789abcdefghij"
CLIENT_KEY = b"client-key-0123456789abcdefghijklmnopq"


def mul(a: int, b: int) -> int:
    return a * b


def registry() -> Registry:
    rpc = Registry()
    rpc.register(mul, "mul")
    return rpc


async def test_server_that_refuses_our_key_fails_connect_at_once() -> None:
    """We accept the server's key but it does not accept ours: it tells us, we stop."""
    async with AsyncExecutor(registry()) as executor, TCPServerBroker(executor, KEY) as server:
        await server.listen("127.0.0.1", 0)
        async with (
            NullExecutor(Registry()) as null,
            TCPClientBroker(null, CLIENT_KEY, accepted_keys=[KEY]) as client,
        ):
            t0 = time.monotonic()
            with pytest.raises(AuthenticationError) as info:
                await client.connect("127.0.0.1", server.listening[0][1])
            assert time.monotonic() - t0 < 1.0
            message = str(info.value)
            assert "refused our key" in message
            assert KeySet(CLIENT_KEY).fingerprint in message  # ours, to compare with theirs
            # Theirs too, from their HELLO (published by design, patio/proto/keys.py);
            # REFUSED itself carries nothing (tests/test_proto.py).
            assert KeySet(KEY).fingerprint in message
            assert isinstance(info.value, PeerConnectionError)  # what connect() raised before
            assert client.peers() == []
        assert server.stats.handshake_failures["auth"] == 1


@pytest.mark.parametrize("server_mac", [True, False])
async def test_server_with_another_frame_mac_setting_fails_connect_at_once(
    server_mac: bool,
) -> None:
    """frame_mac differs: the HELLOs say so, connect() stops instead of retrying."""
    async with (
        AsyncExecutor(registry()) as executor,
        TCPServerBroker(executor, KEY, frame_mac=server_mac) as server,
    ):
        await server.listen("127.0.0.1", 0)
        port = server.listening[0][1]
        async with (
            NullExecutor(Registry()) as null,
            TCPClientBroker(null, KEY, frame_mac=not server_mac, connect_timeout=20) as client,
        ):
            t0 = time.monotonic()
            with pytest.raises(FrameMacRefusedError) as info:
                await client.connect("127.0.0.1", port)
            assert time.monotonic() - t0 < 3.0  # not the retry loop up to connect_timeout
            message = str(info.value)
            theirs, ours = ("on", "off") if server_mac else ("off", "on")
            assert f"has frame authentication {theirs} and this side has it {ours}" in message
            assert "start both ends with --no-frame-mac" in message
            assert isinstance(info.value, PeerConnectionError)  # what connect() raised before
            assert isinstance(info.value, FrameMacMismatchError)
            assert client.peers() == []
            # A call routed to it while it is the only peer fails at once too.
            client.add_peer("127.0.0.1", port)
            t0 = time.monotonic()
            with pytest.raises(PeersUnreachableError, match="--no-frame-mac"):
                await client.call("mul", 2, 3, timeout=20)
            assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("timeout", [None, 30.0])
async def test_call_while_every_peer_refuses_connections_fails_at_once(
    timeout: float | None,
) -> None:
    dead = [free_port(), free_port()]
    async with NullExecutor(Registry()) as null, TCPClientBroker(null, KEY) as client:
        for port in dead:
            client.add_peer("127.0.0.1", port)
        t0 = time.monotonic()
        with pytest.raises(PeersUnreachableError) as info:
            await client.call("mul", 2, 3, timeout=timeout)
        assert time.monotonic() - t0 < 2.0
        assert isinstance(info.value, ConnectionError)
        assert not isinstance(info.value, NoRouteError)
        assert sorted(info.value.peers) == sorted(f"127.0.0.1:{port}" for port in dead)
        assert "unreachable" in str(info.value)
        assert all(f"127.0.0.1:{port}" in str(info.value) for port in dead)


async def test_call_after_the_only_server_went_down_fails_at_once() -> None:
    async with AsyncExecutor(registry()) as executor:
        server = TCPServerBroker(executor, KEY)
        await server.setup()
        await server.listen("127.0.0.1", 0)
        port = server.listening[0][1]
        async with NullExecutor(Registry()) as null, TCPClientBroker(null, KEY) as client:
            await client.connect("127.0.0.1", port)
            assert await client.call("mul", 2, 3) == 6
            await server.close()
            while client.links():  # a call sent before we learn of it fails as a lost link
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            with pytest.raises(PeersUnreachableError, match=f"127.0.0.1:{port}"):
                await client.call("mul", 2, 3)
            assert time.monotonic() - t0 < 2.0


async def test_no_route_when_connected_peers_serve_other_names() -> None:
    async with AsyncExecutor(registry()) as executor, TCPServerBroker(executor, KEY) as server:
        await server.listen("127.0.0.1", 0)
        async with NullExecutor(Registry()) as null, TCPClientBroker(null, KEY) as client:
            await client.connect("127.0.0.1", server.listening[0][1])
            t0 = time.monotonic()
            with pytest.raises(NoRouteError, match=r"'div'.*they serve: mul"):
                await client.call("div", 6, 3)
            assert time.monotonic() - t0 < 1.0


async def test_call_waits_briefly_for_a_peer_still_connecting() -> None:
    """A member started a moment before its peers waits ``route_wait`` for them."""
    port = free_port()
    async with (
        NullExecutor(Registry()) as null,
        TCPMeshBroker(null, KEY, route_wait=3.0) as caller,
        AsyncExecutor(registry()) as executor,
        TCPMeshBroker(executor, KEY) as late,
    ):
        await caller.listen("127.0.0.1", 0)
        call = asyncio.create_task(caller.call("mul", 6, 7))  # nobody known yet: it waits
        await asyncio.sleep(0.3)
        assert not call.done()
        await late.listen("127.0.0.1", port)
        late.add_peer("127.0.0.1", caller.listening[0][1])  # it dials us
        assert await asyncio.wait_for(call, 3) == 42


async def test_route_wait_is_configurable() -> None:
    async with (
        NullExecutor(Registry()) as null,
        TCPServerBroker(null, KEY, route_wait=0.2) as lonely,
    ):
        await lonely.listen("127.0.0.1", 0)
        t0 = time.monotonic()
        with pytest.raises(NoRouteError):
            await lonely.call("mul", 1, 2)
        assert 0.15 < time.monotonic() - t0 < 1.5
