"""TCP brokers over real sockets: routing, deadlines, cancellation, errors, failures."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from patio import AsyncExecutor, NullExecutor, Registry, TCPClientBroker, TCPServerBroker
from patio.broker.serializer import MsgpackSerializer
from patio.errors import (
    AuthenticationError,
    CallTimeoutError,
    NoRouteError,
    PeerConnectionError,
    RegistryLockedError,
    RemoteError,
    SerializationError,
)

KEY = b"tcp-broker-test-key"
HOSTS = ["127.0.0.1", "::1"]

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftover_tasks")]


class UserError(Exception):
    """A user-defined exception: must arrive as itself, not as RemoteError."""


class NeedsKeyword(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def registry(**tasks: Callable[..., Any]) -> Registry:
    rpc = Registry()
    for name, func in tasks.items():
        rpc.register(func, name)
    return rpc


@contextlib.asynccontextmanager
async def serving(
    rpc: Registry,
    host: str = "127.0.0.1",
    *,
    max_workers: int | None = None,
    port: int = 0,
    **kwargs: Any,
) -> AsyncIterator[tuple[TCPServerBroker, int]]:
    kwargs.setdefault("key", KEY)
    async with (
        AsyncExecutor(rpc, max_workers=max_workers) as executor,
        TCPServerBroker(executor, **kwargs) as broker,
    ):
        await broker.listen(host, port)
        yield broker, broker.listening[0][1]


@contextlib.asynccontextmanager
async def connected(
    *servers: tuple[str, int],
    rpc: Registry | None = None,
    executes: bool = False,
    **kwargs: Any,
) -> AsyncIterator[TCPClientBroker]:
    kwargs.setdefault("key", KEY)
    rpc = rpc if rpc is not None else Registry()
    executor = AsyncExecutor(rpc) if executes else NullExecutor(rpc)
    async with executor, TCPClientBroker(executor, **kwargs) as broker:
        for host, port in servers:
            await broker.connect(host, port)
        yield broker


async def wait_until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def wait_announced(broker: TCPClientBroker | TCPServerBroker, name: str) -> None:
    """Wait until some peer of ``broker`` has announced ``name``."""
    await wait_until(lambda: any(name in p.names for p in broker.peers()))


def mul(a: int, b: int) -> int:
    return a * b


# -- basic calls ----------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
async def test_one_server_one_client(host: str) -> None:
    async with serving(registry(mul=mul), host) as (_, port), connected((host, port)) as client:
        assert await client.call("mul", 6, 7) == 42
        results = await asyncio.gather(*(client.call("mul", i, 2, timeout=5) for i in range(50)))
        assert results == [i * 2 for i in range(50)]
        (peer,) = client.peers()
        assert peer.connected and "mul" in peer.names


async def test_call_by_function_object_uses_registered_name() -> None:
    def different_mul(a: int, b: int) -> int:  # the server's own implementation
        return a * b + 1

    caller_rpc = registry(mul=mul)  # the caller only knows the name through its registry
    async with (
        serving(registry(mul=different_mul)) as (_, port),
        connected(("127.0.0.1", port), rpc=caller_rpc) as client,
    ):
        assert await client.call(mul, 2, 3) == 7
        assert await client.call("mul", 2, 3) == 7


async def test_kwargs_travel() -> None:
    def fmt(a: Any, b: Any = "B", *, c: Any = "C", **rest: Any) -> list[Any]:
        return [a, b, c, sorted(rest.items())]

    async with serving(registry(fmt=fmt)) as (_, port), connected(("127.0.0.1", port)) as client:
        assert await client.call("fmt", 1) == [1, "B", "C", []]
        assert await client.call("fmt", 1, c=(1, 2), z={"k": b"v"}, b=None) == [
            1,
            None,
            (1, 2),
            [("z", {"k": b"v"})],
        ]


async def test_client_spreads_calls_across_servers() -> None:
    def whoami(index: int) -> Callable[[], Any]:
        async def task() -> int:
            await asyncio.sleep(0.05)
            return index

        return task

    async with contextlib.AsyncExitStack() as stack:
        ports = [
            (await stack.enter_async_context(serving(registry(who=whoami(i)))))[1] for i in range(3)
        ]
        client = await stack.enter_async_context(connected(*(("127.0.0.1", p) for p in ports)))
        await wait_until(lambda: sum("who" in p.names for p in client.peers()) == 3)
        counts = Counter(await asyncio.gather(*(client.call("who", timeout=5) for _ in range(30))))
        assert set(counts) == {0, 1, 2}
        assert min(counts.values()) >= 5, counts


async def test_calls_go_only_to_servers_serving_the_name() -> None:
    seen: Counter[str] = Counter()

    def task(tag: str) -> Callable[[], str]:
        def run() -> str:
            seen[tag] += 1
            return tag

        return run

    async with (
        serving(registry(common=task("s0-common"), only0=task("s0-only"))) as (_, p0),
        serving(registry(common=task("s1-common"), only1=task("s1-only"))) as (_, p1),
        connected(("127.0.0.1", p0), ("127.0.0.1", p1)) as client,
    ):
        await wait_announced(client, "only0")
        await wait_announced(client, "only1")
        for _ in range(20):
            assert await client.call("only0", timeout=5) == "s0-only"
            assert await client.call("only1", timeout=5) == "s1-only"
        await asyncio.gather(*(client.call("common", timeout=5) for _ in range(40)))
        assert seen["s0-only"] == seen["s1-only"] == 20
        assert seen["s0-common"] + seen["s1-common"] == 40
        assert seen["s0-common"] > 0 and seen["s1-common"] > 0


async def test_mixed_mode_server_calls_client() -> None:
    async def on_client(x: int) -> str:
        return f"client:{x}"

    async with (
        serving(registry(mul=mul)) as (server, port),
        connected(("127.0.0.1", port), rpc=registry(on_client=on_client), executes=True) as client,
    ):
        await wait_announced(server, "on_client")
        server_side, client_side = await asyncio.gather(
            server.call("on_client", 5, timeout=5), client.call("mul", 5, 5, timeout=5)
        )
        assert server_side == "client:5"
        assert client_side == 25
        # The client does not execute what it does not register, and vice versa.
        with pytest.raises(NoRouteError):
            await server.call("mul", 1, 1, timeout=2)


# -- deadlines and cancellation ----------------------------------------------------


def forever_task(started: asyncio.Event, finished: asyncio.Event) -> Callable[[], Any]:
    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            finished.set()

    return forever


async def test_timeout_raises_and_cancels_remote_task() -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    rpc = registry(forever=forever_task(started, finished), mul=mul)
    async with serving(rpc) as (server, port), connected(("127.0.0.1", port)) as client:
        t0 = time.monotonic()
        with pytest.raises(CallTimeoutError) as info:
            await client.call("forever", timeout=0.3)
        elapsed = time.monotonic() - t0
        assert isinstance(info.value, TimeoutError)
        assert 0.25 <= elapsed < 1.5, elapsed
        assert started.is_set()
        await asyncio.wait_for(finished.wait(), 2)
        assert client.stats.calls_finished[("forever", "caller", "timeout")] == 1
        await wait_until(
            lambda: (
                server.stats.calls_finished[("forever", "executor", "timeout")]
                + server.stats.calls_finished[("forever", "executor", "cancelled")]
                == 1
            )
        )
        assert await client.call("mul", 2, 2, timeout=2) == 4


async def test_caller_cancellation_cancels_remote_task() -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    rpc = registry(forever=forever_task(started, finished), mul=mul)
    async with serving(rpc) as (server, port), connected(("127.0.0.1", port)) as client:
        call = asyncio.create_task(client.call("forever"))  # no timeout at all
        await asyncio.wait_for(started.wait(), 2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(finished.wait(), 2)
        await wait_until(
            lambda: server.stats.calls_finished[("forever", "executor", "cancelled")] == 1
        )
        assert client.stats.calls_finished[("forever", "caller", "cancelled")] == 1
        assert await client.call("mul", 3, 3, timeout=2) == 9


async def test_deadline_passed_before_start_is_dropped() -> None:
    ran: list[int] = []

    def record(x: int) -> int:
        ran.append(x)
        return x

    async with (
        serving(registry(record=record)) as (server, port),
        connected(("127.0.0.1", port)) as client,
    ):
        with pytest.raises(CallTimeoutError):
            await client.call("record", 1, timeout=0)
        await wait_until(
            lambda: server.stats.calls_finished[("record", "executor", "timeout")] == 1
        )
        assert await client.call("record", 2, timeout=2) == 2
        assert ran == [2]


async def test_call_queued_past_its_deadline_never_runs() -> None:
    release = asyncio.Event()
    ran: list[str] = []

    async def block() -> None:
        ran.append("block")
        await release.wait()

    def quick() -> None:
        ran.append("quick")

    async with (
        serving(registry(block=block, quick=quick), max_workers=1) as (_, port),
        connected(("127.0.0.1", port)) as client,
    ):
        blocker = asyncio.create_task(client.call("block", timeout=5))
        await wait_until(lambda: ran == ["block"])
        with pytest.raises(CallTimeoutError):
            await client.call("quick", timeout=0.2)
        release.set()
        await blocker
        await asyncio.sleep(0.1)
        assert ran == ["block"]


# -- no route ------------------------------------------------------------------


async def test_unknown_name_fails_promptly() -> None:
    async with serving(registry(mul=mul)) as (_, port), connected(("127.0.0.1", port)) as client:
        await wait_announced(client, "mul")
        t0 = time.monotonic()
        with pytest.raises(NoRouteError, match="nope") as info:
            await client.call("nope", timeout=10)
        assert time.monotonic() - t0 < 1.0
        assert isinstance(info.value, TimeoutError)
        assert "mul" in str(info.value)  # says what the peers do serve
        assert client.stats.calls_finished[("nope", "caller", "no_route")] == 1


async def test_unknown_name_fails_promptly_right_after_connect() -> None:
    """Even before the server's announce has been processed, no full route_wait."""
    async with serving(registry(mul=mul)) as (_, port), connected(("127.0.0.1", port)) as client:
        t0 = time.monotonic()
        with pytest.raises(NoRouteError):
            await client.call("nope")
        assert time.monotonic() - t0 < 1.0


