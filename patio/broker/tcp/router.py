"""Routing: which peer (or this broker's own executor) a call goes to.

A call goes to the routable peer serving its name with the lowest load
relative to its capacity, ties broken at random; a peer whose window is full
is skipped. With more than SAMPLE_ABOVE such peers, the better of two picked
at random. A peer's load is the figure it last reported (LOAD) plus the
calls we sent it since, and never less than our calls in flight to it. Our
own executor, when it serves the name, keeps the call unless the best peer
is clearly less loaded (see :func:`local_keeps`): a forwarded call costs a
hop, so equal loads must not make calls cross the mesh.

When no peer can take the call, the reason decides what happens (see
:meth:`Router.wait`): wait for room, wait briefly for peers still
connecting, or fail at once because the answer is already known.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import random
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

from patio.broker.tcp.core import BrokerCore
from patio.broker.tcp.peer import Peer
from patio.errors import CallTimeoutError, NoRouteError, PeerConnectionError, PeersUnreachableError


class _Local:
    """Marker for "run it on this broker's own executor"."""

    def __repr__(self) -> str:
        return "LOCAL"


LOCAL: Final = _Local()
Target = Peer | _Local


class Reach(enum.Enum):
    """What the dialer knows of the addresses it keeps connections to."""

    REACHED = "reached"  # every target is connected (or there are none)
    CONNECTING = "connecting"  # some target has not finished its first attempt
    UNREACHABLE = "unreachable"  # some target is down; none is still connecting


class NoPeer(enum.Enum):
    """Why no peer was chosen for a name."""

    SATURATED = "saturated"  # peers serve it, all at their window: wait for room
    WAITING = "waiting"  # peers are still connecting or announcing: wait briefly
    UNREACHABLE = "unreachable"  # the peers that might serve it refuse connections
    NONE = "none"  # every peer is connected and announced; none serves it


# Our executor keeps a call unless its load exceeds the best peer's (scaled to
# our capacity) by this factor plus LOCAL_MARGIN calls: equal loads and their
# jitter stay local, a member twice as loaded hands calls to the other.
LOCAL_FACTOR: Final = 1.25
LOCAL_MARGIN: Final = 2


def local_keeps(local_load: int, max_workers: int, peer_score: float) -> bool:
    """Whether our executor, with ``local_load`` calls, keeps a call the best peer scores
    ``peer_score`` for (its load per unit of capacity)."""
    return local_load <= peer_score * max_workers * LOCAL_FACTOR + LOCAL_MARGIN


# Past this many peers serving a name, a call looks at two of them picked at
# random instead of all (the "power of two choices"): scanning costs ~0.12 µs
# per peer, 234 µs a call with 2,000 peers, while the better of two random
# picks already keeps the most loaded peer within a small margin of the mean.
SAMPLE_ABOVE: Final = 8

#: Names a NoRouteError lists of those the connected peers serve (then a count).
NAMES_SHOWN: Final = 10


def _two_of(candidates: list[Peer]) -> list[Peer]:
    count = len(candidates)
    rand = random.random
    return [candidates[int(rand() * count)], candidates[int(rand() * count)]]


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Router:
    def __init__(self, core: BrokerCore, peers: Mapping[str, Peer]) -> None:
        self._core = core
        self._peers = peers  # node id -> the peer's link in use, owned by the link table
        self._reach: Callable[[], Reach] = lambda: Reach.REACHED
        self._unreachable: Callable[[], list[tuple[str, str]]] = list
        self._routable_changed: Callable[[], None] = lambda: None
        #: told when our executor's load may have changed (the link table reports it)
        self.load_changed: Callable[[], None] = lambda: None
        # Our executor's load as peers see it: the peak over the last report
        # intervals (``local_load``, what LOAD carries) and over the current one.
        # Calls often come in waves (a closed loop of callers), so a sample at
        # one instant says little; peaks compare like with like on both sides.
        self.local_load = 0
        self.local_peak = 0
        self._routes: dict[str, list[Peer]] = {}
        # What NoRouteError says the peers serve, made once per routing change.
        self._served_summary: str | None = None
        self._route_waiters: list[asyncio.Future[None]] = []
        self.capacity_waiters: deque[asyncio.Future[None]] = deque()
        self.routable_names: frozenset[str] = frozenset()
        # The calls of outside callers are forwarded by mesh members; members
        # themselves already chose the best peer, so their calls never are.
        self.route_flag = not core.forwarding

    def bind(
        self,
        *,
        reach: Callable[[], Reach],
        unreachable: Callable[[], list[tuple[str, str]]],
        routable_changed: Callable[[], None],
        load_changed: Callable[[], None],
    ) -> None:
        """Connect the questions routing asks the dialer, whom to tell of new names and load."""
        self._reach = reach
        self._unreachable = unreachable
        self._routable_changed = routable_changed
        self.load_changed = load_changed

    # -- what changed ------------------------------------------------------------

    def changed(self) -> None:
        """Peers, names or states changed: forget cached routes, wake waiting calls."""
        self._routes.clear()
        self._served_summary = None
        core = self._core
        if core.forwarding and not core.closing:
            routable = frozenset().union(*(p.names for p in self._peers.values() if p.routing))
            routable -= core.own_names
            if routable != self.routable_names:
                self.routable_names = routable
                self._routable_changed()
        self.wake()

    def wake(self) -> None:
        waiters, self._route_waiters = self._route_waiters, []
        for waiter in waiters:
            _resolve(waiter)
        while self.capacity_waiters:
            _resolve(self.capacity_waiters.popleft())

    def wake_one(self) -> None:
        """A call finished: let one call waiting for room try again."""
        waiters = self.capacity_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait_for_change(self, until: float) -> None:
        """Wait until routing changes or the loop time ``until``."""
        loop = self._core.running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._route_waiters.append(waiter)
        handle = loop.call_at(until, _resolve, waiter)
        try:
            await waiter
        finally:
            handle.cancel()

    # -- choosing ------------------------------------------------------------------

    def candidates(self, name: str) -> list[Peer]:
        peers = self._routes.get(name)
        if peers is None:
            use_routable = self.route_flag
            peers = [
                p
                for p in self._peers.values()
                if p.routing and (name in p.names or (use_routable and name in p.routable))
            ]
            if peers:  # names nobody serves are not kept: a peer can send any number
                self._routes[name] = peers
        return peers

    def known(self, name: str) -> bool:
        """Whether ``name`` is served here or routable to a peer (else counted as other)."""
        core = self._core  # (not own_names: two properties per served call)
        return (
            core.executor.accepts_calls and name in core.registry
        ) or name in self.routable_names

    def choose(self, name: str, exclude: set[str] | None) -> Target | None:
        candidates = self._routes.get(name) or self.candidates(name)  # cached: no call
        best = self._best(
            _two_of(candidates) if len(candidates) > SAMPLE_ABOVE else candidates, exclude
        )
        if best[0] is None and len(candidates) > SAMPLE_ABOVE:
            best = self._best(candidates, exclude)  # both picks full or excluded: look at all
        peer, best_score = best
        core = self._core
        if (  # our own executor serves it (a mesh member): inline, asked on every call
            core.local_execution
            and not core.draining
            and core.executor.accepts_calls
            and name in core.registry
        ):
            executor = core.executor
            load = executor.busy + executor.queued
            self.local_peak = max(self.local_peak, load)
            if core.prefer_local and executor.busy < executor.max_workers:
                return LOCAL
            load = max(load, self.local_load)
            if peer is None or local_keeps(load, executor.max_workers, best_score):
                return LOCAL
        return peer

    @staticmethod
    def _best(candidates: list[Peer], exclude: set[str] | None) -> tuple[Peer | None, float]:
        """The least loaded of ``candidates`` with room (ties at random), and its score."""
        best: Peer | None = None
        best_score = float("inf")
        ties = 0
        for peer in candidates:
            if exclude is not None and peer.node_id in exclude:
                continue
            in_flight = len(peer.pending)
            if in_flight >= peer.window:
                continue
            # Its last report plus what we sent since; never below our own calls there.
            load = peer.load + in_flight - peer.load_base
            score = (load if load > in_flight else in_flight) / (peer.capacity or 1)
            if score < best_score:
                best, best_score, ties = peer, score, 1
            elif score == best_score:
                ties += 1
                if random.random() * ties < 1.0:
                    best = peer
        return best, best_score

    def why_none(self, name: str, exclude: set[str] | None) -> NoPeer:
        """Why :meth:`choose` found nobody for ``name``."""
        if any(exclude is None or p.node_id not in exclude for p in self.candidates(name)):
            return NoPeer.SATURATED
        # A retry waits: the peer we lost may come back.
        if exclude or any(not p.announced for p in self._peers.values()):
            return NoPeer.WAITING
        reach = self._reach()
        if reach is Reach.REACHED:
            # With nobody connected yet (a server with no clients) there is no answer yet.
            return NoPeer.NONE if self._peers else NoPeer.WAITING
        return NoPeer.WAITING if reach is Reach.CONNECTING else NoPeer.UNREACHABLE

    def no_route(self, name: str) -> NoRouteError:
        summary = self._served_summary
        if summary is None:
            # Once per routing change, never sorted: peers may announce
            # 100,000 names each and a caller may hit this in a loop.
            serving = frozenset().union(*(p.names for p in self._peers.values()))
            shown = ", ".join(heapq.nsmallest(NAMES_SHOWN, serving))
            more = len(serving) - NAMES_SHOWN
            summary = self._served_summary = (
                f"; they serve: {shown}" + (f" and {more} more" if more > 0 else "")
                if serving
                else ""
            )
        return NoRouteError(
            f"no peer serves task {name!r} ({len(self._peers)} peer(s) connected{summary})"
        )

    def _gave_up(self, name: str, why: NoPeer, *, timed_out: bool = False) -> Exception:
        if why is NoPeer.SATURATED:
            return CallTimeoutError(
                f"call to {name!r} timed out waiting for a peer with free capacity"
            )
        if why is NoPeer.WAITING and timed_out and self._unreachable():
            # The call's own deadline came while the peers that might serve it were down.
            missing = "; ".join(f"{address} ({error})" for address, error in self._unreachable())
            return CallTimeoutError(f"call to {name!r} timed out waiting for a peer: {missing}")
        # Waiting ran out while peers were down or reconnecting (say the only
        # peer of a retried call died): that is a connection failure naming
        # them, not a "nobody serves it" that no connected member has said.
        down = self._unreachable() if why in (NoPeer.UNREACHABLE, NoPeer.WAITING) else []
        if why is NoPeer.UNREACHABLE or down:
            served = "no connected peer serves it and " if self._peers else ""
            return PeersUnreachableError(
                f"call to {name!r} failed: {served}every other known peer is unreachable: "
                + "; ".join(f"{address} ({error})" for address, error in down)
                + ". Check that they run and listen on these addresses.",
                peers=tuple(address for address, _ in down),
            )
        return self.no_route(name)

    def parking(
        self, name: str, deadline: float | None, exclude: set[str] | None
    ) -> asyncio.Future[None] | None:
        """A plain future to wait on for room, when :meth:`choose` found nobody because
        every peer serving ``name`` is at its window (and the call has no deadline
        and is no retry); None when the call should :meth:`wait` instead.

        The caller awaits it in its own frame, so a flood of parked calls costs
        a future each, not a chain of coroutine frames; on an exception it
        calls :meth:`pass_on`. Then it chooses again.
        """
        if deadline is not None or exclude is not None or not self.candidates(name):
            return None
        waiter: asyncio.Future[None] = self._core.running_loop().create_future()
        self.capacity_waiters.append(waiter)
        return waiter

    def pass_on(self, waiter: asyncio.Future[None]) -> None:
        """A parked call was cancelled: hand on the room it may have been given."""
        if waiter.done() and not waiter.cancelled():
            self.wake_one()

    async def wait(self, name: str, deadline: float | None, exclude: set[str] | None) -> Target:
        """A peer for ``name``, waiting as long as the reason for having none allows.

        Saturated peers are waited for until the call's deadline; peers still
        connecting for ``route_wait`` seconds at most; when the answer is known
        (nobody serves the name, or every peer that might is down) it fails at once.
        """
        core = self._core
        loop = core.running_loop()
        route_limit = loop.time() + core.route_wait
        while True:
            target = self.choose(name, exclude)
            if target is None and exclude:
                target = self.choose(name, None)
            if target is not None:
                return target
            if core.closing:
                raise PeerConnectionError("broker is closed")
            why = self.why_none(name, exclude)
            if why in (NoPeer.NONE, NoPeer.UNREACHABLE):
                raise self._gave_up(name, why)
            if why is NoPeer.SATURATED:
                limit = deadline
                waiters: deque[asyncio.Future[None]] | list[asyncio.Future[None]]
                waiters = self.capacity_waiters
            else:
                limit = route_limit if deadline is None else min(route_limit, deadline)
                waiters = self._route_waiters
            if limit is not None and loop.time() >= limit:
                timed_out = deadline is not None and loop.time() >= deadline
                raise self._gave_up(name, why, timed_out=timed_out)
            waiter: asyncio.Future[None] = loop.create_future()
            waiters.append(waiter)
            handle = loop.call_at(limit, _resolve, waiter) if limit is not None else None
            try:
                await waiter
            except BaseException:
                if why is NoPeer.SATURATED and waiter.done() and not waiter.cancelled():
                    self.wake_one()  # pass on the room we were given
                raise
            finally:
                if handle is not None:
                    handle.cancel()
