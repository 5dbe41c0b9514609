"""Every limit a peer can hit: the cut, the reason in the log, the reason in the metrics.

``MAX_NAME_LENGTH`` and ``MAX_ANNOUNCED_NAMES`` bound what one peer makes
another keep (its sets of names, the labels of its logs). A frame over either
closes the link, counted in ``frames_rejected`` under its own reason and
logged; the sending side refuses such a message before it leaves. The output
buffer held for a peer that does not read is configurable, and so is the
largest frame after the handshake. docs/hardening.md has the table of every
limit; each row names its test here or in test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from patio import AsyncExecutor, Registry, TCPClientBroker, TCPServerBroker
from patio.broker.serializer import MsgpackSerializer
from patio.errors import CallTimeoutError, NameTooLongError, ProtocolError, TooManyNamesError
from patio.proto import Call, Connection, KeySet, MessageType, Role
from patio.proto.messages import (
    HANDSHAKE_MAX_FRAME_SIZE,
    HEADER,
    MAX_ANNOUNCED_NAMES,
    MAX_NAME_LENGTH,
    ErrorKind,
)
from patio.proto.session import TAG_SIZE
from patio.transport.link import MAX_PREAUTH_SOURCES_REMEMBERED, RateLimitedLog
from tests.test_bad_input import (
    KEY,
    Env,
    close_raw,
    echo,
    env,
    handshake,
    open_raw,
    scraped,
    sealed,
    small_buffer_socket,
    steady_load,
    wait_closed,
    warnings_text,
)

__all__ = ["env"]  # the fixture, used by name

KEYS = KeySet(b"limits")
LONG = "n" * (MAX_NAME_LENGTH + 1)
LONGEST = "n" * MAX_NAME_LENGTH


def open_pair() -> tuple[Connection, Connection]:
    a = Connection(Role.ACCEPTOR, "a", "ia", KEYS)
    d = Connection(Role.DIALER, "d", "id", KEYS)
    d.receive_data(a.data_to_send())
    a.receive_data(d.data_to_send())
    d.receive_data(a.data_to_send())
    return a, d


def raw(message: list[Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def announce(names: list[Any], routable: list[Any] = ()) -> list[Any]:  # type: ignore[assignment]
    return [MessageType.ANNOUNCE, names, list(routable), 1, 1, False]


@pytest.mark.parametrize(
    ("message", "error", "reason"),
    [
        ([MessageType.CALL, 1, LONG, b"", None, False], NameTooLongError, "name_too_long"),
        (announce(["ok", LONG]), NameTooLongError, "name_too_long"),
        (announce([], [LONG]), NameTooLongError, "name_too_long"),
        (announce(["x"] * (MAX_ANNOUNCED_NAMES + 1)), TooManyNamesError, "too_many_names"),
        (announce([], ["x"] * (MAX_ANNOUNCED_NAMES + 1)), TooManyNamesError, "too_many_names"),
    ],
    ids=["call-name", "announced-name", "routable-name", "names", "routable-names"],
)
def test_a_frame_over_a_name_limit_closes_the_connection(
    message: list[Any], error: type[ProtocolError], reason: str
) -> None:
    ours, theirs = open_pair()
    theirs.send_frame(msgpack.packb(message, use_bin_type=True))
    with pytest.raises(error, match="over the limit") as caught:
        ours.receive_data(theirs.data_to_send())
    assert caught.value.reason == reason
    assert ours.receive_data(raw([MessageType.PING])) == []  # closed


def test_names_at_the_limits_pass() -> None:
    ours, theirs = open_pair()
    names = [LONGEST] + [str(i) for i in range(MAX_ANNOUNCED_NAMES - 1)]
    theirs.send_announce(names, [LONGEST], 1, 1, False)
    theirs.send_call(7, LONGEST, b"", None, False)
    got = ours.receive_data(theirs.data_to_send())
    assert len(got[0].names) == MAX_ANNOUNCED_NAMES
    assert got[1] == Call(MessageType.CALL, 7, LONGEST, b"", None, False)


def test_the_sender_refuses_what_the_peer_would_refuse() -> None:
    _, theirs = open_pair()
    with pytest.raises(ValueError, match="over the limit of 1024"):
        theirs.send_call(1, LONG, b"", None, False)
    with pytest.raises(ValueError, match="over the limit of 1024"):
        theirs.send_announce(["a", LONG], [], 1, 1, False)
    with pytest.raises(ValueError, match=f"over the limit of {MAX_ANNOUNCED_NAMES}"):
        theirs.send_announce([], ["x"] * (MAX_ANNOUNCED_NAMES + 1), 1, 1, False)
    assert theirs.data_to_send() == b""  # nothing was queued


@pytest.mark.parametrize(
    ("message", "reason", "logged"),
    [
        (announce(["mul", LONG]), "name_too_long", "announce names a task of 1025 characters"),
        ([MessageType.CALL, 1, LONG, b"", None, False], "name_too_long", "call names a task"),
        (announce(["x"] * (MAX_ANNOUNCED_NAMES + 1)), "too_many_names", "lists 100001 names"),
    ],
    ids=["announced-name", "call-name", "announced-names"],
)
async def test_a_broker_cuts_a_peer_over_a_name_limit_and_counts_why(
    env: Env, caplog: pytest.LogCaptureFixture, message: list[Any], reason: str, logged: str
) -> None:
    async with steady_load(env):  # the other callers are not disturbed
        reader, writer, conn = await handshake(env.port)
        try:
            writer.write(sealed(conn, message))
            assert await wait_closed(reader, 3) < 1
        finally:
            close_raw(writer)
    assert env.server.stats.frames_rejected == {reason: 1}
    assert scraped(env.server, "patio_frames_rejected_total", reason) == 1
    assert logged in warnings_text(caplog)


@contextlib.asynccontextmanager
async def serving(**limits: Any) -> AsyncIterator[TCPServerBroker]:
    rpc = Registry()
    rpc.register(echo, "echo")
    rpc.register(len, "len")
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key=KEY, heartbeat_interval=5.0, **limits) as server,
    ):
        await server.listen("127.0.0.1", 0)
        yield server


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        ({"max_buffered_output": 1024}, "must hold at least one frame of max_frame_size"),
        ({"max_frame_size": 1024}, "max_frame_size must be between 65536 and 4294967295"),
        ({"max_frame_size": 2**32}, "max_frame_size must be between"),
        ({"max_buffered_output": 1.5e9}, "max_buffered_output must be a number of bytes"),
    ],
)
def test_limits_that_cannot_work_are_refused(limits: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        TCPServerBroker(AsyncExecutor(Registry()), key=KEY, **limits)


async def test_a_peer_that_does_not_read_is_cut_at_the_configured_output_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 256 KiB cap (default 64 MiB): the replies a non-reader leaves pile up only that far."""
    cap = 256 * 1024
    blob = MsgpackSerializer().pack([[b"r" * 32768], {}])
    async with serving(max_frame_size=64 * 1024, max_buffered_output=cap) as server:
        sock = small_buffer_socket()
        port = server.listening[0][1]
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        _, writer, conn = await handshake(port, sock=sock)
        writer.transport.pause_reading()  # from here on we read nothing at all
        call_id = 0
        t0 = time.monotonic()
        try:
            while not server.stats.links_cut and time.monotonic() - t0 < 10:
                for _ in range(8):
                    call_id += 1
                    conn.send_call(call_id, "echo", blob, None, False)
                writer.write(conn.data_to_send())
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(writer.drain(), 0.2)
                await asyncio.sleep(0)
        finally:
            close_raw(writer)
    assert server.stats.links_cut == {"output_buffer": 1}
    assert scraped(server, "patio_links_cut_total", "output_buffer") == 1
    assert f"output buffer limit of {cap} bytes exceeded" in warnings_text(caplog)


