"""TLS and mutual TLS between TCP brokers, with certificates made by trustme."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trustme

from patio import AsyncExecutor, NullExecutor, Registry, TCPClientBroker, TCPServerBroker
from patio.errors import PeerConnectionError
from patio.stats import BrokerStats
from patio.transport.link import MAX_PENDING_PER_SOURCE
from tests.test_bad_input import scraped

KEY = b"tls-test-key"

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftover_tasks")]


def whoami(x: int) -> str:
    return f"tls:{x}"


@pytest.fixture
def mtls_server_ssl(server_ssl: ssl.SSLContext, ca: trustme.CA) -> ssl.SSLContext:
    server_ssl.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server_ssl)
    return server_ssl


@pytest.fixture
def mtls_client_ssl(client_ssl: ssl.SSLContext, client_cert: trustme.LeafCert) -> ssl.SSLContext:
    client_cert.configure_cert(client_ssl)
    return client_ssl


@contextlib.asynccontextmanager
async def tls_server(
    context: ssl.SSLContext, host: str = "127.0.0.1", **kwargs: Any
) -> AsyncIterator[tuple[TCPServerBroker, int]]:
    rpc = Registry()
    rpc.register(whoami, "whoami")
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, key=KEY, ssl_context=context, **kwargs) as broker,
    ):
        await broker.listen(host, 0)
        yield broker, broker.listening[0][1]


@contextlib.asynccontextmanager
async def tls_client(
    context: ssl.SSLContext | None, host: str, port: int, **kwargs: Any
) -> AsyncIterator[TCPClientBroker]:
    kwargs.setdefault("connect_timeout", 1.5)
    kwargs.setdefault("key", KEY)
    async with (
        NullExecutor(Registry()) as executor,
        TCPClientBroker(executor, ssl_context=context, **kwargs) as broker,
    ):
        await broker.connect(host, port)
        yield broker


async def refused_client(
    context: ssl.SSLContext, port: int
) -> tuple[PeerConnectionError, BrokerStats]:
    """Connect a client that must be refused: the error it raised, and its counters."""
    async with (
        NullExecutor(Registry()) as executor,
        TCPClientBroker(executor, key=KEY, ssl_context=context, connect_timeout=1.0) as broker,
    ):
        with pytest.raises(PeerConnectionError) as info:
            await broker.connect("127.0.0.1", port)
        return info.value, broker.stats


def link_ssl_object(broker: TCPServerBroker | TCPClientBroker) -> Any:
    (peer,) = broker.links()
    transport = peer.link._transport
    assert transport is not None
    return transport.get_extra_info("ssl_object")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_server_only_tls(
    host: str, server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async with (
        tls_server(server_ssl, host) as (server, port),
        tls_client(client_ssl, host, port) as client,
    ):
        assert await client.call("whoami", 1, timeout=5) == "tls:1"
        ssl_object = link_ssl_object(client)
        assert ssl_object is not None
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        # The server did not ask for a client certificate.
        assert link_ssl_object(server).getpeercert() is None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_mutual_tls(
    host: str, mtls_server_ssl: ssl.SSLContext, mtls_client_ssl: ssl.SSLContext
) -> None:
    async with (
        tls_server(mtls_server_ssl, host) as (server, port),
        tls_client(mtls_client_ssl, host, port) as client,
    ):
        results = await asyncio.gather(*(client.call("whoami", i, timeout=5) for i in range(20)))
        assert results == [f"tls:{i}" for i in range(20)]
        peer_cert = link_ssl_object(server).getpeercert()
        assert peer_cert is not None
        names = [value for kind, value in peer_cert.get("subjectAltName", ()) if kind == "email"]
        assert names == ["patio-client@example.test"]


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"]
)
async def test_mutual_tls_refuses_a_client_without_certificate(
    mtls_server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    version: ssl.TLSVersion,
) -> None:
    """The client is told what to do; the server counts and logs why (issue 15)."""
    client_ssl.maximum_version = version
    async with tls_server(mtls_server_ssl) as (server, port):
        t0 = time.monotonic()
        error, client_stats = await refused_client(client_ssl, port)
        assert time.monotonic() - t0 < 3
        assert isinstance(error, ConnectionError)
        text = str(error)
        assert f"127.0.0.1:{port}" in text
        assert "requires a client certificate" in text and "load_cert_chain" in text, text
        assert server.peers() == []
        assert server.stats.connects == 0
        assert client_stats.handshake_failures["tls"] >= 1  # the client counts them too
        # The client retries within its connect timeout: every attempt counts.
        failures = server.stats.handshake_failures
        assert set(failures) == {"tls"} and failures["tls"] >= 1
        assert scraped(server, "patio_handshake_failures_total", "tls") == failures["tls"]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "TLS handshake failed: the client sent no certificate, and this listener requires one"
        in line
        for line in said
    ), said


async def test_tls_handshakes_count_against_the_pending_cap(server_ssl: ssl.SSLContext) -> None:
    """Sockets that never send a ClientHello hold a slot of the pre-auth cap, as plain ones do."""
    async with tls_server(server_ssl) as (server, port):
        extra = 4
        opened = [
            await asyncio.open_connection("127.0.0.1", port)
            for _ in range(MAX_PENDING_PER_SOURCE + extra)
        ]
        try:
            await asyncio.sleep(0.3)
            assert sum(1 for reader, _ in opened if reader.at_eof()) == extra
            assert server.stats.handshake_failures == {"busy": extra}
        finally:
            for _, writer in opened:
                writer.transport.abort()


async def test_client_not_trusting_the_ca_fails_clearly(server_ssl: ssl.SSLContext) -> None:
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    untrusting.load_verify_locations(cadata=trustme.CA().cert_pem.bytes().decode())
    async with tls_server(server_ssl) as (server, port):
        t0 = time.monotonic()
        error, client_stats = await refused_client(untrusting, port)
        assert "certificate verify failed" in str(error).lower()
        assert time.monotonic() - t0 < 3
        assert server.stats.connects == 0
        assert client_stats.handshake_failures["tls"] >= 1
        assert server.stats.handshake_failures["tls"] >= 1  # the client's alert closed it


async def test_plain_client_against_tls_server_fails(server_ssl: ssl.SSLContext) -> None:
    async with tls_server(server_ssl, handshake_timeout=1.0) as (server, port):
        with pytest.raises(PeerConnectionError):
            async with tls_client(None, "127.0.0.1", port, connect_timeout=1.0):
                pass
        assert server.stats.connects == 0


async def test_tls_and_wrong_key_still_fails(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    """TLS secures the pipe; the shared key still decides who may join."""
    async with tls_server(server_ssl) as (server, port):
        with pytest.raises(PeerConnectionError, match="AuthenticationError"):
            async with tls_client(client_ssl, "127.0.0.1", port, key=b"other", connect_timeout=1.0):
                pass
        assert server.stats.handshake_failures["auth"] >= 1


async def _closed_within(reader: asyncio.StreamReader, within: float) -> float:
    t0 = time.monotonic()
    async with asyncio.timeout(within):
        while True:
            try:
                if not await reader.read(65536):
                    break
            except (ConnectionError, ssl.SSLError):
                break
    return time.monotonic() - t0


async def test_silent_tcp_peer_on_tls_listener_is_closed(
    server_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """No TLS ClientHello at all: the handshake deadline drops the socket, counted and logged."""
    async with tls_server(server_ssl, handshake_timeout=0.5) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await _closed_within(reader, 3) < 2
        finally:
            writer.transport.abort()
        assert server.stats.handshake_failures == {"timeout": 1}
    assert any("no handshake within 0.5 s" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "junk", [b"\x16\x03\x01" + b"\xff" * 4096, b"GET / HTTP/1.1\r\n\r\n"], ids=["tls", "http"]
)
async def test_garbage_on_tls_listener_is_closed(
    server_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture, junk: bytes
) -> None:
    async with tls_server(server_ssl, handshake_timeout=0.5) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(junk)
            assert await _closed_within(reader, 3) < 2
        finally:
            writer.transport.abort()
        assert server.stats.handshake_failures == {"tls": 1}
        assert scraped(server, "patio_handshake_failures_total", "tls") == 1
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)


async def test_tls_peer_that_never_says_hello_is_closed(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS completes but the patio HELLO never comes: the patio handshake timeout applies."""
    async with tls_server(server_ssl, handshake_timeout=0.5) as (server, port):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ssl, server_hostname="127.0.0.1"
        )
        try:
            await reader.readexactly(4)  # the server's HELLO arrives; we answer nothing
            assert await _closed_within(reader, 3) < 2
        finally:
            writer.transport.abort()
        assert server.stats.handshake_failures["timeout"] == 1
        assert any("no handshake within" in r.getMessage() for r in caplog.records)
