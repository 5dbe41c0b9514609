"""An on-path relay after the handshake, on real sockets (issue 16 item 2).

The relay passes the handshake through untouched (it cannot forge it: it
has no key), then works on the frames that follow: it injects a CALL,
changes a byte, replays, drops or reflects a frame. Before protocol version
2 the injected CALL was executed. Now every one of these fails the frame's
MAC: the link is closed before anything of the frame is decoded, the reason
is logged and counted, and the caller's calls fail or go on over a new link
(nothing hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trustme

from patio import AsyncExecutor, NullExecutor, Registry, TCPClientBroker, TCPServerBroker
from patio.errors import PeerConnectionError
from patio.proto import MessageType
from patio.worker.runtime import build_ssl_contexts

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftover_tasks")]

KEY = b"relay-test-key-" + b"k" * 32
HEADER = struct.Struct(">I")
HANDSHAKE_FRAMES = 2  # HELLO and AUTH each way, untagged


@dataclass
class _Listener:
    """A relay's listening side on 127.0.0.1: its piping tasks and both ends' writers."""

    target_port: int
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self, context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _spawn(self, pipe: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(pipe)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class Relay(_Listener):
    """A TCP relay on 127.0.0.1 that forwards whole frames and can tamper with them."""

    attack: str = ""  # armed attack, done on the next frame it applies to
    links: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _to_server: list[asyncio.StreamWriter] = field(default_factory=list)

    def inject_to_server(self, data: bytes) -> None:
        self._to_server[-1].write(data)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.links += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        self._to_server.append(up_writer)
        self._spawn(self._pipe(reader, up_writer, "up", writer))
        self._spawn(self._pipe(up_reader, writer, "down", up_writer))

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
        back: asyncio.StreamWriter,
    ) -> None:
        count = 0
        held: bytes | None = None
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(4)
                frame = header + await reader.readexactly(HEADER.unpack(header)[0])
                count += 1
                if count <= HANDSHAKE_FRAMES or not self.attack:
                    writer.write(frame)
                    continue
                attack = self.attack
                if direction == "up" and attack == "modify":
                    changed = bytearray(frame)
                    changed[6] ^= 0x01  # inside the body, past the header
                    writer.write(bytes(changed))
                elif direction == "up" and attack == "replay":
                    writer.write(frame + frame)
                elif direction == "up" and attack == "drop":
                    pass
                elif direction == "up" and attack == "reorder":
                    if held is None:
                        held = frame
                        continue
                    writer.write(frame + held)
                elif direction == "down" and attack == "reflect":
                    writer.write(frame)
                    back.write(frame)  # the server's own frame, sent back to it
                else:
                    writer.write(frame)
                    continue
                self.attack = ""
                self.done.set()
        writer.close()


@dataclass
class Mesh:
    server: TCPServerBroker
    client: TCPClientBroker
    relay: Relay
    executed: list[Any]


@pytest.fixture
async def mesh(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Mesh]:
    caplog.set_level(logging.INFO, logger="patio")
    executed: list[Any] = []

    async def work(value: Any) -> Any:
        executed.append(value)
        return value

    rpc = Registry()
    rpc.register(work, "work")
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key=KEY) as server,
    ):
        await server.listen("127.0.0.1", 0)
        relay = Relay(server.listening[0][1])
        await relay.start()
        try:
            async with (
                NullExecutor(Registry()) as null,
                TCPClientBroker(null, key=KEY, heartbeat_interval=0.2) as client,
            ):
                await client.connect("127.0.0.1", relay.port)
                assert await client.call("work", "warm-up", timeout=5) == "warm-up"
                yield Mesh(server, client, relay, executed)
        finally:
            await relay.close()


def rejected(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """The server closed the link for a frame that failed its MAC, said so, and counted it."""
    assert mesh.server.stats.frames_rejected["frame_auth"] == 1, mesh.server.stats.frames_rejected
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("frame authentication failed" in m for m in messages), messages


async def until(condition: Any, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_call_injected_after_the_handshake_is_not_executed(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    body = msgpack.packb(
        [MessageType.CALL, 777, "work", msgpack.packb([["injected"], {}]), 5.0, False],
        use_bin_type=True,
    )
    mesh.relay.inject_to_server(HEADER.pack(len(body)) + body)
    await until(lambda: mesh.server.stats.frames_rejected["frame_auth"] == 1)
    await asyncio.sleep(0.1)
    assert "injected" not in mesh.executed
    rejected(mesh, caplog)
    # The client dials again (through the relay, now passing frames as they
    # are) and its calls go on.
    assert await mesh.client.call("work", "after", timeout=5) == "after"
    assert mesh.relay.links == 2


@pytest.mark.parametrize("attack", ["modify", "replay", "drop", "reorder", "reflect"])
async def test_a_tampered_frame_closes_the_link_and_calls_fail_over(
    mesh: Mesh, caplog: pytest.LogCaptureFixture, attack: str
) -> None:
    mesh.relay.attack = attack
    calls = [
        asyncio.ensure_future(mesh.client.call("work", f"call-{i}", timeout=5)) for i in range(3)
    ]
    async with asyncio.timeout(8):  # nothing hangs: each call ends well before its timeout
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert mesh.relay.done.is_set()
    for outcome in outcomes:
        assert isinstance(outcome, str | PeerConnectionError), repr(outcome)
    await until(lambda: mesh.server.stats.frames_rejected["frame_auth"] == 1)
    rejected(mesh, caplog)
    # A replayed call ran once, a changed one not at all.
    assert all(mesh.executed.count(f"call-{i}") <= 1 for i in range(3))
    # The client dials again; a retryable call waits for the new link.
    assert await mesh.client.call("work", "after", timeout=5, retryable=True) == "after"


# -- turning the MAC off: loopback only, both ends agreeing -----------------------


@pytest.mark.parametrize("address", ["10.0.0.5", "0.0.0.0", "::"])
async def test_frame_mac_off_is_refused_off_loopback(address: str) -> None:
    async with (
        NullExecutor(Registry()) as null,
        TCPServerBroker(null, key=KEY, frame_mac=False) as broker,
    ):
        with pytest.raises(ValueError, match=r"frame authentication off.*loopback"):
            await broker.listen(address, 0)
        with pytest.raises(ValueError, match=r"frame authentication off.*loopback"):
            broker.add_peer(address, 1)
        with pytest.raises(ValueError, match=r"frame authentication off.*loopback"):
            broker.set_peers("dns", [("127.0.0.1", 1), (address, 1)])
        assert broker.listening == []


def test_the_worker_flag_is_refused_off_loopback() -> None:
    from patio.worker.config import ConfigError, load_config

    base = ["tests.mesh_member:rpc", "--key", KEY.decode(), "--no-frame-mac"]
    assert not load_config(base, {}).frame_mac
    assert load_config(base[:-1], {}).frame_mac
    with pytest.raises(ConfigError, match=r"--no-frame-mac is for benchmarks on loopback only"):
        load_config([*base, "--listen", "0.0.0.0"], {})
    with pytest.raises(ConfigError, match=r"10\.1\.2\.3 is not loopback"):
        load_config([*base, "--peers", "10.1.2.3:15383"], {})


@pytest.mark.parametrize("server_mac", [True, False])
async def test_both_ends_must_agree_on_frame_mac(
    server_mac: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        NullExecutor(Registry()) as null,
        TCPServerBroker(null, key=KEY, frame_mac=server_mac) as server,
        TCPClientBroker(null, key=KEY, frame_mac=not server_mac) as client,
    ):
        await server.listen("127.0.0.1", 0)
        with pytest.raises(PeerConnectionError, match=r"frame authentication (on|off)"):
            await client.connect("127.0.0.1", server.listening[0][1], first_attempt_only=True)
        await until(lambda: server.stats.handshake_failures["frame_mac"] == 1)


async def test_frame_mac_off_on_loopback_works() -> None:
    rpc = Registry()
    rpc.register(lambda a, b: a * b, "mul")
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key=KEY, frame_mac=False) as server,
        NullExecutor(Registry()) as null,
        TCPClientBroker(null, key=KEY, frame_mac=False) as client,
    ):
        await server.listen("127.0.0.1", 0)
        await client.connect("127.0.0.1", server.listening[0][1])
        assert await client.call("mul", 6, 7, timeout=5) == 42


# -- TLS: the handshake is bound to the server's certificate ----------------------


@dataclass
class TLSRelay(_Listener):
    """Terminates TLS on both sides with its own certificate and relays the bytes."""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        upstream.check_hostname = False
        upstream.verify_mode = ssl.CERT_NONE
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port, ssl=upstream
        )
        self._writers += [writer, up_writer]
        self._spawn(self._pipe(reader, up_writer))
        self._spawn(self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
        writer.close()


def member_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """TLS as a worker runs it without --tls-ca: encrypted, no certificate verified."""
    leaf = trustme.CA().issue_cert("patio-member.example.test")
    cert, key = tmp_path / "member.pem", tmp_path / "member.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return build_ssl_contexts(str(cert), str(key), None)


async def test_a_relay_terminating_tls_fails_the_handshake(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="patio")
    server_ssl, client_ssl = member_contexts(tmp_path)
    relay_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(relay_ssl)  # the relay's own
    rpc = Registry()
    rpc.register(lambda a, b: a * b, "mul")
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key=KEY, ssl_context=server_ssl) as server,
        NullExecutor(Registry()) as null,
        TCPClientBroker(null, key=KEY, ssl_context=client_ssl) as direct,
        TCPClientBroker(null, key=KEY, ssl_context=client_ssl) as relayed,
    ):
        await server.listen("127.0.0.1", 0)
        port = server.listening[0][1]
        # Directly, the two ends see the same certificate: the binding agrees.
        await direct.connect("127.0.0.1", port)
        assert await direct.call("mul", 6, 7, timeout=5) == 42
        relay = TLSRelay(port)
        await relay.start(relay_ssl)
        try:
            with pytest.raises(PeerConnectionError, match="TLS channel binding differs"):
                await relayed.connect("127.0.0.1", relay.port, first_attempt_only=True)
            await until(lambda: server.stats.handshake_failures["auth"] == 1)
        finally:
            await relay.close()
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("TLS channel binding differs" in m for m in messages), messages
        assert await direct.call("mul", 2, 3, timeout=5) == 6  # the honest link is untouched


async def test_a_certificate_reloaded_in_place_is_bound_again(tmp_path: Path) -> None:
    """The worker's rotation: load_cert_chain on the live context, then set_ssl_contexts."""
    server_ssl, client_ssl = member_contexts(tmp_path)
    rpc = Registry()
    rpc.register(lambda a, b: a * b, "mul")
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key=KEY, ssl_context=server_ssl) as server,
        NullExecutor(Registry()) as null,
    ):
        await server.listen("127.0.0.1", 0)
        port = server.listening[0][1]
        new = trustme.CA().issue_cert("patio-member-2.example.test")
        cert, key = tmp_path / "new.pem", tmp_path / "new.key"
        new.cert_chain_pems[0].write_to_path(str(cert))
        new.private_key_pem.write_to_path(str(key))
        server_ssl.load_cert_chain(str(cert), str(key))
        server.set_ssl_contexts(server_ssl, client_ssl)
        async with TCPClientBroker(null, key=KEY, ssl_context=client_ssl) as client:
            await client.connect("127.0.0.1", port, first_attempt_only=True)
            assert await client.call("mul", 6, 7, timeout=5) == 42
        assert server.stats.handshake_failures == {}