@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
async def test_a_frame_over_the_size_limit_is_cut_and_counted(
    caplog: pytest.LogCaptureFixture, authenticated: bool
) -> None:
    """1 KiB before authentication, ``max_frame_size`` (here 64 KiB) after; the limit passes."""
    limit = 64 * 1024 if authenticated else HANDSHAKE_MAX_FRAME_SIZE
    async with serving(max_frame_size=64 * 1024) as server:
        port = server.listening[0][1]
        if authenticated:
            reader, writer, conn = await handshake(port)
            # A CALL frame of exactly the limit is served...
            size = limit
            while True:  # msgpack's headers grow with the size: settle on the exact one
                payload = MsgpackSerializer().pack([[b"x" * size], {}])
                body = msgpack.packb([MessageType.CALL, 1, "len", payload, None, False])
                if len(body) == limit:
                    break
                size += limit - len(body)
            conn.send_frame(body)
            big = conn.data_to_send()  # one record: the frame and a tag
            assert len(big) == 4 + 4 + limit + TAG_SIZE, len(big)
            writer.write(big)
            got: list[Any] = []
            async with asyncio.timeout(5):
                while not got:
                    got = conn.receive_data(await reader.read(1 << 20))
            assert got[0][0] == MessageType.RESULT
            assert MsgpackSerializer().unpack(got[0][2]) == size
        else:
            reader, writer = await open_raw(port)
        try:  # ... one byte more is not (after auth: its record, one frame and a tag)
            if authenticated:
                conn.send_frame(b"x" * (limit + 1))
                writer.write(conn.data_to_send())
            else:
                writer.write(HEADER.pack(limit + 1) + b"x" * (limit + 1))
            assert await wait_closed(reader, 3) < 1
        finally:
            close_raw(writer)
    where = "frames_rejected" if authenticated else "handshake_failures"
    assert getattr(server.stats, where) == {"oversized": 1}
    assert scraped(server, f"patio_{where}_total", "oversized") == 1
    if authenticated:
        overhead = 4 + TAG_SIZE
        logged = f"record of {limit + 1 + overhead} bytes exceeds the limit of {limit + overhead}"
    else:
        logged = f"frame of {limit + 1} bytes exceeds the limit of {limit} bytes before auth"
    assert logged in warnings_text(caplog)


