"""One authenticated link as the broker sees it: its lifecycle and its views.

A :class:`Peer` moves through the states of :class:`PeerState` along the
arrows of ``TRANSITIONS`` only::

    CONNECTED --ANNOUNCE--> ACTIVE <--ANNOUNCE--> DRAINING
        \\                     |                    |
         \\____________________v____________________v
                            RETIRING  (we stopped using it; closes when quiet)
    every state --link lost--> CLOSED

Calls are routed to ACTIVE peers only. The goodbye exchange (each side
promising the other no new calls) is two flags beside the state, because it
runs in both directions independently of it.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Final

from patio.proto.messages import ErrorKind
from patio.transport import Link


class PeerState(enum.Enum):
    CONNECTED = "connected"  # authenticated; its first ANNOUNCE has not arrived
    ACTIVE = "active"  # announced and routable
    DRAINING = "draining"  # the peer announced it drains: no new calls go to it
    RETIRING = "retiring"  # we stopped using the link; it closes once both sides are quiet
    CLOSED = "closed"  # the link is gone


_S = PeerState
TRANSITIONS: Final[dict[PeerState, frozenset[PeerState]]] = {
    _S.CONNECTED: frozenset({_S.ACTIVE, _S.DRAINING, _S.RETIRING, _S.CLOSED}),
    _S.ACTIVE: frozenset({_S.DRAINING, _S.RETIRING, _S.CLOSED}),
    _S.DRAINING: frozenset({_S.ACTIVE, _S.RETIRING, _S.CLOSED}),
    _S.RETIRING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class Peer:
    """Broker-side state of one authenticated link.

    The link table owns the lifecycle fields; the call sender alone touches
    ``pending``; the server alone touches ``serving`` and the
    sets and timers beside it.
    """

    __slots__ = (
        "call_bytes",
        "cancelled",
        "capacity",
        "deadlines",
        "expired",
        "goodbye_received",
        "goodbye_sent",
        "instance",
        "link",
        "load",
        "load_base",
        "names",
        "node_id",
        "pending",
        "read_paused",
        "retire_timer",
        "routable",
        "serving",
        "state",
        "window",
    )

    def __init__(self, link: Link, node_id: str, instance: str) -> None:
        self.link = link
        self.node_id = node_id
        self.instance = instance
        self.state = PeerState.CONNECTED
        self.names: frozenset[str] = frozenset()
        self.routable: frozenset[str] = frozenset()
        self.capacity = 0
        self.window = 0
        # The peer's own load figure (LOAD), and our calls in flight to it when
        # that figure arrived: routing adds the calls we sent it since.
        self.load = 0
        self.load_base = 0
        self.goodbye_sent = False
        self.goodbye_received = False
        self.read_paused = False
        self.retire_timer: asyncio.TimerHandle | None = None
        #: calls sent on this link and not answered yet: call id -> its answer
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.serving: dict[int, asyncio.Task[None]] = {}
        #: bytes of the arguments of the calls in ``serving`` (the byte budget)
        self.call_bytes = 0
        self.cancelled: set[int] = set()
        self.expired: set[int] = set()
        self.deadlines: dict[int, asyncio.TimerHandle] = {}

    def move(self, state: PeerState) -> None:
        """Change state along an allowed arrow (staying put is always allowed)."""
        if state is self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"peer {self.node_id}: no transition {self.state} -> {state}")
        self.state = state

    @property
    def routing(self) -> bool:
        return self.state is PeerState.ACTIVE and not self.link.closed

    @property
    def announced(self) -> bool:
        return self.state is not PeerState.CONNECTED

    def send_goodbye(self) -> None:
        """Promise the peer we send it no new calls on this link."""
        link = self.link
        if self.goodbye_sent or link.closed:
            return
        self.goodbye_sent = True
        link.connection.send_goodbye("no more calls")

    def reply_error(self, call_id: int, kind: ErrorKind | int, text: str | bytes) -> None:
        link = self.link
        if link.closed:
            return
        payload = text if isinstance(text, bytes) else text.encode()
        link.connection.send_error(call_id, kind, payload)

    def close_if_quiet(self, broker_draining: bool) -> None:
        """Close a retired (or drained) link once both goodbyes crossed and no call is left."""
        if (
            (self.state is PeerState.RETIRING or broker_draining)
            and self.goodbye_sent
            and self.goodbye_received
            and not self.pending
            and not self.serving
        ):
            self.link.close("link retired")


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


@dataclass(frozen=True, slots=True)
class LinkView:
    """A read-only snapshot of one authenticated link, for tests and diagnostics.

    ``link`` is the live :class:`~patio.transport.Link` (tests abort it to
    simulate a network failure); the counts are taken when the view is made.
    """

    node_id: str
    instance: str
    state: PeerState
    link: Link
    names: frozenset[str]
    pending: int
    serving: int
    cancelled: int
    expired: int
    deadlines: int
    read_paused: bool

    @classmethod
    def of(cls, peer: Peer) -> LinkView:
        return cls(
            peer.node_id,
            peer.instance,
            peer.state,
            peer.link,
            peer.names,
            len(peer.pending),
            len(peer.serving),
            len(peer.cancelled),
            len(peer.expired),
            len(peer.deadlines),
            peer.read_paused,
        )