async def test_server_calling_unknown_name_fails_promptly() -> None:
    async with (
        serving(registry(mul=mul)) as (server, port),
        connected(("127.0.0.1", port)),
    ):
        await wait_until(lambda: len(server.peers()) == 1)
        t0 = time.monotonic()
        with pytest.raises(NoRouteError):
            await server.call("nope")
        assert time.monotonic() - t0 < 1.0


async def test_no_peers_at_all_waits_route_wait() -> None:
    async with serving(registry(mul=mul), route_wait=0.5) as (server, _):
        t0 = time.monotonic()
        with pytest.raises(NoRouteError) as info:
            await server.call("anything")
        elapsed = time.monotonic() - t0
        assert isinstance(info.value, TimeoutError)
        assert 0.4 <= elapsed < 1.5, elapsed


async def test_client_without_servers_waits_route_wait() -> None:
    async with connected(route_wait=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(NoRouteError):
            await client.call("anything")
        assert 0.4 <= time.monotonic() - t0 < 1.5


async def test_route_wait_never_outlasts_the_call_timeout() -> None:
    async with serving(registry(mul=mul), route_wait=5.0) as (server, _):
        t0 = time.monotonic()
        with pytest.raises(NoRouteError):
            await server.call("anything", timeout=0.3)
        assert time.monotonic() - t0 < 1.0


async def test_call_waits_for_a_server_still_connecting() -> None:
    """route_wait covers a peer that is only just arriving."""
    async with serving(registry(mul=mul), route_wait=3.0) as (server, port):
        call = asyncio.create_task(server.call("on_client", timeout=3))
        await asyncio.sleep(0.2)

        async def on_client() -> str:
            return "late"

        async with connected(("127.0.0.1", port), rpc=registry(on_client=on_client), executes=True):
            assert await call == "late"


# -- remote errors -----------------------------------------------------------------


async def test_remote_exceptions_arrive_as_their_types() -> None:
    def builtin() -> None:
        raise ValueError("x", 1)

    def user() -> None:
        raise UserError("boom", {"detail": [1, 2]})

    def unserializable_args() -> None:
        raise ValueError(object())

    def keyword_only() -> None:
        raise NeedsKeyword(code=3)

    def unprintable() -> None:
        raise Unprintable("hidden")

    def key_error() -> None:
        raise KeyError("missing")

    rpc = registry(
        builtin=builtin,
        user=user,
        unserializable_args=unserializable_args,
        keyword_only=keyword_only,
        unprintable=unprintable,
        key_error=key_error,
        mul=mul,
    )
    async with serving(rpc) as (server, port), connected(("127.0.0.1", port)) as client:
        with pytest.raises(ValueError) as builtin_info:
            await client.call("builtin", timeout=5)
        assert type(builtin_info.value) is ValueError
        assert builtin_info.value.args == ("x", 1)
        assert any("Remote traceback" in note for note in builtin_info.value.__notes__)

        with pytest.raises(UserError) as user_info:
            await client.call("user", timeout=5)
        assert user_info.value.args == ("boom", {"detail": [1, 2]})

        with pytest.raises(ValueError, match="object") as odd_info:
            await client.call("unserializable_args", timeout=5)
        assert type(odd_info.value) is ValueError

        with pytest.raises(RemoteError, match="NeedsKeyword") as remote_info:
            await client.call("keyword_only", timeout=5)
        assert "code 3" in str(remote_info.value)

        with pytest.raises((Unprintable, RemoteError)):
            await client.call("unprintable", timeout=5)

        with pytest.raises(KeyError):
            await client.call("key_error", timeout=5)

        assert await client.call("mul", 2, 5, timeout=5) == 10
        assert client.stats.calls_finished[("builtin", "caller", "error")] == 1
        assert server.stats.calls_finished[("builtin", "executor", "error")] == 1


async def test_unserializable_result_gives_serialization_error_and_link_survives() -> None:
    def bad_result(*args: Any) -> object:
        return object()

    async with (
        serving(registry(bad=bad_result, mul=mul)) as (_, port),
        connected(("127.0.0.1", port)) as client,
    ):
        with pytest.raises(SerializationError, match="result"):
            await client.call("bad", timeout=5)
        assert await client.call("mul", 4, 4, timeout=5) == 16
        # Many in a row, interleaved with good calls: the link keeps working.
        results = await asyncio.gather(
            *(client.call("bad" if i % 2 else "mul", i, 1, timeout=5) for i in range(20)),
            return_exceptions=True,
        )
        assert [type(r) for r in results[1::2]] == [SerializationError] * 10
        assert results[0::2] == [i for i in range(0, 20, 2)]
        (peer,) = client.peers()
        assert peer.connected


async def test_unserializable_arguments_fail_locally() -> None:
    async with serving(registry(mul=mul)) as (_, port), connected(("127.0.0.1", port)) as client:
        with pytest.raises(SerializationError, match="arguments"):
            await client.call("mul", object(), 1, timeout=5)
        assert await client.call("mul", 2, 2, timeout=5) == 4


# -- lost connections and retries ---------------------------------------------------


@pytest.mark.parametrize("how", ["abort-links", "close-server"])
async def test_dropped_connection_fails_in_flight_calls_at_once(how: str) -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    rpc = registry(forever=forever_task(started, finished))
    async with serving(rpc) as (server, port), connected(("127.0.0.1", port)) as client:
        calls = [asyncio.create_task(client.call("forever")) for _ in range(3)]  # timeout=None
        await asyncio.wait_for(started.wait(), 2)
        t0 = time.monotonic()
        if how == "abort-links":
            for peer in list(server.links()):
                peer.link.abort("test kills the link")
        else:
            await server.close()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2)
        assert time.monotonic() - t0 < 1.0
        for result in results:
            assert isinstance(result, PeerConnectionError), result
            assert isinstance(result, ConnectionError)
        await asyncio.wait_for(finished.wait(), 2)  # and the server-side task is gone
        assert client.stats.calls_finished[("forever", "caller", "connection")] == 3