async def bad_hello(port: int, i: int) -> None:
    reader, writer = await open_raw(port)
    try:
        writer.write(raw([MessageType.HELLO, "not-patio", 1]))
        await wait_closed(reader, 3)
    finally:
        close_raw(writer)


async def wrong_key(port: int, i: int) -> None:
    """A stranger guessing keys, with a new node id each time."""
    with contextlib.suppress(ProtocolError, ConnectionError):
        _, writer, _ = await handshake(port, key=b"guess %d" % i, node_id=f"stranger-{i}")
        close_raw(writer)


@pytest.mark.parametrize(
    ("attempt", "reason", "logged"),
    [
        (bad_hello, "malformed", "not speaking the patio protocol"),
        (wrong_key, "auth", "did not prove it holds an accepted key"),
    ],
    ids=["bad-hello", "wrong-key"],
)
async def test_two_hundred_bad_hellos_log_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture, attempt: Any, reason: str, logged: str
) -> None:
    """Issue 16 item 10: 200 bad HELLOs wrote 210 KB of log; every one still counts."""
    caplog.set_level(logging.DEBUG, logger="patio.transport")
    async with serving() as server:
        port = server.listening[0][1]
        for batch in range(20):
            await asyncio.gather(*(attempt(port, batch * 10 + i) for i in range(10)))
        await asyncio.sleep(0.05)
        assert server.stats.handshake_failures == {reason: 200}
        assert scraped(server, "patio_handshake_failures_total", reason) == 200
        said = [(r.levelno, r.getMessage()) for r in caplog.records if logged in r.getMessage()]
        warned = [text for level, text in said if level >= logging.WARNING]
        assert len(warned) == 1, warned
        held = [text for level, text in said if level == logging.DEBUG]
        assert len(held) == 199


def test_preauth_warnings_say_how_many_were_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = RateLimitedLog(interval=10.0, per_interval=3, clock=lambda: now[0])
    for _ in range(5):
        limiter.warn("10.0.0.1", "timeout", "closing connection with 10.0.0.1:1: no handshake")
    limiter.warn("10.0.0.1", "malformed", "closing connection with 10.0.0.1:2: junk")
    limiter.warn("10.0.0.2", "timeout", "closing connection with 10.0.0.2:1: no handshake")
    limiter.warn("10.0.0.3", "timeout", "over the budget of 3 lines per interval in all")
    now[0] = 12.0
    limiter.warn("10.0.0.1", "timeout", "closing connection with 10.0.0.1:3: no handshake")
    for i in range(5000):  # sources beyond the budget: held back, and remembered boundedly
        limiter.warn(f"fd00::{i}", "timeout", "one of many sources")
    assert len(limiter._last) <= MAX_PREAUTH_SOURCES_REMEMBERED
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "closing connection with 10.0.0.1:1: no handshake",
        "closing connection with 10.0.0.1:2: junk",
        "closing connection with 10.0.0.2:1: no handshake",
        "closing connection with 10.0.0.1:3: no handshake (4 more like it from 10.0.0.1 "
        "in the last 12 s, logged at debug level)",
        "one of many sources",  # the last two lines of the budget of 3 in this interval
        "one of many sources",
    ]


