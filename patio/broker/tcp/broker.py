"""The TCP broker facade: server, client and full mesh, all on one machinery.

A broker keeps one authenticated link per peer node. Each peer announces the
task names it executes, its capacity and the window of calls it accepts at
once. The work is done by parts, each owning its state:

- :mod:`~patio.broker.tcp.router` -- where a call is **routed**;
- :mod:`~patio.broker.tcp.sender` -- how a call is **sent** and answered;
- :mod:`~patio.broker.tcp.server` -- how a call is **served** or **forwarded**;
- :mod:`~patio.broker.tcp.links` -- the links, one peer per node, dispatch;
- :mod:`~patio.broker.tcp.dialer` -- the addresses we dial, with backoff;
- :mod:`~patio.broker.tcp.codec` -- payloads and the one error table.

What differs between the schemes is only who dials, who listens and whether
the broker executes and forwards calls itself. Failure semantics:

- a lost link fails its in-flight calls at once with
  :class:`~patio.errors.PeerConnectionError`, unless the call is retryable,
  in which case it is re-sent (a new attempt id) to another peer within its
  deadline;
- the deadline travels with the call; the executing side drops work whose
  deadline has passed and cancels work that overruns it;
- a caller that times out or is cancelled sends CANCEL; the executing side
  cancels the task;
- a name no connected peer serves waits ``route_wait`` seconds at most for
  peers still connecting, then fails: :class:`~patio.errors.NoRouteError`
  when every peer is connected and none serves it,
  :class:`~patio.errors.PeersUnreachableError` when the peers that might
  refuse connections (at once, without waiting).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final

from patio.broker.base import AbstractBroker
from patio.broker.serializer import AbstractSerializer
from patio.broker.tcp.dialer import RECONNECT_INITIAL, Dialer
from patio.broker.tcp.links import LinkTable
from patio.broker.tcp.peer import LinkView, Peer, PeerInfo, PeerState
from patio.broker.tcp.protocol import Protocol
from patio.broker.tcp.router import Router
from patio.broker.tcp.sender import CallSender
from patio.broker.tcp.server import DEFAULT_MAX_PEER_CALL_BYTES, Server
from patio.broker.tcp.status import StatusDesk, clean_member
from patio.errors import PeerConnectionError
from patio.executor import AbstractExecutor
from patio.proto import KeySet
from patio.proto.keys import check_strength as check_key_strength
from patio.proto.messages import DEFAULT_MAX_FRAME_SIZE, MAX_NODE_ID_LENGTH
from patio.transport import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_BUFFERED_OUTPUT,
    LinkSettings,
    PreAuthGate,
    binding,
    check_limits,
    is_loopback,
    listen,
)

log = logging.getLogger("patio.broker")

DEFAULT_PORT: Final = 15383
# How long a call waits for a peer serving its name while peers are still
# connecting or announcing. Bounded by the call's own timeout.
DEFAULT_ROUTE_WAIT: Final = 5.0
DEFAULT_CONNECT_TIMEOUT: Final = 10.0


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
        key: bytes | str = b"",
        *,
        accepted_keys: Iterable[bytes | str] = (),
        ssl_context: ssl.SSLContext | None = None,
        client_ssl_context: ssl.SSLContext | None = None,
        node_id: str | None = None,
        serializer: AbstractSerializer | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_buffered_output: int = DEFAULT_MAX_BUFFERED_OUTPUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        route_wait: float = DEFAULT_ROUTE_WAIT,
        allow_empty_key: bool = False,
        allow_weak_key: bool = False,
        frame_mac: bool = True,
        prefer_local: bool = False,
        retryable_tasks: Iterable[str] = (),
        reconnect_timeout: float | None = None,
        max_peer_call_bytes: int = DEFAULT_MAX_PEER_CALL_BYTES,
    ) -> None:
        check_limits(max_frame_size, max_buffered_output)
        super().__init__(executor, serializer=serializer)
        self.instance = os.urandom(8).hex()
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}-{self.instance[:6]}"
        if len(self.node_id) > MAX_NODE_ID_LENGTH:
            raise ValueError(
                f"node id is {len(self.node_id)} characters; at most {MAX_NODE_ID_LENGTH} "
                "(a DNS name) fit in the handshake"
            )
        #: patio 0.1.4's protocol object; its serial numbers this broker's calls.
        self.protocol = Protocol(serializer=self.serializer, key=_as_key(key))
        self.link_settings = LinkSettings(
            node_id=self.node_id,
            instance=self.instance,
            keys=KeySet(_as_key(key), tuple(_as_key(k) for k in accepted_keys)),
            stats=self.stats,
            max_frame_size=max_frame_size,
            max_buffered_output=max_buffered_output,
            handshake_timeout=handshake_timeout,
            heartbeat_interval=heartbeat_interval,
            frame_mac=frame_mac,
        )
        self._server_ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.route_wait = route_wait
        self.allow_empty_key = allow_empty_key
        self.allow_weak_key = allow_weak_key
        self.prefer_local = prefer_local
        self.retryable_tasks = frozenset(retryable_tasks)
        self.draining = False
        self.listening: list[tuple[str, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._gates: list[PreAuthGate] = []  # one per listener: its connections in handshake
        by_node: dict[str, Peer] = {}
        # The parts, each above the ones it uses; the two upward arrows (what
        # routing asks the dialer, a link that turns out to be our own) are
        # callbacks bound once everything exists.
        self._router = Router(self, by_node)
        self._sender = CallSender(self, self._router, self.protocol)
        if max_peer_call_bytes < 1:
            raise ValueError(f"max_peer_call_bytes must be positive, not {max_peer_call_bytes}")
        self._server = Server(self, self._router, self._sender, max_peer_call_bytes)
        self._status = StatusDesk(self, by_node, self.membership_links, self._addresses)
        self._links = LinkTable(
            self, by_node, self._router, self._sender, self._server, self._status
        )
        self._dialer = Dialer(self, self._links, self._router)
        self._dialer.client_ssl = client_ssl_context
        if reconnect_timeout is not None:  # patio 0.1.4's name for the longest retry wait
            self._dialer.backoff_cap = max(float(reconnect_timeout), RECONNECT_INITIAL)
        self._links.on_self_link = self._dialer.mark_self
        self._router.bind(
            reach=self._dialer.reach,
            unreachable=self._dialer.unreachable,
            routable_changed=self._links.announce,
            load_changed=self._links.load_changed,
        )

    # -- lifecycle -----------------------------------------------------------

    @property
    def key_fingerprint(self) -> str:
        return self.link_settings.keys.fingerprint

    @property
    def own_names(self) -> frozenset[str]:
        return self.registry.names if self.executor.accepts_calls else frozenset()

    @property
    def closing(self) -> bool:
        return self._closing

    def running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: use 'async with broker:'")
        return self._loop

    async def setup(self) -> None:
        await super().setup()
        self._loop = asyncio.get_running_loop()
        self._status.started = time.monotonic()

    async def close(self) -> None:
        if self._closing:
            await super().close()
            return
        self._closing = True
        self.stop_listening()
        tasks: list[asyncio.Task[Any]] = [*self._dialer.stop()]
        tasks += self._links.close_all("broker closed")
        self._router.wake()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await super().close()

    def _check_key_strength(self, where: str, host: str, keys: KeySet | None = None) -> None:
        accepted = (keys or self.link_settings.keys).all_accepted()
        if warning := check_key_strength(
            accepted, where, loopback=is_loopback(host), allow_weak=self.allow_weak_key
        ):
            log.warning("%s", warning)

    def _check_frame_mac_for(self, address: str, what: str) -> None:
        """frame_mac=False is for benchmarks on loopback: refuse any other address."""
        if not self.link_settings.frame_mac and not is_loopback(address):
            raise ValueError(
                f"refusing to {what} {address!r} with frame authentication off: "
                "frame_mac=False (--no-frame-mac) lets anyone on the path inject calls, so it "
                "is allowed only between loopback addresses, for benchmarks"
            )

    def _check_key_for(self, address: str) -> None:
        if self.link_settings.keys.primary:
            self._check_key_strength(f"listening on {address}", address)
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
        self.running_loop()
        self._check_frame_mac_for(address, "listen on")
        self._check_key_for(address)
        gate = PreAuthGate()
        server = await listen(
            address, port, self.link_settings, self._links, ssl_context=self._server_ssl, gate=gate
        )
        self._gates.append(gate)
        self._servers.append(server)
        for sock in server.sockets:
            host, bound_port = sock.getsockname()[:2]
            self.listening.append((str(host), int(bound_port)))
        log.info("listening on %s:%s as %s", address, port, self.node_id)

    def stop_listening(self) -> None:
        """Accept no new connections (links already up stay up; those in handshake are cut)."""
        for server in self._servers:
            server.close()
        for gate in self._gates:
            gate.abort_all("listener closed")
        self._gates.clear()

    # -- membership ----------------------------------------------------------

    def add_peer(self, host: str, port: int = DEFAULT_PORT) -> None:
        """Keep a connection to ``host:port`` (dialled and re-dialled with backoff)."""
        self._check_frame_mac_for(host.strip("[]"), "dial")
        self._check_key_strength(f"dialling {host}", host.strip("[]"))
        manual = set(self._dialer.sources.get("manual", ()))
        manual.add((host.strip("[]"), int(port)))
        self._dialer.set_source("manual", manual)

    def remove_peer(self, host: str, port: int = DEFAULT_PORT) -> None:
        """Stop dialling ``host:port`` and retire the link dialled to it."""
        manual = set(self._dialer.sources.get("manual", ()))
        manual.discard((host.strip("[]"), int(port)))
        self._dialer.set_source("manual", manual)

    def set_peers(self, source: str, peers: Iterable[tuple[str, int]]) -> None:
        """Replace the set of addresses one membership source contributes."""
        addresses = {(host.strip("[]"), int(port)) for host, port in peers}
        for host, _ in addresses:
            self._check_frame_mac_for(host, "dial")
        self._dialer.set_source(source, addresses)

    def set_keys(self, key: bytes | str, accepted_keys: Iterable[bytes | str] = ()) -> None:
        """Use a new key set for handshakes from now on (links already up stay up)."""
        keys = KeySet(_as_key(key), tuple(_as_key(k) for k in accepted_keys))
        for host, _ in self.listening:
            self._check_key_strength(f"listening on {host}", host, keys)
        self.link_settings.keys = keys

    def set_ssl_contexts(
        self, server: ssl.SSLContext | None, client: ssl.SSLContext | None
    ) -> None:
        """TLS contexts for listeners started and links dialled from now on.

        To rotate a certificate under a running listener, call
        ``load_cert_chain`` on the context it already uses, then this with
        that context: the handshake is bound to the listener's certificate,
        which is read again here (otherwise the first connection after the
        change fails and it is read again then).
        """
        if server is not None:
            binding.reload(server)
        self._server_ssl = server
        self._dialer.client_ssl = client

    # -- calling -------------------------------------------------------------

    def call(
        self,
        func: str | Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        retryable: bool | None = None,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, Any]:
        """Call ``func`` on a peer serving it and return the result (await it).

        :param timeout: seconds; travels with the call as its deadline.
        :param retryable: re-send the call to another peer if its connection
            drops (for idempotent tasks). Defaults to whether the task is in
            ``retryable_tasks``.

        It returns the call sender's coroutine itself rather than awaiting it
        in one more coroutine: every suspension and resumption of a call
        passes through each frame of the chain, and that frame cost about
        0.7 µs of CPU per call. Nothing runs until the result is awaited.
        """
        return self._sender.call(func, args, kwargs, timeout, retryable)

    # -- announcing, draining ---------------------------------------------------

    def announce(self) -> None:
        """Send every peer our current names, capacity and draining state."""
        self._links.announce()

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking new work, finish what is running, tell peers, close links.

        Returns True when everything finished within ``timeout`` seconds.
        The broker stays set up (call :meth:`close` afterwards).
        """
        loop = self.running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self.draining = True
        log.info("draining: %d peer link(s), finishing work in progress", len(self._links.peers))
        self.stop_listening()
        self._dialer.stop()
        self.announce()
        self._router.changed()
        drained = True
        while not self._links.drained():
            if deadline is not None and loop.time() >= deadline:
                drained = False
                break
            await asyncio.sleep(0.02)
        remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
        if not await self.executor.drain(remaining):
            drained = False
        self._links.goodbye_all("drained")
        log.info("drain %s", "complete" if drained else "timed out")
        return drained

    # -- views -------------------------------------------------------------------

    def peers(self) -> list[PeerInfo]:
        """Every known peer: membership targets and connected links."""
        infos: list[PeerInfo] = []
        seen: set[str] = set()
        for target in self._dialer.targets.values():
            if target.is_self:
                continue
            peer = self._links.peer_for(target.node_id)
            if peer is not None:
                seen.add(peer.node_id)
            infos.append(self._info(peer, target.address, target.node_id))
        for node_id, peer in self._links.by_node.items():
            if node_id not in seen:
                infos.append(self._info(peer, peer.link.peername, node_id))
        return infos

    async def mesh_status(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every mesh member's status, gathered by a member we are connected to.

        One map per member (docs/protocol.md lists the keys); a member that
        is known but not connected, or did not answer, has an ``error`` key.
        """
        for peer in list(self._links.by_node.values()):
            if peer.link.closed or peer.state not in (PeerState.ACTIVE, PeerState.DRAINING):
                continue
            members = await self._status.ask(peer, True, timeout)
            return [m for m in map(clean_member, members) if m is not None]
        raise PeerConnectionError("not connected to any member: nobody to ask for the status")

    def status(self) -> dict[str, Any]:
        """This broker's own status map (what it answers to a STATUS request)."""
        return self._status.own()

    def membership_links(self) -> tuple[int, int, list[tuple[str, str]]]:
        """(links up, members known, [(member, why it is not connected)]).

        Counted over membership (the addresses this broker dials), so callers
        that connect in (``patio call``, an application's client) count for
        nothing: a member's links to the rest of its mesh.
        """
        known = up = 0
        missing: list[tuple[str, str]] = []
        for target in self._dialer.targets.values():
            if target.is_self:
                continue
            known += 1
            peer = self._links.peer_for(target.node_id)
            if peer is not None and not peer.link.closed:
                up += 1
            else:
                why = target.last_error or "still connecting"
                missing.append((target.node_id or target.describe(), f"{target.describe()}: {why}"))
        return up, known, missing

    def _addresses(self) -> list[str]:
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.listening]

    def links(self) -> list[LinkView]:
        """Every authenticated link (retiring ones too), as read-only snapshots."""
        return self._links.views()

    @staticmethod
    def _info(peer: Peer | None, address: tuple[str, int] | None, node: str | None) -> PeerInfo:
        if peer is None or peer.link.closed:
            return PeerInfo(node, address, False, 0, 0, frozenset(), False)
        return PeerInfo(
            peer.node_id,
            address,
            True,
            len(peer.pending),
            peer.capacity,
            peer.names,
            peer.state is PeerState.DRAINING,
        )