@pytest.mark.parametrize("how", ["abort-links", "close-server"])
async def test_retryable_call_moves_to_another_server(how: str) -> None:
    started: list[int] = []

    def work(index: int) -> Callable[[], Any]:
        async def task() -> int:
            started.append(index)
            await asyncio.sleep(0.5)
            return index

        return task

    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(serving(registry(work=work(i)))) for i in range(2)
        ]
        client = await stack.enter_async_context(
            connected(*(("127.0.0.1", port) for _, port in servers))
        )
        await wait_until(lambda: sum("work" in p.names for p in client.peers()) == 2)
        call = asyncio.create_task(client.call("work", timeout=5, retryable=True))
        await wait_until(lambda: len(started) == 1)
        first = started[0]
        victim = servers[first][0]
        if how == "abort-links":
            victim.stop_listening()  # stay down: no reconnect to it
            for peer in list(victim.links()):
                peer.link.abort("test kills the server")
        else:
            await victim.close()
        assert await asyncio.wait_for(call, 3) == 1 - first
        assert started == [first, 1 - first]
        assert client.stats.calls_retried == 1


async def test_non_retryable_call_is_not_resent() -> None:
    started: list[int] = []

    def work(index: int) -> Callable[[], Any]:
        async def task() -> int:
            started.append(index)
            await asyncio.sleep(0.5)
            return index

        return task

    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(serving(registry(work=work(i)))) for i in range(2)
        ]
        client = await stack.enter_async_context(
            connected(*(("127.0.0.1", port) for _, port in servers))
        )
        await wait_until(lambda: sum("work" in p.names for p in client.peers()) == 2)
        call = asyncio.create_task(client.call("work", timeout=5))
        await wait_until(lambda: len(started) == 1)
        for peer in list(servers[started[0]][0].links()):
            peer.link.abort("test kills the link")
        with pytest.raises(PeerConnectionError):
            await asyncio.wait_for(call, 2)
        assert len(started) == 1
        assert client.stats.calls_retried == 0


