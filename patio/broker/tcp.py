"""TCP brokers: server, client and full mesh, all on one machinery.

A broker keeps one authenticated link per peer node. Each peer announces the
task names it executes, its capacity and the window of calls it accepts at
once; a call goes to the peer serving the name with the fewest outstanding
calls relative to its capacity (ties broken at random). What differs between
the three schemes is only who dials, who listens and whether the broker
executes and forwards calls itself:

- ``TCPServerBroker`` listens; ``TCPClientBroker`` dials (the original patio
  API: either side may call, either side may execute).
- ``TCPMeshBroker`` does both, follows a changing membership, counts its own
  executor as a peer and forwards calls from outside callers to the best
  member (one hop at most), so any member is an entry point.

Failure semantics, in one place:

- a lost link fails its in-flight calls at once with
  :class:`~patio.errors.PeerConnectionError`, unless the call is retryable,
  in which case it is re-sent (a new attempt id) to another peer within its
  deadline;
- the deadline travels with the call; the executing side drops work whose
  deadline has passed and cancels work that overruns it;
- a caller that times out or is cancelled sends CANCEL; the executing side
  cancels the task;
- a name nobody serves fails with :class:`~patio.errors.NoRouteError` after a
  bounded wait for peers that are still connecting (never past the timeout).
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import math
import os
import random
import socket
import ssl
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from patio.broker.base import AbstractBroker
from patio.broker.serializer import (
    AbstractSerializer,
    exception_from_payload,
    exception_to_payload,
)
from patio.errors import (
    AuthenticationError,
    CallTimeoutError,
    ExecutionRefusedError,
    HandshakeError,
    NoRouteError,
    PatioError,
    PeerConnectionError,
    SerializationError,
    TaskNotFoundError,
)
from patio.executor import AbstractExecutor, ProcessPoolExecutor
from patio.proto import KeySet, Role
from patio.proto.messages import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_NODE_ID_LENGTH,
    ErrorKind,
    MessageType,
)
from patio.stats import (
    OUTCOME_CANCELLED,
    OUTCOME_CONNECTION,
    OUTCOME_ERROR,
    OUTCOME_NO_ROUTE,
    OUTCOME_OK,
    OUTCOME_REFUSED,
    OUTCOME_TIMEOUT,
    SIDE_CALLER,
    SIDE_EXECUTOR,
    SIDE_FORWARDER,
)
from patio.transport import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    Link,
    LinkSettings,
    dial,
    listen,
)

log = logging.getLogger("patio.broker")

DEFAULT_PORT: Final = 15383
# How long a call waits for a peer serving its name while peers are still
# connecting or announcing. Bounded by the call's own timeout.
DEFAULT_ROUTE_WAIT: Final = 5.0
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
# Reconnect backoff: jittered exponential between these bounds. The cap is
# low because a restarted pod should be back in the mesh within seconds.
RECONNECT_INITIAL: Final = 0.1
RECONNECT_MAX: Final = 2.0
# Calls a peer may have outstanding on one link: at least this many, else
# twice its capacity, so the pipe stays full while the executor queue is short.
MIN_WINDOW: Final = 1024
# Bytes a CALL/RESULT frame adds around its payload and name (type, ids,
# timeout, msgpack headers), rounded up.
FRAME_OVERHEAD: Final = 64
# A retired link (duplicate, removed peer) that never quiets down is cut after this.
RETIRE_TIMEOUT: Final = 30.0


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A read-only view of one known peer, for health checks and metrics."""

    node_id: str | None
    address: tuple[str, int] | None
    connected: bool
    in_flight: int
    capacity: int
    names: frozenset[str]
    draining: bool


