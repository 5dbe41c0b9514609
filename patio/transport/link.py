"""One TCP (or TLS) connection driving one sans-IO protocol connection.

The link moves bytes and keeps time; every protocol decision is made by
:class:`patio.proto.Connection` and every routing decision by the broker that
owns the :class:`LinkHandler`. It is an ``asyncio.Protocol`` rather than a pair
of streams so each chunk read is parsed in the callback that received it (no
task per frame, no ``readexactly`` per header) and writes made in one loop
iteration leave in one ``transport.write``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from patio.errors import (
    AuthenticationError,
    FrameAuthenticationError,
    HandshakeError,
    ProtocolError,
)
from patio.proto import Connection, KeySet, PeerAuthenticated, Role
from patio.proto.messages import DEFAULT_MAX_FRAME_SIZE, Message
from patio.stats import BrokerStats
from patio.transport import binding

log = logging.getLogger("patio.transport")

# A peer that has not finished the hello within this time is dropped: it holds
# a socket and a buffer and has proven nothing.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Silence longer than this makes us ping; three intervals of silence (or of a
# peer not reading what we write) and the link is declared dead.
DEFAULT_HEARTBEAT_INTERVAL = 5.0
# Output we will hold for a peer that does not read. Past it the link is cut:
# a peer that stops reading must not make us buffer without bound.
DEFAULT_MAX_BUFFERED_OUTPUT = 64 * 1024 * 1024
#: The smallest frame limit we accept after authentication: announcements
#: and error replies must fit in one frame.
MIN_FRAME_SIZE: Final = 64 * 1024
#: The largest: a frame's length is a 4-byte header.
MAX_FRAME_SIZE: Final = 2**32 - 1


def check_limits(max_frame_size: int, max_buffered_output: int) -> None:
    """Refuse frame and buffer limits that cannot work (``ValueError`` naming the fix)."""
    for name, value in (
        ("max_frame_size", max_frame_size),
        ("max_buffered_output", max_buffered_output),
    ):
        if type(value) is not int:
            raise ValueError(f"{name} must be a number of bytes (an int), not {value!r}")
    if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE:
        raise ValueError(
            f"max_frame_size must be between {MIN_FRAME_SIZE} and {MAX_FRAME_SIZE} bytes, "
            f"not {max_frame_size}"
        )
    if max_buffered_output < max_frame_size:
        # One frame of the largest size is written whole: a smaller cap would
        # cut a peer that reads, as soon as one large frame waits for it.
        raise ValueError(
            f"max_buffered_output ({max_buffered_output} bytes) must hold at least one frame "
            f"of max_frame_size ({max_frame_size} bytes): raise it or lower max_frame_size"
        )


# Key mismatches logged, as (our node, peer host, message): a peer with the
# wrong key retries every couple of seconds forever; the first attempt is
# worth a WARNING, the same failure again only a debug line. Bounded, because
# anyone who can reach the port can make new entries.
_AUTH_FAILURES_LOGGED: dict[tuple[str, str, str], None] = {}
MAX_AUTH_FAILURES_REMEMBERED = 1024


def is_loopback(host: str) -> bool:
    """True for a loopback address or name, as configured or as a socket reports it."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


#: Failures of connections that never authenticated are logged at WARNING at
#: most once per source address and kind per this many seconds, and at most
#: PREAUTH_WARNINGS_PER_INTERVAL times per interval from all sources together.
PREAUTH_LOG_INTERVAL: Final = 10.0
PREAUTH_WARNINGS_PER_INTERVAL: Final = 20
MAX_PREAUTH_SOURCES_REMEMBERED: Final = 1024