async def test_client_reconnects_after_link_loss() -> None:
    async with (
        serving(registry(mul=mul)) as (server, port),
        connected(("127.0.0.1", port)) as client,
    ):
        for peer in list(server.links()):
            peer.link.abort("test kills the link")
        await wait_until(lambda: client.stats.reconnects == 1)
        assert await client.call("mul", 3, 5, timeout=5) == 15


async def test_caller_going_away_cancels_its_remote_work() -> None:
    started, finished = asyncio.Event(), asyncio.Event()
    rpc = registry(forever=forever_task(started, finished))
    async with serving(rpc) as (server, port):
        async with connected(("127.0.0.1", port)) as client:
            call = asyncio.create_task(client.call("forever"))
            await asyncio.wait_for(started.wait(), 2)
        with pytest.raises(PeerConnectionError):
            await call
        await asyncio.wait_for(finished.wait(), 2)
        await wait_until(lambda: server.peers() == [])


async def test_client_reconnects_to_a_restarted_server(port: int) -> None:
    def first() -> str:
        return "first"

    def second() -> str:
        return "second"

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(serving(registry(who=first), port=port))
        async with connected(("127.0.0.1", port)) as client:
            assert await client.call("who", timeout=2) == "first"
            await stack.aclose()  # the server goes away...
            with pytest.raises((PeerConnectionError, NoRouteError)):
                await client.call("who", timeout=0.5)
            async with serving(registry(who=second), port=port):  # ...and comes back
                await wait_announced(client, "who")
                assert await client.call("who", timeout=2) == "second"
            assert client.stats.reconnects >= 1