class _LinkLost(Exception):
    """Internal: the link carrying a call went away (retryable)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _ErrorReply(Exception):
    """Internal: the far side answered with ERROR; kept raw so forwarding can relay it."""

    def __init__(self, kind: int, payload: bytes) -> None:
        super().__init__(kind)
        self.kind = kind
        self.payload = payload


class _Local:
    """Marker for "run it on this broker's own executor"."""


LOCAL: Final = _Local()


class _Call:
    __slots__ = ("future", "name")

    def __init__(self, future: asyncio.Future[bytes], name: str) -> None:
        self.future = future
        self.name = name


class _Peer:
    """Broker-side state of one authenticated link."""

    __slots__ = (
        "announced",
        "cancelled",
        "capacity",
        "deadlines",
        "draining",
        "expired",
        "goodbye_received",
        "goodbye_sent",
        "instance",
        "link",
        "names",
        "next_id",
        "node_id",
        "pending",
        "read_paused",
        "retire_timer",
        "retiring",
        "routable",
        "serving",
        "window",
    )

    def __init__(self, link: Link, node_id: str, instance: str) -> None:
        self.link = link
        self.node_id = node_id
        self.instance = instance
        self.names: frozenset[str] = frozenset()
        self.routable: frozenset[str] = frozenset()
        self.capacity = 0
        self.window = 0
        self.announced = False
        self.draining = False
        self.retiring = False
        self.goodbye_sent = False
        self.goodbye_received = False
        self.read_paused = False
        self.retire_timer: asyncio.TimerHandle | None = None
        self.pending: dict[int, _Call] = {}
        self.serving: dict[int, asyncio.Task[None]] = {}
        self.cancelled: set[int] = set()
        self.expired: set[int] = set()
        self.deadlines: dict[int, asyncio.TimerHandle] = {}
        self.next_id = 1

    @property
    def routing(self) -> bool:
        return self.announced and not self.draining and not self.retiring and not self.link.closed


class _Target:
    """An address this broker keeps a connection to."""

    __slots__ = ("address", "connected", "is_self", "last_error", "node_id", "task")

    def __init__(self, address: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.node_id: str | None = None
        self.is_self = False
        self.last_error = ""
        self.task: asyncio.Task[None] | None = None
        self.connected: asyncio.Future[None] = loop.create_future()


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def _as_key(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


class TCPBroker(AbstractBroker):
    """The machinery shared by the server, client and mesh brokers."""

    #: Mesh members execute calls themselves and forward outside callers' calls.
    local_execution: bool = False
    forwarding: bool = False

    def __init__(
        self,
        executor: AbstractExecutor,
        *,
        key: bytes | str = b"",
        accepted_keys: Iterable[bytes | str] = (),
        ssl_context: ssl.SSLContext | None = None,
        client_ssl_context: ssl.SSLContext | None = None,
        node_id: str | None = None,
        serializer: AbstractSerializer | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        route_wait: float = DEFAULT_ROUTE_WAIT,
        allow_empty_key: bool = False,
        prefer_local: bool = False,
        retryable_tasks: Iterable[str] = (),
    ) -> None:
        super().__init__(executor, serializer=serializer)
        self.instance = os.urandom(8).hex()
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}-{self.instance[:6]}"
        if len(self.node_id) > MAX_NODE_ID_LENGTH:
            raise ValueError(
                f"node id is {len(self.node_id)} characters; at most {MAX_NODE_ID_LENGTH} "
                "(a DNS name) fit in the handshake"
            )
        self._settings = LinkSettings(
            node_id=self.node_id,
            instance=self.instance,
            keys=KeySet(_as_key(key), tuple(_as_key(k) for k in accepted_keys)),
            stats=self.stats,
            max_frame_size=max_frame_size,
            handshake_timeout=handshake_timeout,
            heartbeat_interval=heartbeat_interval,
        )
        self._server_ssl = ssl_context
        self._client_ssl = client_ssl_context
        self.connect_timeout = connect_timeout
        self.route_wait = route_wait
        self.allow_empty_key = allow_empty_key
        self.prefer_local = prefer_local
        self.retryable_tasks = frozenset(retryable_tasks)
        self.draining = False
        self.listening: list[tuple[str, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._by_node: dict[str, _Peer] = {}
        self._peers: set[_Peer] = set()
        self._sources: dict[str, set[tuple[str, int]]] = {}
        self._targets: dict[tuple[str, int], _Target] = {}
        self._routes: dict[str, list[_Peer]] = {}
        self._route_waiters: list[asyncio.Future[None]] = []
        self._capacity_waiters: deque[asyncio.Future[None]] = deque()
        self._routable_names: frozenset[str] = frozenset()
        # The calls of outside callers are forwarded by mesh members; members
        # themselves already chose the best peer, so their calls never are.
        self._route_flag = not self.forwarding

    # -- lifecycle -----------------------------------------------------------

    @property
    def key_fingerprint(self) -> str:
        return self._settings.keys.fingerprint

    @property
    def own_names(self) -> frozenset[str]:
        return self.registry.names if self.executor.accepts_calls else frozenset()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: use 'async with broker:'")
        return self._loop

    async def setup(self) -> None:
        await super().setup()
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        if self._closing:
            await super().close()
            return
        self._closing = True
        for server in self._servers:
            server.close()
        tasks: list[asyncio.Task[Any]] = []
        for target in self._targets.values():
            if target.task is not None:
                target.task.cancel()
                tasks.append(target.task)
        for peer in list(self._peers):
            self._fail_pending(peer, "broker closed")
            for task in peer.serving.values():
                task.cancel()
                tasks.append(task)
            self._send_goodbye(peer)
            peer.link.close("broker closed")
        self._wake_routes()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await super().close()

    def _check_key_for(self, address: str) -> None:
        if self._settings.keys.primary:
            return
        if is_loopback(address):
            message = (
                f"patio broker on {address} uses an empty key: anyone who can reach "
                f"this loopback address can call and serve tasks; set key= outside development"
            )
            warnings.warn(message, stacklevel=3)
            log.warning(message)
            return
        if not self.allow_empty_key:
            raise ValueError(
                f"refusing to listen on non-loopback address {address!r} with an empty key: "
                "anyone on the network could run tasks; pass key=... (or allow_empty_key=True "
                "if this network is trusted)"
            )
        log.warning("patio broker listening on %s with an empty key (allowed explicitly)", address)

    async def listen(self, address: str, port: int = DEFAULT_PORT) -> None:
        """Accept connections on ``address:port`` (IPv4 or IPv6)."""
        self._running_loop()
        self._check_key_for(address)
        server = await listen(address, port, self._settings, self, ssl_context=self._server_ssl)
        self._servers.append(server)
        for sock in server.sockets:
            host, bound_port = sock.getsockname()[:2]
            self.listening.append((str(host), int(bound_port)))
        log.info("listening on %s:%s as %s", address, port, self.node_id)

    # -- membership ----------------------------------------------------------

    def add_peer(self, host: str, port: int = DEFAULT_PORT) -> None:
        """Keep a connection to ``host:port`` (dialled and re-dialled with backoff)."""
        self._sources.setdefault("manual", set()).add((host.strip("[]"), int(port)))
        self._sync_targets()

    def remove_peer(self, host: str, port: int = DEFAULT_PORT) -> None:
        """Stop dialling ``host:port`` and retire the link dialled to it."""
        self._sources.setdefault("manual", set()).discard((host.strip("[]"), int(port)))
        self._sync_targets()

    def set_peers(self, source: str, peers: Iterable[tuple[str, int]]) -> None:
        """Replace the set of addresses one membership source contributes."""
        self._sources[source] = {(host.strip("[]"), int(port)) for host, port in peers}
        self._sync_targets()

    def set_keys(self, key: bytes | str, accepted_keys: Iterable[bytes | str] = ()) -> None:
        """Use a new key set for handshakes from now on (links already up stay up)."""
        self._settings.keys = KeySet(_as_key(key), tuple(_as_key(k) for k in accepted_keys))

    def set_ssl_contexts(
        self, server: ssl.SSLContext | None, client: ssl.SSLContext | None
    ) -> None:
        """TLS contexts for listeners started and links dialled from now on.

        To rotate a certificate under a running listener, call
        ``load_cert_chain`` on the context it already uses instead.
        """
        self._server_ssl = server
        self._client_ssl = client

    def _sync_targets(self) -> None:
        if self._closing or self.draining:
            return
        loop = self._running_loop()
        wanted: set[tuple[str, int]] = set().union(*self._sources.values())
        for address in wanted - self._targets.keys():
            target = _Target(address, loop)
            self._targets[address] = target
            target.task = loop.create_task(self._dial_loop(target))
        for address in self._targets.keys() - wanted:
            target = self._targets.pop(address)
            if target.task is not None:
                target.task.cancel()
            peer = self._by_node.get(target.node_id or "")
            if (
                peer is not None
                and peer.link.role is Role.DIALER
                and (peer.link.peername is None or peer.link.peername[1] == address[1])
            ):
                self._retire(peer, "removed from membership")
        self._wake_routes()

    async def _dial_loop(self, target: _Target) -> None:
        backoff = RECONNECT_INITIAL
        host, port = target.address
        ever_connected = False
        logged_error = ""
        while not self._closing and not self.draining:
            existing = self._by_node.get(target.node_id) if target.node_id else None
            if existing is not None and not existing.link.closed:
                await asyncio.shield(existing.link.finished)
                await asyncio.sleep(RECONNECT_INITIAL * random.random())
                continue
            try:
                link = await dial(
                    host,
                    port,
                    self._settings,
                    self,
                    ssl_context=self._client_ssl,
                    timeout=self.connect_timeout,
                )
            except Exception as exc:
                target.last_error = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, OSError | TimeoutError | HandshakeError | ssl.SSLError):
                    log.exception("unexpected error dialling %s:%s", host, port)
                elif isinstance(exc, AuthenticationError | HandshakeError):
                    if target.last_error != logged_error:
                        log.warning("cannot join %s:%s: %s", host, port, exc)
                        logged_error = target.last_error
                else:
                    log.debug("cannot connect to %s:%s: %s", host, port, exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, RECONNECT_MAX)
                continue
            peer = link.state
            if target.is_self:
                return
            if isinstance(peer, _Peer) and not await self._accepted_by(peer):
                target.last_error = (
                    "the peer closed the connection right after the handshake: it does not "
                    "accept our key, or it is shutting down"
                )
                if target.last_error != logged_error:
                    log.warning("cannot join %s:%s: %s", host, port, target.last_error)
                    logged_error = target.last_error
                peer = None
            if not isinstance(peer, _Peer):
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, RECONNECT_MAX)
                continue
            target.node_id = peer.node_id
            target.last_error = ""
            logged_error = ""
            if ever_connected:
                self.stats.reconnects += 1
            ever_connected = True
            if not target.connected.done():
                target.connected.set_result(None)
            backoff = RECONNECT_INITIAL
            await asyncio.shield(link.finished)

    async def _accepted_by(self, peer: _Peer) -> bool:
        """Wait for the peer's first announcement: the sign it accepted our proof.

        The dialer checks the acceptor's proof before the acceptor has checked
        the dialer's, so a finished handshake on this side alone does not mean
        the peer let us in.
        """
        loop = self._running_loop()
        limit = loop.time() + self.connect_timeout
        if peer.retiring:
            return True  # a second link to a node we already reach: the first one serves
        while not peer.announced and not peer.link.closed and loop.time() < limit:
            waiter: asyncio.Future[None] = loop.create_future()
            self._route_waiters.append(waiter)
            handle = loop.call_at(limit, _resolve, waiter)
            try:
                await waiter
            finally:
                handle.cancel()
        return peer.announced and not peer.link.closed

    # -- LinkHandler -----------------------------------------------------------

    def link_authenticated(self, link: Link) -> None:
        event = link.connection.peer
        assert event is not None
        if event.node_id == self.node_id:
            if event.instance == self.instance:
                for target in self._targets.values():
                    if link.peername is not None and target.address[1] == link.peername[1]:
                        target.is_self = True
                        if not target.connected.done():
                            target.connected.set_result(None)
                link.close("connected to itself")
                return
            log.warning("another process uses this node id %r: refusing its link", self.node_id)
            link.close("duplicate node id")
            return
        if self._closing:
            link.close("broker closing")
            return
        peer = _Peer(link, event.node_id, event.instance)
        link.state = peer
        self._peers.add(peer)
        self.stats.connects += 1
        existing = self._by_node.get(event.node_id)
        if existing is None or existing.link.closed:
            self._by_node[event.node_id] = peer
        elif existing.instance != event.instance:
            log.info("peer %s restarted: replacing its old link", event.node_id)
            self._by_node[event.node_id] = peer
            existing.link.abort("peer restarted with a new instance")
        elif self._keep_new(link, existing.link, event.node_id):
            self._by_node[event.node_id] = peer
            self._retire(existing, "duplicate link")
        else:
            self._retire(peer, "duplicate link")
        if peer is self._by_node.get(event.node_id):
            log.info("connected to %s (%s)", event.node_id, self._describe(link))
        self._send_announce(peer)
        link.schedule_flush()
        self._routing_changed()

    def _keep_new(self, new: Link, old: Link, peer_node: str) -> bool:
        """Both ends of a doubled pair keep the link dialled by the smaller node id."""
        winner = min(self.node_id, peer_node)

        def dialer(link: Link) -> str:
            return self.node_id if link.role is Role.DIALER else peer_node

        if dialer(new) == dialer(old):
            return False
        return dialer(new) == winner

    def link_message(self, link: Link, message: list[Any]) -> None:
        peer: _Peer = link.state
        kind = message[0]
        if kind == 4:  # RESULT
            call = peer.pending.pop(message[1], None)
            if call is not None:
                if not call.future.done():
                    call.future.set_result(message[2])
                self._call_done(peer)
        elif kind == 3:  # CALL
            self._on_call(peer, message)
        elif kind == MessageType.ERROR:
            call = peer.pending.pop(message[1], None)
            if call is not None:
                if not call.future.done():
                    call.future.set_exception(_ErrorReply(message[2], message[3]))
                self._call_done(peer)
        elif kind == MessageType.CANCEL:
            task = peer.serving.get(message[1])
            if task is not None:
                self._cancel_serving(peer, message[1], task)
        elif kind == MessageType.ANNOUNCE:
            _, names, routable, capacity, window, draining = message
            peer.names = frozenset(n for n in names if type(n) is str)
            peer.routable = frozenset(n for n in routable if type(n) is str)
            peer.capacity = max(int(capacity), 0)
            peer.window = max(int(window), 1)
            was_draining = peer.draining
            peer.draining = bool(draining)
            peer.announced = True
            if peer.draining and not was_draining:
                log.info("peer %s is draining: no new calls go to it", peer.node_id)
                self._send_goodbye(peer)
            self._routing_changed()
        elif kind == MessageType.GOODBYE:
            peer.goodbye_received = True
            if not peer.retiring and not self.draining and not peer.draining:
                # The peer stopped using this link (duplicate, removed from its
                # membership, closing): stop using it too, close when quiet.
                self._retire(peer, "peer said goodbye")
            self._maybe_close(peer)

    def link_lost(self, link: Link, reason: str) -> None:
        peer = link.state
        if not isinstance(peer, _Peer):
            return
        self._peers.discard(peer)
        self.stats.disconnects += 1
        if peer.retire_timer is not None:
            peer.retire_timer.cancel()
        if self._by_node.get(peer.node_id) is peer:
            del self._by_node[peer.node_id]
            if not (self._closing or peer.draining or self.draining or peer.goodbye_received):
                log.warning("lost connection to %s: %s", peer.node_id, reason)
            else:
                log.info("disconnected from %s: %s", peer.node_id, reason)
        self._fail_pending(peer, reason)
        for call_id, task in list(peer.serving.items()):
            self._cancel_serving(peer, call_id, task)
        self._routing_changed()

    @staticmethod
    def _cancel_serving(peer: _Peer, call_id: int, task: asyncio.Task[None]) -> None:
        """Cancel a call we execute for ``peer``; the caller wants no reply.

        A task cancelled before its first step never runs its own ``finally``,
        so one that has not started is not cancelled: it sees the mark at its
        start, does its bookkeeping and returns.
        """
        peer.cancelled.add(call_id)
        if inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED:  # type: ignore[arg-type]
            task.cancel()

    # -- routing -------------------------------------------------------------

    def _routing_changed(self) -> None:
        self._routes.clear()
        if self.forwarding and not self._closing:
            routable = frozenset().union(*(p.names for p in self._by_node.values() if p.routing))
            routable -= self.own_names
            if routable != self._routable_names:
                self._routable_names = routable
                for peer in self._by_node.values():
                    if not peer.link.closed:
                        self._send_announce(peer)
                        peer.link.schedule_flush()
        self._wake_routes()

    def _wake_routes(self) -> None:
        waiters, self._route_waiters = self._route_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        while self._capacity_waiters:
            waiter = self._capacity_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _candidates(self, name: str) -> list[_Peer]:
        peers = self._routes.get(name)
        if peers is None:
            use_routable = self._route_flag
            peers = [
                p
                for p in self._by_node.values()
                if p.routing and (name in p.names or (use_routable and name in p.routable))
            ]
            self._routes[name] = peers
        return peers

    def _local_serves(self, name: str) -> bool:
        return (
            self.local_execution
            and not self.draining
            and self.executor.accepts_calls
            and name in self.registry
        )

    def _choose(self, name: str, exclude: set[str] | None) -> _Peer | _Local | None:
        best: _Peer | None = None
        best_score = float("inf")
        ties = 0
        for peer in self._candidates(name):
            if exclude is not None and peer.node_id in exclude:
                continue
            in_flight = len(peer.pending)
            if in_flight >= peer.window:
                continue
            score = in_flight / (peer.capacity or 1)
            if score < best_score:
                best, best_score, ties = peer, score, 1
            elif score == best_score:
                ties += 1
                if random.random() * ties < 1.0:
                    best = peer
        if self._local_serves(name):
            executor = self.executor
            if self.prefer_local and executor.busy < executor.max_workers:
                return LOCAL
            local_score = (executor.busy + executor.queued) / executor.max_workers
            if best is None or local_score < best_score:
                return LOCAL
            if local_score == best_score and random.random() * (ties + 1) < 1.0:
                return LOCAL
        return best

    def _route_state(self, name: str, exclude: set[str] | None) -> str:
        """Why no peer was chosen: 'saturated', 'waiting' (peers still coming) or 'none'."""
        candidates = [
            p for p in self._candidates(name) if exclude is None or p.node_id not in exclude
        ]
        if candidates:
            return "saturated"
        if not self._by_node:
            return "waiting"
        if any(not p.announced for p in self._by_node.values()):
            return "waiting"
        for target in self._targets.values():
            if target.is_self:
                continue
            peer = self._by_node.get(target.node_id) if target.node_id else None
            if peer is None or peer.link.closed:
                return "waiting"
        if exclude:
            return "waiting"  # a retry: the peer we lost may come back
        return "none"

    def _no_route(self, name: str) -> NoRouteError:
        serving = sorted({n for p in self._by_node.values() for n in p.names})
        shown = ", ".join(serving[:10]) + (" ..." if len(serving) > 10 else "")
        return NoRouteError(
            f"no peer serves task {name!r} ({len(self._by_node)} peer(s) connected"
            + (f"; they serve: {shown}" if shown else "")
            + ")"
        )

    async def _wait_for_route(
        self, name: str, deadline: float | None, exclude: set[str] | None
    ) -> _Peer | _Local:
        loop = self._running_loop()
        route_limit = loop.time() + self.route_wait
        while True:
            target = self._choose(name, exclude)
            if target is None and exclude:
                target = self._choose(name, None)
            if target is not None:
                return target
            if self._closing:
                raise PeerConnectionError("broker is closed")
            state = self._route_state(name, exclude)
            now = loop.time()
            if state == "none":
                raise self._no_route(name)
            if state == "saturated":
                limit = deadline
                waiters: Any = self._capacity_waiters
            else:
                limit = route_limit if deadline is None else min(route_limit, deadline)
                waiters = self._route_waiters
            if limit is not None and now >= limit:
                if state == "saturated":
                    raise CallTimeoutError(
                        f"call to {name!r} timed out waiting for a peer with free capacity"
                    )
                raise self._no_route(name)
            waiter: asyncio.Future[None] = loop.create_future()
            waiters.append(waiter)
            handle = loop.call_at(limit, _resolve, waiter) if limit is not None else None
            try:
                await waiter
            except BaseException:
                if state == "saturated" and waiter.done() and not waiter.cancelled():
                    self._wake_one_waiter()  # pass on the room we were given
                raise
            finally:
                if handle is not None:
                    handle.cancel()

    # -- calling -------------------------------------------------------------

    async def call(
        self,
        func: str | Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        retryable: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``func`` on a peer serving it and return the result.

        :param timeout: seconds; travels with the call as its deadline.
        :param retryable: re-send the call to another peer if its connection
            drops (for idempotent tasks). Defaults to whether the task is in
            ``retryable_tasks``.
        """
        name = func if type(func) is str else self.task_name(func)
        loop = self._running_loop()
        if timeout is not None and not timeout < math.inf:
            if math.isnan(timeout):  # NaN would poison the loop's timer heap
                raise ValueError("timeout must be a number of seconds or None, not NaN")
            timeout = None  # infinite: no deadline
        stats = self.stats
        stats.calls_started[(name, SIDE_CALLER)] += 1
        observer = stats.call_observer
        started = loop.time()
        deadline = None if timeout is None else started + timeout
        retry = retryable if retryable is not None else name in self.retryable_tasks
        outcome = OUTCOME_ERROR
        payload: bytes | None = None
        tried: set[str] | None = None
        # One coroutine frame per call on the common path: routing, sending
        # and retrying live here rather than in helpers awaited in turn.
        try:
            while True:
                target = self._choose(name, tried)
                if target is None:
                    if deadline is None and tried is None and self._candidates(name):
                        # Every peer serving it is at its window: park as a plain
                        # future (a flood of calls must cost little while waiting).
                        waiter: asyncio.Future[None] = loop.create_future()
                        self._capacity_waiters.append(waiter)
                        try:
                            await waiter
                        except BaseException:
                            if waiter.done() and not waiter.cancelled():
                                self._wake_one_waiter()  # pass on the room we were given
                            raise
                        continue
                    target = await self._wait_for_route(name, deadline, tried)
                if isinstance(target, _Local):
                    result = await self._execute_local(name, args, kwargs, deadline, timeout)
                    break
                if payload is None:
                    payload = self._pack(name, [list(args), kwargs], "arguments")
                try:
                    reply = await self._send_call(target, name, payload, deadline, timeout)
                except _LinkLost as exc:
                    if self._closing or not retry:
                        raise PeerConnectionError(
                            f"call to {name!r} failed: connection to {target.node_id} lost "
                            f"({exc.reason})"
                        ) from None
                    if deadline is not None and loop.time() >= deadline:
                        raise CallTimeoutError(
                            f"call to {name!r} timed out after its connection was lost"
                        ) from None
                    stats.calls_retried += 1
                    tried = (tried or set()) | {target.node_id}
                    log.info("retrying %r elsewhere: connection to %s lost", name, target.node_id)
                    continue
                except _ErrorReply as exc:
                    if exc.kind == ErrorKind.CONNECTION and retry:
                        tried = (tried or set()) | {target.node_id}
                        stats.calls_retried += 1
                        continue
                    raise self._error_from_reply(name, target, exc) from None
                try:
                    result = self.serializer.unpack(reply)
                except SerializationError as exc:
                    raise SerializationError(
                        f"result of {name!r} could not be decoded: {exc}"
                    ) from None
                break
            outcome = OUTCOME_OK
            return result
        except CallTimeoutError:
            outcome = OUTCOME_TIMEOUT
            raise
        except NoRouteError:
            outcome = OUTCOME_NO_ROUTE
            raise
        except PeerConnectionError:
            outcome = OUTCOME_CONNECTION
            raise
        except ExecutionRefusedError:
            outcome = OUTCOME_REFUSED
            raise
        except asyncio.CancelledError:
            outcome = OUTCOME_CANCELLED
            raise
        finally:
            stats.calls_finished[(name, SIDE_CALLER, outcome)] += 1
            if observer is not None:
                observer(name, SIDE_CALLER, outcome, loop.time() - started)

    def _pack(self, name: str, value: Any, what: str) -> bytes:
        try:
            return self.serializer.pack(value)
        except SerializationError as exc:
            raise SerializationError(f"{what} of {name!r} cannot be serialized: {exc}") from None
        except Exception as exc:
            raise SerializationError(f"{what} of {name!r} cannot be serialized: {exc}") from exc

    async def _send_call(
        self,
        peer: _Peer,
        name: str,
        payload: bytes,
        deadline: float | None,
        timeout: float | None,
    ) -> bytes:
        loop = self._running_loop()
        link = peer.link
        if len(payload) + 4 * len(name) + FRAME_OVERHEAD > self._settings.max_frame_size and (
            len(payload) + len(name.encode()) + FRAME_OVERHEAD > self._settings.max_frame_size
        ):
            raise SerializationError(
                f"arguments of {name!r} take {len(payload)} bytes, over the frame limit of "
                f"{self._settings.max_frame_size} bytes"
            )
        if link.write_paused:
            # The peer is not reading: wait for room, but never past the deadline.
            scope = asyncio.timeout_at(deadline)
            try:
                async with scope:
                    await link.wait_writable()
            except TimeoutError:
                if scope.expired():
                    raise CallTimeoutError(
                        f"call to {name!r} timed out waiting for {peer.node_id} to read"
                    ) from None
                raise
            if link.closed:
                raise _LinkLost(link.close_reason or "closed")
        call_id = peer.next_id
        peer.next_id = call_id + 1
        future: asyncio.Future[bytes] = loop.create_future()
        peer.pending[call_id] = _Call(future, name)
        remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
        link.connection.send_call(call_id, name, payload, remaining, self._route_flag)
        link.schedule_flush()
        timer = None
        if deadline is not None:
            timer = loop.call_at(deadline, _expire, future, name, timeout)
        try:
            return await future
        except BaseException:
            # Timed out or cancelled here (not answered, not lost): tell the far side.
            if peer.pending.pop(call_id, None) is not None:
                if not link.closed:
                    link.connection.send_cancel(call_id)
                    link.schedule_flush()
                self._call_done(peer)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _wake_one_waiter(self) -> None:
        waiters = self._capacity_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _call_done(self, peer: _Peer) -> None:
        if self._capacity_waiters:
            self._wake_one_waiter()
        if peer.retiring or self.draining:
            self._maybe_close(peer)

    def _fail_pending(self, peer: _Peer, reason: str) -> None:
        pending, peer.pending = peer.pending, {}
        for call in pending.values():
            if not call.future.done():
                call.future.set_exception(_LinkLost(reason))
        if pending:
            self._wake_routes()

    def _error_from_reply(self, name: str, peer: _Peer, reply: _ErrorReply) -> BaseException:
        kind = reply.kind
        if kind == ErrorKind.EXCEPTION:
            try:
                payload = self.serializer.unpack(reply.payload)
            except SerializationError as exc:
                return SerializationError(f"error raised by {name!r} could not be decoded: {exc}")
            return exception_from_payload(payload)
        text = reply.payload.decode("utf-8", "replace")
        if kind in (ErrorKind.NOT_FOUND, ErrorKind.NO_ROUTE):
            return NoRouteError(text)
        if kind == ErrorKind.TIMEOUT:
            return CallTimeoutError(text)
        if kind in (ErrorKind.REFUSED, ErrorKind.OVERLOADED):
            return ExecutionRefusedError(text)
        if kind == ErrorKind.CONNECTION:
            return PeerConnectionError(text)
        if kind == ErrorKind.SERIALIZATION:
            return SerializationError(text)
        if kind == ErrorKind.CANCELLED:
            return PeerConnectionError(f"call to {name!r} was cancelled by {peer.node_id}: {text}")
        return PatioError(f"call to {name!r} failed on {peer.node_id}: {text}")

    async def _execute_local(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        deadline: float | None,
        timeout: float | None,
    ) -> Any:
        if deadline is None:
            return await self.executor.execute(name, *args, **kwargs)
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                return await self.executor.execute(name, *args, **kwargs)
        except TimeoutError:
            if scope.expired():
                raise CallTimeoutError(f"call to {name!r} timed out after {timeout} s") from None
            raise

    # -- serving ---------------------------------------------------------------

    def _on_call(self, peer: _Peer, message: list[Any]) -> None:
        _, call_id, name, payload, timeout, route = message
        loop = self._running_loop()
        if timeout is not None and timeout <= 0:
            self._reply_error(peer, call_id, ErrorKind.TIMEOUT, "deadline passed before start")
            self.stats.calls_finished[(name, SIDE_EXECUTOR, OUTCOME_TIMEOUT)] += 1
            return
        if call_id in peer.serving:
            self.stats.frames_rejected["malformed"] += 1
            log.warning(
                "closing connection with %s: it reused call id %d while that call runs",
                peer.node_id,
                call_id,
            )
            peer.link.abort(f"peer reused call id {call_id} while it was in flight")
            return
        deadline = None if timeout is None else loop.time() + timeout
        task = loop.create_task(self._serve(peer, call_id, name, payload, deadline, route))
        peer.serving[call_id] = task
        if deadline is not None:
            # A timer handle, cheaper than an asyncio.timeout scope per call.
            peer.deadlines[call_id] = loop.call_at(deadline, self._expire_serving, peer, call_id)
        if len(peer.serving) >= self._window and not peer.read_paused:
            peer.read_paused = True
            peer.link.pause_reading()

    @staticmethod
    def _expire_serving(peer: _Peer, call_id: int) -> None:
        """The deadline of a call we execute passed: stop it and answer TIMEOUT."""
        peer.deadlines.pop(call_id, None)
        task = peer.serving.get(call_id)
        if task is None:
            return
        peer.expired.add(call_id)
        if inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED:  # type: ignore[arg-type]
            task.cancel()

    def _reply_error(self, peer: _Peer, call_id: int, kind: int, text: str | bytes) -> None:
        link = peer.link
        if link.closed:
            return
        payload = text if isinstance(text, bytes) else text.encode()
        link.connection.send_error(call_id, kind, payload)
        link.schedule_flush()

    async def _serve(
        self,
        peer: _Peer,
        call_id: int,
        name: str,
        payload: bytes,
        deadline: float | None,
        route: bool,
    ) -> None:
        loop = self._running_loop()
        stats = self.stats
        # An outside caller's call that a member hands on is counted as
        # forwarded, not executed, so summing executions over members is exact.
        target: _Peer | _Local | None = LOCAL
        if route and self.forwarding:
            target = self._choose(name, {peer.node_id})
        side = SIDE_EXECUTOR if target is LOCAL else SIDE_FORWARDER
        stats.calls_started[(name, side)] += 1
        started = loop.time()
        outcome = OUTCOME_ERROR
        link = peer.link
        try:
            if peer.cancelled and call_id in peer.cancelled:
                outcome = OUTCOME_CANCELLED
                return
            if peer.expired and call_id in peer.expired:
                raise asyncio.CancelledError  # expired before it started: answered below
            if target is not LOCAL:
                reply = await self._forward(peer, name, payload, deadline, target)
            else:
                reply = await self._serve_call(name, payload)
            if not link.closed:
                link.connection.send_result(call_id, reply)
                link.schedule_flush()
            outcome = OUTCOME_OK
        except _ErrorReply as exc:
            self._reply_error(peer, call_id, exc.kind, exc.payload)
        except _LinkLost as exc:
            outcome = OUTCOME_CONNECTION
            target_node = target.node_id if isinstance(target, _Peer) else "a member"
            self._reply_error(
                peer,
                call_id,
                ErrorKind.CONNECTION,
                f"call to {name!r} failed: {self.node_id} forwarded it and lost its "
                f"connection to {target_node} ({exc.reason})",
            )
        except NoRouteError as exc:
            outcome = OUTCOME_NO_ROUTE
            self._reply_error(peer, call_id, ErrorKind.NO_ROUTE, str(exc))
        except CallTimeoutError as exc:
            outcome = OUTCOME_TIMEOUT
            self._reply_error(peer, call_id, ErrorKind.TIMEOUT, str(exc))
        except TaskNotFoundError as exc:
            outcome = OUTCOME_NO_ROUTE
            self._reply_error(peer, call_id, ErrorKind.NOT_FOUND, f"{exc} (on {self.node_id})")
        except ExecutionRefusedError as exc:
            outcome = OUTCOME_REFUSED
            self._reply_error(peer, call_id, ErrorKind.REFUSED, f"{exc} (on {self.node_id})")
        except SerializationError as exc:
            self._reply_error(peer, call_id, ErrorKind.SERIALIZATION, str(exc))
        except asyncio.CancelledError:
            if call_id in peer.expired:
                outcome = OUTCOME_TIMEOUT
                self._reply_error(
                    peer, call_id, ErrorKind.TIMEOUT, f"call to {name!r} passed its deadline"
                )
            else:
                outcome = OUTCOME_CANCELLED
                if call_id not in peer.cancelled:
                    self._reply_error(
                        peer, call_id, ErrorKind.CANCELLED, "cancelled by the executor"
                    )
        except Exception as exc:
            self._reply_error(peer, call_id, ErrorKind.EXCEPTION, self._describe_error(exc))
        finally:
            peer.serving.pop(call_id, None)
            if deadline is not None:
                handle = peer.deadlines.pop(call_id, None)
                if handle is not None:
                    handle.cancel()
                peer.expired.discard(call_id)
            peer.cancelled.discard(call_id)
            stats.calls_finished[(name, side, outcome)] += 1
            if stats.call_observer is not None:
                stats.call_observer(name, side, outcome, loop.time() - started)
            if peer.read_paused and len(peer.serving) <= self._window // 2:
                peer.read_paused = False
                link.resume_reading()
            if peer.retiring or self.draining:
                self._maybe_close(peer)

    def _describe_error(self, exc: BaseException) -> bytes:
        """The exception as an ERROR payload that always fits in one frame."""
        description = exception_to_payload(exc, self.serializer)
        limit = self._settings.max_frame_size - FRAME_OVERHEAD
        try:
            data = self.serializer.pack(description)
        except Exception:
            data = b""
        if 0 < len(data) <= limit:
            return data
        # Too large (or unpackable): drop the arguments, then cut the texts.
        description["args"] = []
        text_limit = max(limit // 4, 256)
        for field in ("traceback", "message"):
            text = str(description.get(field, ""))
            if len(text) > text_limit:
                description[field] = text[:text_limit] + f"... [{len(text)} characters]"
        return self.serializer.pack(description)

    async def _forward(
        self,
        origin: _Peer,
        name: str,
        payload: bytes,
        deadline: float | None,
        target: _Peer | _Local | None,
    ) -> bytes:
        """Hand an outside caller's call to the best member; bytes pass through as they are."""
        if target is None:
            target = await self._wait_for_route(name, deadline, {origin.node_id})
        if isinstance(target, _Local):
            return await self._serve_call(name, payload)
        self.stats.calls_forwarded += 1
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                return await self._send_call(target, name, payload, deadline, None)
        except TimeoutError:
            if scope.expired():
                raise CallTimeoutError(f"forwarded call to {name!r} passed its deadline") from None
            raise

    async def _serve_call(self, name: str, payload: bytes) -> bytes:
        try:
            args, kwargs = self.serializer.unpack(payload)
        except (SerializationError, TypeError, ValueError) as exc:
            raise SerializationError(f"arguments of {name!r} could not be decoded: {exc}") from None
        observer = self.stats.queue_observer
        if observer is None or isinstance(self.executor, ProcessPoolExecutor):
            result = await self.executor.execute(name, *args, **kwargs)
        else:
            # Time from arrival to the moment the function really starts: the
            # wrapper runs only once the executor has given the call a slot.
            func = self.registry.resolve(name)
            loop = self._running_loop()
            arrived = loop.time()

            def started(*args: Any, **kwargs: Any) -> Any:
                observer(name, time.monotonic() - arrived)
                return func(*args, **kwargs)

            result = await self.executor.submit(started, *args, **kwargs)
        data = self._pack(name, result, "result")
        if len(data) + FRAME_OVERHEAD > self._settings.max_frame_size:
            raise SerializationError(
                f"result of {name!r} takes {len(data)} bytes, over the frame limit of "
                f"{self._settings.max_frame_size} bytes"
            )
        return data

    # -- announcing, retiring, draining ---------------------------------------

    @property
    def _window(self) -> int:
        return max(2 * self.executor.max_workers, MIN_WINDOW)

    def _send_announce(self, peer: _Peer) -> None:
        if peer.link.closed or peer.retiring:
            return
        accepts = self.executor.accepts_calls
        peer.link.connection.send_announce(
            sorted(self.own_names),
            sorted(self._routable_names) if self.forwarding else [],
            self.executor.max_workers if accepts else 0,
            self._window,
            self.draining,
        )

    def announce(self) -> None:
        """Send every peer our current names, capacity and draining state."""
        for peer in list(self._peers):
            self._send_announce(peer)
            peer.link.schedule_flush()

    def _send_goodbye(self, peer: _Peer) -> None:
        """Promise the peer we send it no new calls on this link."""
        if peer.goodbye_sent or peer.link.closed:
            return
        peer.goodbye_sent = True
        peer.link.connection.send_goodbye("no more calls")
        peer.link.schedule_flush()

    def _retire(self, peer: _Peer, reason: str) -> None:
        """Stop using a link and close it once both sides are quiet."""
        if peer.retiring:
            return
        peer.retiring = True
        log.debug("retiring link to %s: %s", peer.node_id, reason)
        self._send_goodbye(peer)
        loop = self._running_loop()
        peer.retire_timer = loop.call_later(RETIRE_TIMEOUT, peer.link.abort, f"{reason}: timeout")
        self._maybe_close(peer)
        self._routing_changed()

    def _maybe_close(self, peer: _Peer) -> None:
        if (
            (peer.retiring or self.draining)
            and peer.goodbye_sent
            and peer.goodbye_received
            and not peer.pending
            and not peer.serving
        ):
            peer.link.close("link retired")

    def _drained(self) -> bool:
        for peer in self._peers:
            if peer.link.closed:
                continue
            if not peer.goodbye_received or peer.pending or peer.serving:
                return False
        return True

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking new work, finish what is running, tell peers, close links.

        Returns True when everything finished within ``timeout`` seconds.
        The broker stays set up (call :meth:`close` afterwards).
        """
        loop = self._running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self.draining = True
        log.info("draining: %d peer link(s), finishing work in progress", len(self._peers))
        for server in self._servers:
            server.close()
        for target in self._targets.values():
            if target.task is not None:
                target.task.cancel()
        self.announce()
        self._routing_changed()
        drained = True
        while not self._drained():
            if deadline is not None and loop.time() >= deadline:
                drained = False
                break
            await asyncio.sleep(0.02)
        remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
        if not await self.executor.drain(remaining):
            drained = False
        for peer in list(self._peers):
            self._send_goodbye(peer)
            peer.link.close("drained")
        log.info("drain %s", "complete" if drained else "timed out")
        return drained

    # -- views -------------------------------------------------------------------

    def peers(self) -> list[PeerInfo]:
        """Every known peer: membership targets and connected links."""
        infos: list[PeerInfo] = []
        seen: set[str] = set()
        for target in self._targets.values():
            if target.is_self:
                continue
            peer = self._by_node.get(target.node_id) if target.node_id else None
            if peer is not None:
                seen.add(peer.node_id)
            infos.append(self._info(peer, target.address, target.node_id))
        for node_id, peer in self._by_node.items():
            if node_id not in seen:
                infos.append(self._info(peer, peer.link.peername, node_id))
        return infos

    @staticmethod
    def _info(peer: _Peer | None, address: tuple[str, int] | None, node: str | None) -> PeerInfo:
        if peer is None or peer.link.closed:
            return PeerInfo(node, address, False, 0, 0, frozenset(), False)
        return PeerInfo(
            peer.node_id,
            address,
            True,
            len(peer.pending),
            peer.capacity,
            peer.names,
            peer.draining,
        )

    @staticmethod
    def _describe(link: Link) -> str:
        return f"{link.peername[0]}:{link.peername[1]}" if link.peername else "?"


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _expire(future: asyncio.Future[bytes], name: str, timeout: float | None) -> None:
    if not future.done():
        future.set_exception(CallTimeoutError(f"call to {name!r} timed out after {timeout} s"))


class TCPServerBroker(TCPBroker):
    """Listens for connections; calls go to whichever connected peer serves the name."""


class TCPClientBroker(TCPBroker):
    """Connects to one or more servers; ``ssl_context`` is the client-side TLS context."""

    def __init__(
        self,
        executor: AbstractExecutor,
        *,
        ssl_context: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("client_ssl_context", ssl_context)
        super().__init__(executor, **kwargs)

    async def connect(self, address: str, port: int = DEFAULT_PORT) -> None:
        """Connect to a server and keep the connection up (reconnecting with backoff).

        Returns once the first connection is authenticated; raises
        :class:`~patio.errors.PeerConnectionError` when it cannot be made
        within ``connect_timeout`` seconds.
        """
        self._running_loop()
        host = address.strip("[]")
        self.add_peer(host, port)
        target = self._targets[(host, int(port))]
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.shield(target.connected)
        except TimeoutError:
            self.remove_peer(host, port)
            raise PeerConnectionError(
                f"cannot connect to {address}:{port}: {target.last_error or 'timed out'}"
            ) from None
