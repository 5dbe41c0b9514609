"""Dialling: the addresses a broker keeps connections to, and their backoff.

Membership sources (``add_peer``, a peers file, DNS) each contribute a set of
addresses; their union is the set of targets. Each target has one task that
dials it, waits for the peer to accept us, keeps the link until it drops and
dials again with a jittered exponential backoff. What the targets' attempts
say (still connecting, all connected, some down) tells routing whether a call
with no peer should wait or fail at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from typing import Final

from patio.broker.tcp.core import BrokerCore
from patio.broker.tcp.links import LinkTable
from patio.broker.tcp.peer import Peer, PeerState
from patio.broker.tcp.router import Reach, Router
from patio.errors import (
    AuthenticationError,
    FrameMacMismatchError,
    FrameMacRefusedError,
    HandshakeError,
    KeyMismatchError,
)
from patio.proto import Role
from patio.transport import Link, dial

log = logging.getLogger("patio.broker")

# Reconnect backoff: jittered exponential between these bounds. The cap is
# low because a restarted pod should be back in the mesh within seconds.
RECONNECT_INITIAL: Final = 0.1
RECONNECT_MAX: Final = 2.0

Address = tuple[str, int]


class Target:
    """An address this broker keeps a connection to."""

    __slots__ = ("address", "connected", "failures", "is_self", "last_error", "node_id", "task")

    def __init__(self, address: Address, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.node_id: str | None = None
        self.is_self = False
        self.last_error = ""
        #: attempts failed in a row (0 while the first attempt, or the one after a success, runs)
        self.failures = 0
        self.task: asyncio.Task[None] | None = None
        self.connected: asyncio.Future[None] = loop.create_future()
        self.connected.add_done_callback(_retrieve)

    def describe(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a refusal nobody waits for is not an unhandled error


class Dialer:
    def __init__(self, core: BrokerCore, links: LinkTable, router: Router) -> None:
        self._core = core
        self._links = links
        self._router = router
        self.sources: dict[str, set[Address]] = {}
        self.targets: dict[Address, Target] = {}
        self.client_ssl: ssl.SSLContext | None = None
        #: the longest wait between two attempts to reach one target
        self.backoff_cap: float = RECONNECT_MAX

    # -- membership ------------------------------------------------------------------

    def set_source(self, source: str, addresses: set[Address]) -> None:
        self.sources[source] = addresses
        self.sync()

    def sync(self) -> None:
        core = self._core
        if core.closing or core.draining:
            return
        loop = core.running_loop()
        wanted: set[Address] = set().union(*self.sources.values())
        for address in wanted - self.targets.keys():
            target = Target(address, loop)
            self.targets[address] = target
            target.task = loop.create_task(self._dial_loop(target))
        for address in self.targets.keys() - wanted:
            target = self.targets.pop(address)
            if target.task is not None:
                target.task.cancel()
            peer = self._links.peer_for(target.node_id)
            if (
                peer is not None
                and peer.link.role is Role.DIALER
                and (peer.link.peername is None or peer.link.peername[1] == address[1])
            ):
                self._links.retire(peer, "removed from membership")
        self._router.wake()

    def stop(self) -> list[asyncio.Task[None]]:
        tasks = [t.task for t in self.targets.values() if t.task is not None]
        for task in tasks:
            task.cancel()
        return tasks

    def mark_self(self, link: Link) -> None:
        """A target turned out to be this broker itself: never route to it."""
        for target in self.targets.values():
            if link.peername is not None and target.address[1] == link.peername[1]:
                target.is_self = True
                if not target.connected.done():
                    target.connected.set_result(None)

    # -- what routing asks ----------------------------------------------------------

    def _down(self) -> list[Target]:
        down = []
        for target in self.targets.values():
            if target.is_self:
                continue
            peer = self._links.peer_for(target.node_id)
            if peer is None or peer.link.closed:
                down.append(target)
        return down

    def reach(self) -> Reach:
        down = self._down()
        if not down:
            return Reach.REACHED
        if any(target.failures == 0 for target in down):
            return Reach.CONNECTING
        return Reach.UNREACHABLE

    def unreachable(self) -> list[tuple[str, str]]:
        return [(t.describe(), t.last_error or "still connecting") for t in self._down()]

    # -- the dial loop ----------------------------------------------------------------

    async def _dial_loop(self, target: Target) -> None:
        core = self._core
        backoff = RECONNECT_INITIAL
        ever_connected = False
        logged_error = ""
        while not core.closing and not core.draining:
            existing = self._links.peer_for(target.node_id)
            if existing is not None and not existing.link.closed:
                await asyncio.shield(existing.link.finished)
                await asyncio.sleep(RECONNECT_INITIAL * random.random())
                continue
            link = await self._attempt(target)
            peer = link.state if link is not None else None
            if target.is_self:
                return
            if not isinstance(peer, Peer):
                target.failures += 1
                if target.last_error != logged_error:
                    log.warning("cannot join %s: %s", target.describe(), target.last_error)
                    logged_error = target.last_error
                self._router.wake()  # calls waiting for this target may fail now
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.backoff_cap)
                continue
            target.node_id = peer.node_id
            target.last_error = ""
            target.failures = 0
            logged_error = ""
            if ever_connected:
                core.stats.reconnects += 1
            ever_connected = True
            if not target.connected.done():
                target.connected.set_result(None)
            backoff = RECONNECT_INITIAL
            assert link is not None
            await asyncio.shield(link.finished)
            target.failures = 0  # the next attempt is a reconnection in progress

    async def _attempt(self, target: Target) -> Link | None:
        """One dial; the link if the peer let us in, else None with ``last_error`` set."""
        core = self._core
        host, port = target.address
        try:
            link = await dial(
                host,
                port,
                core.link_settings,
                self._links,
                ssl_context=self.client_ssl,
                timeout=core.connect_timeout,
            )
        except (AuthenticationError, FrameMacMismatchError) as exc:
            self._refused(target, exc)
            return None
        except (OSError, TimeoutError, HandshakeError, ssl.SSLError) as exc:
            target.last_error = f"{type(exc).__name__}: {exc}"
            return None
        except Exception as exc:
            log.exception("unexpected error dialling %s", target.describe())
            target.last_error = f"{type(exc).__name__}: {exc}"
            return None
        peer = link.state
        if not isinstance(peer, Peer):
            target.last_error = link.close_reason or "the link closed during the handshake"
            return None
        if not await self._accepted_by(peer):
            if isinstance(link.rejection, AuthenticationError):
                self._refused(target, link.rejection)
            else:
                target.last_error = (
                    "the peer closed the connection right after the handshake: it is "
                    "shutting down, or refused us"
                )
            return None
        return link

    def _refused(self, target: Target, exc: AuthenticationError | FrameMacMismatchError) -> None:
        """Keys or frame_mac settings differ: retrying will not help until one side changes."""
        target.last_error = f"{type(exc).__name__}: {exc}"
        if not target.connected.done():
            mac = isinstance(exc, FrameMacMismatchError)
            error = FrameMacRefusedError if mac else KeyMismatchError
            target.connected.set_exception(
                error(f"cannot connect to {target.describe()}: {target.last_error}")
            )

    async def _accepted_by(self, peer: Peer) -> bool:
        """Wait for the peer's first announcement: the sign it accepted our proof.

        The dialer checks the acceptor's proof before the acceptor has checked
        the dialer's, so a finished handshake on this side alone does not mean
        the peer let us in.
        """
        loop = self._core.running_loop()
        limit = loop.time() + self._core.connect_timeout
        if peer.state is PeerState.RETIRING:
            return True  # a second link to a node we already reach: the first one serves
        while not peer.announced and not peer.link.closed and loop.time() < limit:
            await self._router.wait_for_change(limit)
        return peer.announced and not peer.link.closed