async def test_retryable_call_with_no_server_left_fails_within_its_timeout() -> None:
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(10)

    async with contextlib.AsyncExitStack() as stack:
        server, port = await stack.enter_async_context(serving(registry(work=work)))
        client = await stack.enter_async_context(connected(("127.0.0.1", port)))
        call = asyncio.create_task(client.call("work", timeout=1.0, retryable=True))
        await asyncio.wait_for(started.wait(), 2)
        t0 = time.monotonic()
        await server.close()
        with pytest.raises(TimeoutError):  # NoRouteError or CallTimeoutError, both are
            await asyncio.wait_for(call, 3)
        assert time.monotonic() - t0 < 1.5


async def test_idle_link_survives_heartbeats() -> None:
    heartbeat = 0.1
    async with (
        serving(registry(mul=mul), heartbeat_interval=heartbeat) as (server, port),
        connected(("127.0.0.1", port), heartbeat_interval=heartbeat) as client,
    ):
        await asyncio.sleep(12 * heartbeat)
        assert client.stats.disconnects == server.stats.disconnects == 0
        assert await client.call("mul", 7, 6, timeout=2) == 42


async def test_many_clients_one_server() -> None:
    async with serving(registry(mul=mul)) as (server, port), contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connected(("127.0.0.1", port))) for _ in range(8)
        ]
        results = await asyncio.gather(
            *(c.call("mul", i, j, timeout=5) for i, c in enumerate(clients) for j in range(25))
        )
        assert results == [i * j for i in range(8) for j in range(25)]
        assert len(server.peers()) == 8


@pytest.mark.parametrize("address", ["[::1]", "localhost"])
async def test_connect_by_bracketed_ipv6_or_name(address: str) -> None:
    listen_on = "::1" if address.startswith("[") else "127.0.0.1"
    async with (
        serving(registry(mul=mul), listen_on) as (_, port),
        connected((address, port)) as client,
    ):
        assert await client.call("mul", 5, 5, timeout=5) == 25