class RateLimitedLog:
    """WARNINGs a peer can cause at will, rate-limited by source and kind.

    Anyone who can reach the port causes pre-authentication failures (200
    bad HELLOs wrote 210 KB of log): the first of a kind from a source in an
    interval is a WARNING, the others a debug line, and the next WARNING for
    that source and kind says how many were held back. The metrics count
    every one.
    """

    def __init__(
        self,
        logger: logging.Logger = log,
        interval: float = PREAUTH_LOG_INTERVAL,
        per_interval: int = PREAUTH_WARNINGS_PER_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = logger
        self.interval, self.per_interval = interval, per_interval
        self._clock = clock
        # (source, kind) -> (when its last WARNING was written, lines held back since)
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._window = -interval  # start of the interval the global budget counts
        self._written = 0  # WARNINGs written in that interval

    def warn(self, source: str, kind: str, message: str) -> None:
        now = self._clock()
        key = (source, kind)
        last, held = self._last.get(key, (-self.interval, 0))
        if now - self._window >= self.interval:
            self._window, self._written = now, 0
        held_back = now - last < self.interval or self._written >= self.per_interval
        self._last.pop(key, None)  # re-inserted last: the oldest entry goes first
        if len(self._last) >= MAX_PREAUTH_SOURCES_REMEMBERED:
            self._last.pop(next(iter(self._last)))
        if held_back:
            self._last[key] = (last, held + 1)
            self.log.debug("%s", message)
            return
        self._written += 1
        self._last[key] = (now, 0)
        if held:
            message += (
                f" ({held} more like it from {source} in the last {now - last:.0f} s, "
                "logged at debug level)"
            )
        self.log.warning("%s", message)


CLIENT_CERTIFICATE_REFUSED: Final = (
    "the server closed the TLS connection before the patio handshake began: it requires a "
    "client certificate (mutual TLS) and got none, or one its CA did not sign; pass "
    "certfile/keyfile (ssl_context.load_cert_chain(certfile, keyfile) for a broker, "
    "--tls-cert/--tls-key for the CLI) with a certificate signed by the CA the server trusts "
    '(the server logs which, and counts it in patio_handshake_failures{reason="tls"})'
)
TLS_CLOSED_DURING_HANDSHAKE: Final = (
    "the server closed the connection during the TLS handshake: if it requires a client "
    "certificate (mutual TLS), pass certfile/keyfile (ssl_context.load_cert_chain(certfile, "
    "keyfile), --tls-cert/--tls-key for the CLI); it may also not speak TLS, or have too many "
    "connections waiting for a handshake (its log says which)"
)


def tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake we accepted failed, in words an operator can act on."""
    reason = getattr(exc, "reason", None)
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "the client sent no certificate, and this listener requires one (mutual TLS)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the client's certificate was refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = str(reason or exc)
        return f"{text} (is the client speaking TLS?)" if reason in _NOT_TLS else text
    if isinstance(exc, (ConnectionError, EOFError)):
        return "the client closed the connection"
    if isinstance(exc, TimeoutError):
        return "it timed out"
    return f"{type(exc).__name__}: {exc}"


_NOT_TLS: Final = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL"})


def start_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run ``coro``'s first step now, the rest in a task (None if it ended in that step).

    ``loop.start_tls`` takes the transport over (its protocol, its reading)
    in its first step. In a task that step would come an iteration later,
    and uvloop resumes reading as soon as ``connection_made`` returns: the
    peer's ClientHello would reach the link instead of TLS.
    """
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_resume(coro, yielded))