#: The name patio 0.1.4 gives the base of its server and client brokers.
TCPBrokerBase = TCPBroker


class TCPServerBroker(TCPBroker):
    """Listens for connections; calls go to whichever connected peer serves the name."""


class TCPClientBroker(TCPBroker):
    """Connects to one or more servers; ``ssl_context`` is the client-side TLS context."""

    def __init__(
        self,
        executor: AbstractExecutor,
        key: bytes | str = b"",
        *,
        ssl_context: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("client_ssl_context", ssl_context)
        super().__init__(executor, key, **kwargs)

    async def connect(
        self, address: str, port: int = DEFAULT_PORT, *, first_attempt_only: bool = False
    ) -> None:
        """Connect to a server and keep the connection up (reconnecting with backoff).

        Returns once the first connection is authenticated. Raises
        :class:`~patio.errors.AuthenticationError` at once when the server
        refuses our key (or we refuse its),
        :class:`~patio.errors.FrameMacRefusedError` at once when its
        ``frame_mac`` setting differs from ours, and
        :class:`~patio.errors.PeerConnectionError` when no connection can be
        made within ``connect_timeout`` seconds -- or, with
        ``first_attempt_only``, as soon as the first attempt fails (a refused
        connection: a one-off command such as ``patio call`` reports it at
        once instead of retrying for the whole ``connect_timeout``).
        """
        loop = self.running_loop()
        host = address.strip("[]")
        self.add_peer(host, port)
        target = self._dialer.targets[(host, int(port))]
        try:
            async with asyncio.timeout(self.connect_timeout):
                if first_attempt_only:
                    # The dialer wakes routing after a failed attempt; success
                    # resolves ``connected``. Wait for whichever comes first.
                    limit = loop.time() + self.connect_timeout
                    while not target.connected.done() and target.failures == 0:
                        change = loop.create_task(self._router.wait_for_change(limit))
                        try:
                            await asyncio.wait(
                                (change, target.connected), return_when=asyncio.FIRST_COMPLETED
                            )
                        finally:
                            change.cancel()
                    if not target.connected.done():
                        raise PeerConnectionError(
                            f"cannot connect to {address}:{port}: {target.last_error}"
                        )
                await asyncio.shield(target.connected)
        except TimeoutError:
            self.remove_peer(host, port)
            raise PeerConnectionError(
                f"cannot connect to {address}:{port}: {target.last_error or 'timed out'}"
            ) from None
        except BaseException:
            self.remove_peer(host, port)
            raise