# -- keys --------------------------------------------------------------------------


async def test_empty_key_on_loopback_warns_and_works() -> None:
    async with (
        AsyncExecutor(registry(mul=mul)) as executor,
        TCPServerBroker(executor) as server,
    ):
        with pytest.warns(UserWarning, match="empty key"):
            await server.listen("127.0.0.1", 0)
        port = server.listening[0][1]
        async with connected(("127.0.0.1", port), key=b"") as client:
            assert await client.call("mul", 2, 21, timeout=5) == 42


async def test_empty_key_on_non_loopback_is_refused() -> None:
    async with (
        AsyncExecutor(registry(mul=mul)) as executor,
        TCPServerBroker(executor) as server,
    ):
        with pytest.raises(ValueError, match="empty key"):
            await server.listen("0.0.0.0", 0)
        assert server.listening == []


async def test_empty_key_on_non_loopback_allowed_explicitly() -> None:
    async with (
        AsyncExecutor(registry(mul=mul)) as executor,
        TCPServerBroker(executor, allow_empty_key=True) as server,
    ):
        await server.listen("0.0.0.0", 0)
        port = server.listening[0][1]
        async with connected(("127.0.0.1", port), key=b"") as client:
            assert await client.call("mul", 1, 2, timeout=5) == 2


@pytest.mark.parametrize(
    "key", [b"k", b"\x00", os.urandom(10 * 1024), "a text key \N{SNOWMAN}"], ids=repr
)
async def test_keys_of_any_length(key: bytes | str) -> None:
    async with (
        serving(registry(mul=mul), key=key) as (_, port),
        connected(("127.0.0.1", port), key=key) as client,
    ):
        assert await client.call("mul", 3, 3, timeout=5) == 9


async def test_wrong_key_cannot_connect() -> None:
    async with serving(registry(mul=mul)) as (server, port):
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError, match="fingerprint"):
            async with connected(("127.0.0.1", port), key=b"wrong"):  # connect_timeout 10 s
                pass
        assert time.monotonic() - t0 < 1.0  # refused at once, not retried until the timeout
        assert server.stats.handshake_failures["auth"] >= 1
        assert server.peers() == []


@pytest.mark.parametrize("host", ["::1", "localhost"])
async def test_empty_key_on_other_loopback_names_warns(host: str) -> None:
    async with (
        AsyncExecutor(registry(mul=mul)) as executor,
        TCPServerBroker(executor) as server,
    ):
        with pytest.warns(UserWarning, match="empty key"):
            await server.listen(host, 0)


async def test_set_keys_rotates_for_new_links_and_keeps_old_ones() -> None:
    async with (
        serving(registry(mul=mul), key=b"old") as (server, port),
        connected(("127.0.0.1", port), key=b"old") as old_client,
    ):
        server.set_keys(b"new", accepted_keys=[b"old"])
        async with connected(("127.0.0.1", port), key=b"new") as new_client:
            assert await new_client.call("mul", 2, 2, timeout=5) == 4
        assert await old_client.call("mul", 3, 3, timeout=5) == 9
        server.set_keys(b"new")
        with pytest.raises(PeerConnectionError):
            async with connected(("127.0.0.1", port), key=b"old", connect_timeout=0.5):
                pass
        assert await old_client.call("mul", 4, 4, timeout=5) == 16  # still up


async def test_key_rotation_between_brokers() -> None:
    async with serving(registry(mul=mul), key=b"new", accepted_keys=[b"old"]) as (_, port):
        async with connected(("127.0.0.1", port), key=b"old", accepted_keys=[b"new"]) as client:
            assert await client.call("mul", 2, 2, timeout=5) == 4
        async with connected(("127.0.0.1", port), key=b"new") as client:
            assert await client.call("mul", 2, 3, timeout=5) == 6


# -- registry and stats ----------------------------------------------------------


async def test_registry_locked_after_setup() -> None:
    rpc = registry(mul=mul)
    async with serving(rpc):
        assert rpc.is_locked
        with pytest.raises(RegistryLockedError):
            rpc.register(lambda: None, "late")
        with pytest.raises(RegistryLockedError):
            del rpc["mul"]