async def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Drive a coroutine whose first step was taken by hand to its end."""
    while True:
        try:
            if yielded is None:  # a bare yield: give the loop one turn
                await asyncio.sleep(0)
            else:  # a future it awaits; the coroutine reads its outcome itself
                await asyncio.wait((yielded,))
        except BaseException as exc:  # we were cancelled: so is it
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


class LinkHandler(Protocol):
    """What a link reports to its owner (the broker)."""

    def link_authenticated(self, link: Link) -> None: ...

    def link_message(self, link: Link, message: Message) -> None: ...

    def link_lost(self, link: Link, reason: str) -> None: ...


@dataclass(slots=True)
class LinkSettings:
    node_id: str
    instance: str
    keys: KeySet
    stats: BrokerStats = field(default_factory=BrokerStats)
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    max_buffered_output: int = DEFAULT_MAX_BUFFERED_OUTPUT
    preauth_log: RateLimitedLog = field(default_factory=RateLimitedLog)
    #: Authenticate every frame (docs/protocol.md); off only between loopback
    #: addresses, for benchmarks: both ends must agree.
    frame_mac: bool = True


#: Connections a listener holds before they authenticate, in all and from
#: one source address. A stranger needs no key to open sockets; beyond
#: these, a new one is dropped at once instead of holding an fd and a timer
#: for the whole handshake timeout (400 idle sockets held 400 fds for 10 s).
MAX_PENDING_HANDSHAKES: Final = 256
MAX_PENDING_PER_SOURCE: Final = 32


class PreAuthGate:
    """Counts one listener's unauthenticated connections, in all and per source.

    A TLS handshake in progress counts too: it holds the same socket and
    timer, and proves even less.
    """

    def __init__(
        self, total: int = MAX_PENDING_HANDSHAKES, per_source: int = MAX_PENDING_PER_SOURCE
    ) -> None:
        self.total, self.per_source = total, per_source
        self.pending = 0
        self._by_source: dict[str, int] = {}
        self.links: set[Link] = set()  # admitted, not yet authenticated or closed

    def admit(self, link: Link, source: str) -> bool:
        held = self._by_source.get(source, 0)
        if self.pending >= self.total or held >= self.per_source:
            return False
        self.pending += 1
        self._by_source[source] = held + 1
        self.links.add(link)
        return True

    def release(self, link: Link, source: str) -> None:
        self.pending -= 1
        held = self._by_source.pop(source) - 1
        if held:
            self._by_source[source] = held
        self.links.discard(link)

    def abort_all(self, reason: str) -> None:
        """Drop every connection still in its handshake (the listener is closing)."""
        for link in list(self.links):
            link.abort(reason)


class Link(asyncio.Protocol):
    """One connection. ``state`` is owner data the broker hangs on it."""

    def __init__(
        self,
        role: Role,
        settings: LinkSettings,
        handler: LinkHandler,
        gate: PreAuthGate | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.role = role
        self._gate = gate
        # An accepting link with TLS runs the TLS handshake itself, once the
        # gate has let it in and under the handshake deadline (start_tls).
        self._tls = tls
        self._tls_handshake: asyncio.Task[None] | None = None
        self._tls_pending = False  # TLS handshake under way: write nothing yet
        self._tls_lost = False  # the connection was lost while it was
        self._heard = False  # any byte from the peer yet
        self._gate_source: str | None = None  # admitted by the gate, not yet released
        self.settings = settings
        self.handler = handler
        self.connection = Connection(
            role,
            settings.node_id,
            settings.instance,
            settings.keys,
            max_frame_size=settings.max_frame_size,
            frame_mac=settings.frame_mac,
        )
        # Whatever the owner queues on the connection leaves at the end of this
        # loop iteration: sending is one call, never a send plus a flush.
        self.connection.on_output = self.schedule_flush
        self.state: Any = None
        self.peername: tuple[str, int] | None = None
        self.closed = False
        self.close_reason = ""
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._write_paused = False
        self._write_paused_at = 0.0
        self._reading_paused = False
        self._resume_waiters: list[asyncio.Future[None]] = []
        # Why the protocol rejected the peer, if it did: dial() raises it as is
        # so a wrong key surfaces as AuthenticationError, not a bare HandshakeError.
        self._rejected: ProtocolError | None = None
        self._last_received = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self.authenticated: asyncio.Future[PeerAuthenticated] = self._loop.create_future()
        self.finished: asyncio.Future[str] = self._loop.create_future()

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peername = (str(peer[0]), int(peer[1]))
        if self._gate is not None:
            source = self.peername[0] if self.peername else "?"
            if not self._gate.admit(self, source):
                reason = "too many connections waiting for a handshake"
                self._preauth_failure("busy", reason)
                self.abort(reason)
                return
            self._gate_source = source
        if not self.settings.frame_mac and not (self.peername and is_loopback(self.peername[0])):
            reason = (
                f"frame authentication is off, and {self._describe()} is not a loopback "
                "address: frame_mac=False is for benchmarks on loopback only"
            )
            self._preauth_failure("frame_mac", reason)
            self.abort(reason)
            return
        try:
            self.connection.channel_binding = self._channel_binding(transport)
        except (ValueError, ssl.SSLError) as exc:
            self._preauth_failure("tls_binding", exc)
            self.abort(str(exc))
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # not every platform has it
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._last_received = self._loop.time()
        self._timer = self._loop.call_at(
            self._loop.time() + self.settings.handshake_timeout, self._tick
        )
        if self._tls is not None:
            # start_tls takes the transport over now (start_eagerly). The
            # peer's first frames may arrive with the end of its TLS handshake,
            # before start_tls returns the TLS transport: they are read, and
            # what we answer waits until that transport is ours.
            self._tls_pending = True
            self._tls_handshake = start_eagerly(self._loop, self._start_tls(self._tls))
            return
        self._flush()

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        raw = self._transport
        assert raw is not None
        try:
            transport = await self._loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.settings.handshake_timeout,
            )
        except Exception as exc:  # whatever the peer did, it is this link's failure only
            self._tls_pending = False
            if not self.closed:
                self._preauth_failure("tls", f"TLS handshake failed: {tls_failure(exc)}")
                self.abort("TLS handshake failed")
            return
        if self.closed or transport is None or self._tls_lost:
            # Cut meanwhile (deadline, listener closed), or the peer left.
            if transport is not None:
                transport.abort()
            self._tls_pending = False
            self._finish("closed by peer")
            return
        self._transport = transport
        self._tls_pending = False
        self._flush()  # our HELLO (and whatever else waited), now inside TLS

    def data_received(self, data: bytes) -> None:
        self._heard = True
        stats = self.settings.stats
        stats.bytes_received += len(data)
        self._last_received = self._loop.time()
        try:
            events = self.connection.receive_data(data)
        except ProtocolError as exc:
            self._reject(exc)
            return
        handler = self.handler
        for event in events:
            if isinstance(event, PeerAuthenticated):
                self._on_authenticated(event)
            else:
                handler.link_message(self, event)
            if self.closed:
                return
        self._flush()
        # What these frames set in motion (tasks started, callers woken) runs in
        # the next loop iteration; a flush queued now runs after it, in the same
        # iteration, so replies and follow-up calls leave one iteration sooner.
        self.schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls_pending:
            # TLS failed or the peer left before start_tls returned (the TLS
            # layer reports a failed handshake here too): _start_tls ends it.
            self._tls_lost = True
            return
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "closed by peer")
        if (
            not self.close_reason
            and not self._heard
            and self.role is Role.DIALER
            and self._transport is not None
            and self._transport.get_extra_info("sslcontext") is not None
        ):
            # Our TLS handshake succeeded and the acceptor hung up before its
            # HELLO: its TLS layer refused us after checking our certificate.
            reason = CLIENT_CERTIFICATE_REFUSED
            self.settings.stats.handshake_failures["tls"] += 1
        self._finish(reason)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = self._loop.time()

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._resume_waiters = self._resume_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def rejection(self) -> ProtocolError | None:
        """Why the protocol closed this link, if it did (a refused key, a bad frame)."""
        return self._rejected

    # -- sending ------------------------------------------------------------

    def schedule_flush(self) -> None:
        """Write what the protocol queued, once, at the end of this loop iteration."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if transport is None or self.closed or self._tls_pending:
            return
        data = self.connection.data_to_send()
        if data:
            self.settings.stats.bytes_sent += len(data)
            transport.write(data)
            if transport.get_write_buffer_size() > self.settings.max_buffered_output:
                # Said here, as the stall cut below is: the owner logs a caller's
                # (a peer serving nothing) departure only at debug level.
                limit = self.settings.max_buffered_output
                reason = f"peer is not reading: output buffer limit of {limit} bytes exceeded"
                self.settings.stats.links_cut["output_buffer"] += 1
                log.warning("closing connection with %s: %s", self._describe(), reason)
                self.abort(reason)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    async def wait_writable(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        if not self._write_paused or self.closed:
            return
        waiter = self._loop.create_future()
        self._resume_waiters.append(waiter)
        await waiter

    def pause_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self.closed:
            self._reading_paused = False
            # We were not listening: the time that passed is not the peer's silence.
            self._last_received = self._loop.time()
            self._transport.resume_reading()

    # -- closing ------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Flush what is queued and close politely."""
        if self.closed:
            return
        self.close_reason = self.close_reason or reason
        self._flush()
        if self._transport is not None:
            self._transport.close()
        else:
            self._finish(reason)

    def abort(self, reason: str) -> None:
        """Drop the connection now, discarding anything unsent.

        The link is finished (``closed``, owner told) before this returns, not
        when the transport reports the loss an iteration later: in between the
        protocol is already CLOSED, and an owner still routing to the link
        would be sending into it.
        """
        if self.closed:
            return
        self.close_reason = self.close_reason or reason
        if self._transport is not None:
            self._transport.abort()
        self._finish(self.close_reason)

    def _release_gate(self) -> None:
        if self._gate is not None and self._gate_source is not None:
            self._gate.release(self, self._gate_source)
            self._gate_source = None

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._release_gate()
        self.connection.close()
        if self._timer is not None:
            self._timer.cancel()
        self.resume_writing()  # release anyone waiting to write: they will see `closed`
        if not self.authenticated.done():
            error = self._rejected
            if not isinstance(error, HandshakeError):
                error = HandshakeError(reason)
            self.authenticated.set_exception(error)
            self.authenticated.exception()  # mark retrieved: failures are logged, not raised
        else:
            self.handler.link_lost(self, reason)
        if not self.finished.done():
            self.finished.set_result(reason)

    # -- internals ----------------------------------------------------------

    def _describe(self) -> str:
        if self.peername:
            return f"{self.peername[0]}:{self.peername[1]}"
        return "unknown peer"

    def _preauth_failure(self, kind: str, reason: object) -> None:
        """Count a failure before authentication and log it, rate-limited (RateLimitedLog)."""
        self.settings.stats.handshake_failures[kind] += 1
        source = self.peername[0] if self.peername else "?"
        self.settings.preauth_log.warn(
            source, kind, f"closing connection with {self._describe()}: {reason}"
        )

    def _reject(self, exc: ProtocolError) -> None:
        self._rejected = exc
        if isinstance(exc, AuthenticationError):
            self._recheck_certificate()
            self._auth_failure(exc)
            # The chunk that carried the peer's bad AUTH may also have carried
            # its HELLO, so our own AUTH is still queued: send it, or the peer
            # never learns (nor counts, nor logs) that the keys differ.
            self._flush()
        elif not self.authenticated.done():
            self._preauth_failure(exc.reason, exc)  # malformed, oversized, version...
        elif isinstance(exc, FrameAuthenticationError):
            # Each costs a relay a link, but links are dialled again: rate-limited.
            self.settings.stats.frames_rejected[exc.reason] += 1
            source = self.peername[0] if self.peername else "?"
            self.settings.preauth_log.warn(
                source, exc.reason, f"closing connection with {self._describe()}: {exc}"
            )
        else:
            self.settings.stats.frames_rejected[exc.reason] += 1
            log.warning("closing connection with %s: %s", self._describe(), exc)
        self.abort(str(exc))

    def _auth_failure(self, exc: AuthenticationError) -> None:
        """Keys differ: logged once per peer, address and key, and rate-limited as the rest.

        A peer with the wrong key retries every couple of seconds forever: its
        first failure is news, the same again only a debug line. A stranger
        inventing a new node id each time is held by the rate limit.
        """
        host = self.peername[0] if self.peername else "?"
        seen = (self.settings.node_id, host, str(exc))
        if seen in _AUTH_FAILURES_LOGGED:
            self.settings.stats.handshake_failures[exc.reason] += 1
            log.debug("closing connection with %s: %s", self._describe(), exc)
            return
        if len(_AUTH_FAILURES_LOGGED) >= MAX_AUTH_FAILURES_REMEMBERED:
            _AUTH_FAILURES_LOGGED.pop(next(iter(_AUTH_FAILURES_LOGGED)))
        _AUTH_FAILURES_LOGGED[seen] = None
        self._preauth_failure(exc.reason, exc)

    def _channel_binding(self, transport: asyncio.BaseTransport) -> bytes:
        """What the handshake is bound to: the TLS server's certificate (binding.py).

        A listener's link is the TLS server (start_tls, once admitted): its
        own certificate, known before the peer's HELLO can arrive. A dialled
        link comes up with TLS done: the certificate the server presented.
        """
        if self._tls is not None:
            return binding.end_point(binding.server_certificate(self._tls))
        ssl_object = transport.get_extra_info("ssl_object")
        return b"" if ssl_object is None else binding.for_client(ssl_object)

    def _recheck_certificate(self) -> None:
        """A proof failed on a TLS listener: its certificate may have been reloaded."""
        if self._tls is not None:
            with contextlib.suppress(ValueError, ssl.SSLError):
                binding.server_certificate(self._tls, refresh=True)

    def _on_authenticated(self, event: PeerAuthenticated) -> None:
        self._release_gate()
        if self._timer is not None:
            self._timer.cancel()
        interval = self.settings.heartbeat_interval
        self._timer = self._loop.call_at(self._loop.time() + interval, self._tick)
        self.authenticated.set_result(event)
        self.handler.link_authenticated(self)

    def _tick(self) -> None:
        """Handshake deadline before authentication, heartbeat after it."""
        if self.closed:
            return
        now = self._loop.time()
        if not self.authenticated.done():
            timeout = self.settings.handshake_timeout
            self._preauth_failure("timeout", f"no handshake within {timeout:.1f} s")
            self.abort("handshake timed out")
            return
        interval = self.settings.heartbeat_interval
        # While the owner has paused reading (its window of calls is full) the
        # peer's bytes wait in the socket: that is not silence on its part.
        silent = 0.0 if self._reading_paused else now - self._last_received
        if silent > 3 * interval:
            self.settings.stats.links_cut["silent"] += 1
            log.warning("closing connection with %s: silent for %.1f s", self._describe(), silent)
            self.abort(f"peer silent for {silent:.1f} s")
            return
        if self._write_paused and now - self._write_paused_at > 3 * interval:
            self.settings.stats.links_cut["stopped_reading"] += 1
            log.warning("closing connection with %s: peer stopped reading", self._describe())
            self.abort("peer stopped reading")
            return
        if silent > interval:
            self.connection.send_ping()
            self._flush()
        self._timer = self._loop.call_at(now + interval, self._tick)


def _factory(
    role: Role,
    settings: LinkSettings,
    handler: LinkHandler,
    gate: PreAuthGate | None = None,
    tls: ssl.SSLContext | None = None,
) -> Callable[[], Link]:
    return lambda: Link(role, settings, handler, gate, tls)


async def dial(
    host: str,
    port: int,
    settings: LinkSettings,
    handler: LinkHandler,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float | None = None,
) -> Link:
    """Connect and return the link once the handshake has authenticated the peer.

    Raises ``OSError`` when the connection cannot be made and
    :class:`~patio.errors.HandshakeError` (or ``AuthenticationError``) when the
    peer does not complete the hello.
    """
    loop = asyncio.get_running_loop()
    limit = timeout if timeout is not None else settings.handshake_timeout
    async with asyncio.timeout(limit):
        try:
            _, link = await loop.create_connection(
                _factory(Role.DIALER, settings, handler),
                host,
                port,
                ssl=ssl_context,
                server_hostname=(server_hostname or host) if ssl_context else None,
                ssl_handshake_timeout=settings.handshake_timeout if ssl_context else None,
            )
        except (ConnectionResetError, ConnectionAbortedError, ssl.SSLError) as exc:
            if ssl_context is None:
                raise
            settings.stats.handshake_failures["tls"] += 1
            if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
                raise  # its own words say it (certificate verify failed...)
            # A refused connection is ConnectionRefusedError, raised before
            # TLS starts; a reset here came during the TLS handshake.
            raise HandshakeError(f"{TLS_CLOSED_DURING_HANDSHAKE} ({exc!r})") from None
        try:
            await asyncio.shield(link.authenticated)
        except BaseException:
            link.abort("handshake did not complete")
            raise
    return link


async def listen(
    host: str,
    port: int,
    settings: LinkSettings,
    handler: LinkHandler,
    *,
    ssl_context: ssl.SSLContext | None = None,
    gate: PreAuthGate | None = None,
) -> asyncio.Server:
    """Accept connections; each becomes a link reported to ``handler``.

    TLS is started by each link once ``gate`` (the connections still in
    their handshake) admits it, so TLS handshakes count against its caps
    and failures are counted and logged as every other handshake failure.

    With TLS, the certificate the context presents is read here (the
    handshake is bound to it, see :mod:`patio.transport.binding`), so a
    context that cannot present one fails now, not at the first connection.
    """
    loop = asyncio.get_running_loop()
    if ssl_context is not None:
        binding.server_certificate(ssl_context)
    return await loop.create_server(
        _factory(Role.ACCEPTOR, settings, handler, gate or PreAuthGate(), ssl_context),
        host,
        port,
        reuse_address=True,
    )
