"""The link table: every authenticated link, one peer per node, and what arrives on them.

It keeps exactly one link in use per peer node: a second link to a node we
already reach is retired (both ends keep the one dialled by the smaller node
id), and a link from a restarted peer (a new instance id) replaces the old one
at once. It hands each message to the part that owns it: answers to the call
sender, calls and cancels to the server, announcements to routing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from patio.broker.tcp.core import BrokerCore
from patio.broker.tcp.peer import LinkView, Peer, PeerState
from patio.broker.tcp.router import Router
from patio.broker.tcp.sender import CallSender
from patio.broker.tcp.server import Server
from patio.broker.tcp.status import StatusDesk
from patio.proto import Role
from patio.proto.messages import (
    Announce,
    Call,
    Cancel,
    Error,
    Goodbye,
    Load,
    Message,
    Result,
    Status,
    StatusReply,
)
from patio.transport import Link

log = logging.getLogger("patio.broker")

# A retired link (duplicate, removed peer) that never quiets down is cut after this.
RETIRE_TIMEOUT: Final = 30.0
# How often, at most, our executor's load is reported to peers while it
# changes. No timer runs while the load stays at zero.
LOAD_INTERVAL: Final = 0.05

#: Most calls a peer may claim to run at once, or to accept in its window.
#: Real executors run hundreds at most; a larger claim (2**62 was shown) only
#: draws every call to that member, where they wait and time out.
MAX_ANNOUNCED_CAPACITY: Final = 65_536

#: Links one node id may hold at once: the one it dialled and the one it
#: accepted when both ends dial together. A key holder opening more only
#: multiplies what it can make us hold (windows, buffers, byte budgets).
MAX_LINKS_PER_NODE: Final = 2


def describe(link: Link) -> str:
    return f"{link.peername[0]}:{link.peername[1]}" if link.peername else "?"


class LinkTable:
    """Implements :class:`~patio.transport.LinkHandler` for the broker."""

    def __init__(
        self,
        core: BrokerCore,
        by_node: dict[str, Peer],
        router: Router,
        sender: CallSender,
        server: Server,
        status: StatusDesk,
    ) -> None:
        self._core = core
        self.by_node = by_node  # node id -> the link in use to it
        self.peers: set[Peer] = set()  # every authenticated link, retiring ones too
        self._router = router
        self._sender = sender
        self._server = server
        self._status = status
        #: told of a link that turned out to be this broker itself
        self.on_self_link: Callable[[Link], None] = lambda link: None
        self._load_sent = 0
        self._last_peak = 0
        self._load_timer: asyncio.TimerHandle | None = None
        # The name lists we announce and the sets they were made from: built
        # once per change, sent as they are to every peer (no sort).
        self._announced: tuple[frozenset[str], frozenset[str], list[str], list[str]] = (
            frozenset(),
            frozenset(),
            [],
            [],
        )

    def peer_for(self, node_id: str | None) -> Peer | None:
        return self.by_node.get(node_id) if node_id else None

    def views(self) -> list[LinkView]:
        return [LinkView.of(peer) for peer in self.peers]

    # -- LinkHandler ----------------------------------------------------------

    def link_authenticated(self, link: Link) -> None:
        core = self._core
        event = link.connection.peer
        assert event is not None
        if event.node_id == core.node_id:
            if event.instance == core.instance:
                self.on_self_link(link)
                link.close("connected to itself")
                return
            log.warning("another process uses this node id %r: refusing its link", core.node_id)
            link.close("duplicate node id")
            return
        if core.closing:
            link.close("broker closing")
            return
        existing = self.by_node.get(event.node_id)
        if (
            existing is not None
            and not existing.link.closed
            and existing.instance != event.instance
        ):
            # Another instance claims a node id whose link is still up. Any key
            # holder could cut a live member's link at will if this replaced
            # it, so the claim waits until that link closes or fails its
            # heartbeat; a restarted process's old link does one or the other
            # by itself (its socket died with it, or it falls silent).
            log.warning(
                "refusing a link from another instance of %r: its live link is still up",
                event.node_id,
            )
            core.stats.links_refused["node_id_in_use"] += 1
            link.close("node id in use by a live link")
            return
        if self._links_of(event.node_id) >= MAX_LINKS_PER_NODE:
            log.warning(
                "refusing a link from %r: it already holds %d links, the most one node may",
                event.node_id,
                MAX_LINKS_PER_NODE,
            )
            core.stats.links_refused["too_many_links"] += 1
            link.close(f"node already holds {MAX_LINKS_PER_NODE} links")
            return
        peer = Peer(link, event.node_id, event.instance)
        link.state = peer
        self.peers.add(peer)
        core.stats.connects += 1
        if existing is None or existing.link.closed:
            if existing is not None and existing.instance != event.instance:
                log.info("peer %r restarted: its new instance replaces the old", event.node_id)
            self.by_node[event.node_id] = peer
        elif self._keep_new(link, existing.link, event.node_id):
            self.by_node[event.node_id] = peer
            self.retire(existing, "duplicate link")
        else:
            self.retire(peer, "duplicate link")
        self.send_announce(peer)
        if self._load_sent:
            peer.link.connection.send_load(self._load_sent)
        self._router.changed()

    def _links_of(self, node_id: str) -> int:
        """Open links of ``node_id``: the one in use and any retiring beside it."""
        return sum(1 for p in self.peers if p.node_id == node_id and not p.link.closed)

    def _keep_new(self, new: Link, old: Link, peer_node: str) -> bool:
        """Both ends of a doubled pair keep the link dialled by the smaller node id."""
        own = self._core.node_id
        winner = min(own, peer_node)

        def dialer(link: Link) -> str:
            return own if link.role is Role.DIALER else peer_node

        if dialer(new) == dialer(old):
            return False
        return dialer(new) == winner

    def link_message(self, link: Link, message: Message) -> None:
        """Hand a message to the part that owns it (the most frequent first)."""
        peer: Peer = link.state
        if isinstance(message, Result):
            self._sender.on_result(peer, message.call_id, message.payload)
        elif isinstance(message, Call):
            self._server.on_call(peer, message)
        elif isinstance(message, Error):
            self._sender.on_error(peer, message.call_id, message.error_kind, message.payload)
        elif isinstance(message, Cancel):
            self._server.on_cancel(peer, message.call_id)
        elif isinstance(message, Load):
            peer.load = max(message.load, 0)
            peer.load_base = len(peer.pending)
        elif isinstance(message, Announce):
            self._on_announce(peer, message)
        elif isinstance(message, Goodbye):
            self._on_goodbye(peer)
        elif isinstance(message, Status):
            self._status.on_request(peer, message.request_id, message.gather)
        elif isinstance(message, StatusReply):
            self._status.on_reply(peer, message.request_id, message.members)

    def _on_announce(self, peer: Peer, announce: Announce) -> None:
        peer.names = frozenset(n for n in announce.names if type(n) is str)
        # Only a broker that routes by them keeps them: a mesh member picks
        # among the members themselves and never looks at a peer's routes.
        if self._router.route_flag:
            peer.routable = frozenset(n for n in announce.routable if type(n) is str)
        peer.capacity = min(max(announce.capacity, 0), MAX_ANNOUNCED_CAPACITY)
        peer.window = min(max(announce.window, 1), MAX_ANNOUNCED_CAPACITY)
        if peer.state is PeerState.CONNECTED and peer is self.by_node.get(peer.node_id):
            # Logged on the first announcement, when we know what the peer is:
            # a member serving tasks is news; a caller that serves nothing
            # (patio call, an application's client) connects and leaves all
            # day, and is only worth a debug line.
            log.log(
                logging.INFO if peer.names else logging.DEBUG,
                "connected to %r (%s, %d tasks)",
                peer.node_id,
                describe(peer.link),
                len(peer.names),
            )
        if peer.state is not PeerState.RETIRING:
            was_draining = peer.state is PeerState.DRAINING
            draining = announce.draining
            peer.move(PeerState.DRAINING if draining else PeerState.ACTIVE)
            if draining and not was_draining:
                log.info("peer %r is draining: no new calls go to it", peer.node_id)
                peer.send_goodbye()
        self._router.changed()

    def _on_goodbye(self, peer: Peer) -> None:
        peer.goodbye_received = True
        if peer.state in (PeerState.CONNECTED, PeerState.ACTIVE) and not self._core.draining:
            # The peer stopped using this link (duplicate, removed from its
            # membership, closing): stop using it too, close when quiet.
            self.retire(peer, "peer said goodbye")
        peer.close_if_quiet(self._core.draining)

    def link_lost(self, link: Link, reason: str) -> None:
        peer = link.state
        if not isinstance(peer, Peer):
            return
        core = self._core
        self.peers.discard(peer)
        core.stats.disconnects += 1
        if peer.retire_timer is not None:
            peer.retire_timer.cancel()
        if self.by_node.get(peer.node_id) is peer:
            del self.by_node[peer.node_id]
            expected = (
                core.closing
                or core.draining
                or peer.state is PeerState.DRAINING
                or peer.goodbye_received
            )
            if not peer.names:  # a caller (see _on_announce): not news
                log.debug("disconnected from %r: %s", peer.node_id, reason)
            elif expected:
                log.info("disconnected from %r: %s", peer.node_id, reason)
            else:
                log.warning("lost connection to %r: %s", peer.node_id, reason)
        peer.move(PeerState.CLOSED)
        self._sender.fail_pending(peer, reason)
        self._server.cancel_all(peer)
        self._status.link_lost(peer, reason)
        self._router.changed()

    # -- announcing, retiring, closing -----------------------------------------------

    def send_announce(self, peer: Peer) -> None:
        link = peer.link
        if link.closed or peer.state is PeerState.RETIRING:
            return
        core = self._core
        accepts = core.executor.accepts_calls
        names, routable = self._names_to_announce()
        link.connection.send_announce(
            names,
            routable,
            core.executor.max_workers if accepts else 0,
            self._server.window,
            core.draining,
        )

    def _names_to_announce(self) -> tuple[list[str], list[str]]:
        """Our names and the names we route, as lists made once per change of either set.

        The sets are kept (the registry's snapshot, the router's union) until
        they change, so most announcements reuse the lists; their order is
        the sets' own, which the receiver does not care about.
        """
        core = self._core
        own = core.own_names
        routable = self._router.routable_names if core.forwarding else frozenset()
        last = self._announced
        if own is not last[0] or routable is not last[1]:
            last = self._announced = (own, routable, list(own), list(routable))
        return last[2], last[3]

    def load_changed(self) -> None:
        """Our executor's load may have changed: report it within LOAD_INTERVAL."""
        if self._load_timer is None and not self._core.closing:
            loop = self._core.running_loop()
            self._load_timer = loop.call_at(loop.time() + LOAD_INTERVAL, self._report_load)

    def _report_load(self) -> None:
        """Send peers our load (the recent peak) if it moved by more than its jitter.

        Ticks every LOAD_INTERVAL until the load rests at zero.
        """
        self._load_timer = None
        core = self._core
        if core.closing:
            return
        executor = core.executor
        router = self._router
        now = executor.busy + executor.queued
        # The peak over the last two intervals: a wave of calls that came just
        # before the tick still counts, so a busy member never reports "idle".
        peak = max(router.local_peak, now)
        load = router.local_load = max(peak, self._last_peak)
        self._last_peak = peak
        router.local_peak = now
        last = self._load_sent
        if load != last and (load == 0 or abs(load - last) > max(last >> 4, 1)):
            self._load_sent = load
            for peer in self.peers:
                link = peer.link
                if not link.closed and peer.state is not PeerState.RETIRING:
                    link.connection.send_load(load)
        if load or self._load_sent:
            self.load_changed()

    def announce(self) -> None:
        """Send every peer our current names, capacity and draining state."""
        for peer in list(self.peers):
            self.send_announce(peer)

    def retire(self, peer: Peer, reason: str) -> None:
        """Stop using a link and close it once both sides are quiet."""
        if peer.state in (PeerState.RETIRING, PeerState.CLOSED):
            return
        peer.move(PeerState.RETIRING)
        log.debug("retiring link to %r: %s", peer.node_id, reason)
        peer.send_goodbye()
        loop = self._core.running_loop()
        peer.retire_timer = loop.call_later(RETIRE_TIMEOUT, peer.link.abort, f"{reason}: timeout")
        peer.close_if_quiet(self._core.draining)
        self._router.changed()

    def drained(self) -> bool:
        for peer in self.peers:
            if peer.link.closed:
                continue
            if not peer.goodbye_received or peer.pending or peer.serving:
                return False
        return True

    def close_all(self, reason: str) -> list[asyncio.Task[None]]:
        """Fail what we wait for, cancel what we run, say goodbye, close; return the tasks."""
        tasks: list[asyncio.Task[None]] = []
        for peer in list(self.peers):
            self._sender.fail_pending(peer, reason)
            for task in peer.serving.values():
                task.cancel()
                tasks.append(task)
            peer.send_goodbye()
            peer.link.close(reason)
        return tasks

    def goodbye_all(self, reason: str) -> None:
        for peer in list(self.peers):
            peer.send_goodbye()
            peer.link.close(reason)