async def test_stats_counters() -> None:
    def fail() -> None:
        raise ValueError("no")

    async with (
        serving(registry(mul=mul, fail=fail)) as (server, port),
        connected(("127.0.0.1", port)) as client,
    ):
        assert server.stats.connects == client.stats.connects == 1
        for i in range(5):
            await client.call("mul", i, i, timeout=5)
        with pytest.raises(ValueError):
            await client.call("fail", timeout=5)
        with pytest.raises(NoRouteError):
            await client.call("missing", timeout=5)
        c, s = client.stats, server.stats
        assert c.calls_started[("mul", "caller")] == 5
        assert c.calls_finished[("mul", "caller", "ok")] == 5
        assert c.calls_finished[("fail", "caller", "error")] == 1
        assert c.calls_finished[("missing", "caller", "no_route")] == 1
        assert s.calls_started[("mul", "executor")] == 5
        assert s.calls_finished[("mul", "executor", "ok")] == 5
        assert s.calls_finished[("fail", "executor", "error")] == 1
        assert ("missing", "executor") not in s.calls_started
        assert c.bytes_sent > 0 and s.bytes_received >= c.bytes_sent - 64
        assert s.bytes_sent > 0 and c.bytes_received > 0
        assert c.handshake_failures == Counter() and s.frames_rejected == Counter()
    assert client.stats.disconnects == 1


# -- odd timeouts and oversized values ---------------------------------------------


async def test_infinite_timeout_means_no_deadline() -> None:
    async with serving(registry(mul=mul)) as (_, port), connected(("127.0.0.1", port)) as client:
        assert await client.call("mul", 2, 3, timeout=math.inf) == 6


async def finish(task: asyncio.Task[Any]) -> None:
    """Never leave a call task behind, whatever the test saw."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def slow_task(started: asyncio.Event) -> Callable[[], Any]:
    async def slow() -> str:
        started.set()
        await asyncio.sleep(0.5)
        return "slow-ok"

    return slow


async def test_nan_timeout_is_refused_without_harming_other_calls() -> None:
    started = asyncio.Event()
    async with (
        contextlib.AsyncExitStack() as stack,
        serving(registry(mul=mul, slow=slow_task(started))) as (_, port),
        connected(("127.0.0.1", port)) as client,
    ):
        other = asyncio.create_task(client.call("slow", timeout=5))
        stack.push_async_callback(finish, other)
        await asyncio.wait_for(started.wait(), 2)
        with pytest.raises(ValueError, match=r"(?i)timeout"):
            await asyncio.wait_for(client.call("mul", 1, 2, timeout=math.nan), 2)
        assert await asyncio.wait_for(other, 3) == "slow-ok"
        assert client.stats.disconnects == 0


FRAME_LIMIT = 1024 * 1024


async def test_oversized_arguments_fail_only_that_call() -> None:
    started = asyncio.Event()

    def size(blob: bytes) -> int:
        return len(blob)

    async with (
        contextlib.AsyncExitStack() as stack,
        serving(registry(size=size, slow=slow_task(started)), max_frame_size=FRAME_LIMIT) as (
            _,
            port,
        ),
        connected(("127.0.0.1", port), max_frame_size=FRAME_LIMIT) as client,
    ):
        other = asyncio.create_task(client.call("slow", timeout=5))
        stack.push_async_callback(finish, other)
        await asyncio.wait_for(started.wait(), 2)
        with pytest.raises(SerializationError):
            await client.call("size", b"a" * (2 * FRAME_LIMIT), timeout=5)
        assert await asyncio.wait_for(other, 3) == "slow-ok"
        assert client.stats.disconnects == 0


async def test_oversized_result_fails_only_that_call() -> None:
    started = asyncio.Event()

    def big(n: int) -> bytes:
        return b"r" * n

    async with (
        contextlib.AsyncExitStack() as stack,
        serving(registry(big=big, slow=slow_task(started)), max_frame_size=FRAME_LIMIT) as (
            _,
            port,
        ),
        connected(("127.0.0.1", port), max_frame_size=FRAME_LIMIT) as client,
    ):
        other = asyncio.create_task(client.call("slow", timeout=5))
        stack.push_async_callback(finish, other)
        await asyncio.wait_for(started.wait(), 2)
        with pytest.raises(SerializationError):
            await client.call("big", 2 * FRAME_LIMIT, timeout=5)
        assert await asyncio.wait_for(other, 3) == "slow-ok"
        assert client.stats.disconnects == 0


async def test_arguments_just_under_the_frame_limit_work() -> None:
    def size(blob: bytes) -> int:
        return len(blob)

    async with (
        serving(registry(size=size), max_frame_size=FRAME_LIMIT) as (_, port),
        connected(("127.0.0.1", port), max_frame_size=FRAME_LIMIT) as client,
    ):
        blob = b"a" * (FRAME_LIMIT - 4096)
        assert await client.call("size", blob, timeout=5) == len(blob)


async def test_full_window_of_slow_calls_is_not_mistaken_for_a_silent_peer() -> None:
    """The server stops reading a peer whose window is full; that is not the peer's silence."""
    gate = asyncio.Event()

    async def gated(i: int) -> int:
        await gate.wait()
        return i

    # Both ends share this process's event loop, so a stall of the process
    # (a loaded machine deschedules it) silences the client while the server's
    # heartbeat timer waits to run: past 3 heartbeats the server rightly cuts
    # the link. 0.5 s (a 1.5 s stall) keeps that out of what this test measures.
    heartbeat = 0.5
    async with (
        serving(registry(gated=gated), max_workers=1, heartbeat_interval=heartbeat) as (
            server,
            port,
        ),
        connected(("127.0.0.1", port)) as client,
    ):
        window = max(2 * server.executor.max_workers, 1024)
        calls = [
            asyncio.create_task(client.call("gated", i, timeout=10)) for i in range(window + 10)
        ]
        try:
            await wait_until(lambda: any(p.read_paused for p in server.links()), within=10)
            await asyncio.sleep(5 * heartbeat)  # well past 3 heartbeats of "silence"
            gate.set()
            # Generous: only "did not hang" (1,034 calls, one at a time).
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 15)
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == [], failures[:3]
        assert results == list(range(window + 10))
        assert client.stats.disconnects == 0