async def test_calls_past_the_granted_window_are_refused_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer sending more calls at once than the window it was granted: the excess is refused.

    The member pauses reading once the window is full; the calls already read
    past it (the rest of that chunk) are answered OVERLOADED at once, the
    link stays up and the calls within the window complete.
    """
    release = asyncio.Event()

    async def hold(i: int) -> int:
        await release.wait()
        return i

    rpc = Registry()
    rpc.register(hold, "hold")
    extra = 6
    async with (
        AsyncExecutor(rpc, max_workers=8) as executor,
        TCPServerBroker(executor, key=KEY) as server,
    ):
        await server.listen("127.0.0.1", 0)
        window = server._server.window  # what the server announced to the peer
        reader, writer, conn = await handshake(server.listening[0][1])
        try:
            args = [MsgpackSerializer().pack([[i], {}]) for i in range(window + extra)]
            for call_id, payload in enumerate(args, 1):
                conn.send_call(call_id, "hold", payload, None, False)
            writer.write(conn.data_to_send())  # one chunk: read before reading pauses
            replies: dict[int, Any] = {}
            async with asyncio.timeout(5):
                while len(replies) < extra:
                    for event in conn.receive_data(await reader.read(65536)):
                        if event[0] in (MessageType.RESULT, MessageType.ERROR):
                            replies[event[1]] = event
                release.set()
                while len(replies) < window + extra:
                    for event in conn.receive_data(await reader.read(65536)):
                        if event[0] in (MessageType.RESULT, MessageType.ERROR):
                            replies[event[1]] = event
                    writer.write(conn.data_to_send())  # pongs
        finally:
            close_raw(writer)
    refused = sorted(i for i, event in replies.items() if event[0] == MessageType.ERROR)
    assert refused == list(range(window + 1, window + extra + 1))
    assert {replies[i][2] for i in refused} == {ErrorKind.OVERLOADED}
    assert b"more than 1024 calls at once" in replies[refused[0]][3]
    assert sum(1 for e in replies.values() if e[0] == MessageType.RESULT) == window
    assert server.stats.frames_rejected == {"over_window": extra}
    assert scraped(server, "patio_frames_rejected_total", "over_window") == extra
    warned = [line for line in warnings_text(caplog).splitlines() if "refusing calls" in line]
    assert warned == [
        "refusing calls from 'raw-peer': more than 1024 calls at once, "
        "the window this member granted"
    ]


async def test_a_patio_caller_never_exceeds_the_window_even_cancelling() -> None:
    """Calls that time out (and are cancelled) while they run here free the caller's window
    at once: the caller sends new ones, and none is refused as over the window."""

    async def slow(i: int) -> int:
        await asyncio.sleep(0.2)
        return i

    rpc = Registry()
    rpc.register(slow, "slow")
    async with (
        AsyncExecutor(rpc, max_workers=512) as executor,
        TCPServerBroker(executor, key=KEY) as server,
        AsyncExecutor(Registry()) as null,
        TCPClientBroker(null, key=KEY) as client,
    ):
        await server.listen("127.0.0.1", 0)
        await client.connect("127.0.0.1", server.listening[0][1])
        window = server._server.window

        async def one(i: int) -> str:
            try:
                await client.call("slow", i, timeout=0.05 if i % 2 else 2.0)
            except CallTimeoutError:
                return "timeout"
            return "ok"

        outcomes = await asyncio.gather(*(one(i) for i in range(3 * window)))
    assert server.stats.frames_rejected == {}
    assert outcomes.count("ok") == 3 * window // 2  # the patient half all succeed