async def test_huge_exception_fails_only_that_call() -> None:
    started = asyncio.Event()

    def boom(n: int) -> None:
        raise ValueError("x" * n)

    async with (
        contextlib.AsyncExitStack() as stack,
        serving(registry(boom=boom, slow=slow_task(started)), max_frame_size=FRAME_LIMIT) as (
            _,
            port,
        ),
        connected(("127.0.0.1", port), max_frame_size=FRAME_LIMIT) as client,
    ):
        other = asyncio.create_task(client.call("slow", timeout=5))
        stack.push_async_callback(finish, other)
        await asyncio.wait_for(started.wait(), 2)
        with pytest.raises((ValueError, RemoteError)):
            await client.call("boom", 2 * FRAME_LIMIT, timeout=5)
        assert await asyncio.wait_for(other, 3) == "slow-ok"
        assert client.stats.disconnects == 0


async def test_frame_bound_counts_name_bytes_not_characters() -> None:
    def size(blob: bytes) -> int:
        return len(blob)

    name = "\N{LATIN SMALL LETTER E WITH ACUTE}" * 300  # 300 characters, 600 bytes
    serializer = MsgpackSerializer()
    target = FRAME_LIMIT - len(name) - 64  # just inside the broker's own bound
    size_guess = target - 16
    while len(serializer.pack([[b"a" * (size_guess + 1)], {}])) <= target:
        size_guess += 1
    blob = b"a" * size_guess
    async with (
        serving(registry(**{name: size}), max_frame_size=FRAME_LIMIT) as (_, port),
        connected(("127.0.0.1", port), max_frame_size=FRAME_LIMIT) as client,
    ):
        # Refusing it locally is fine too; cutting the link is not.
        with contextlib.suppress(SerializationError):
            assert await client.call(name, blob, timeout=5) == len(blob)
        assert client.stats.disconnects == 0
        assert await client.call(name, b"small", timeout=5) == 5


async def test_closing_the_broker_fails_calls_waiting_for_a_route() -> None:
    async with connected(route_wait=10) as client:
        waiting = asyncio.create_task(client.call("anything"))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await client.close()
        with pytest.raises(PeerConnectionError):
            await asyncio.wait_for(waiting, 2)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(PeerConnectionError):
            await client.call("anything", timeout=1)


async def test_overlong_node_id_is_refused_at_construction() -> None:
    for cls in (TCPServerBroker, TCPClientBroker):
        with pytest.raises(ValueError, match="node id"):
            cls(NullExecutor(Registry()), key=KEY, node_id="n" * 300)
    # 253 characters (a DNS name) is fine.
    TCPClientBroker(NullExecutor(Registry()), key=KEY, node_id="n" * 253)
