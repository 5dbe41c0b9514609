"""Mesh status over the mesh protocol: what ``patio status`` shows.

A STATUS request with ``gather`` set goes to one member (the entry member).
That member asks every mesh member it has a link to with ``gather`` unset,
waits up to :data:`GATHER_TIMEOUT` for their answers, and replies with one
map per member: its own, those that answered, and an ``error`` entry for
each member it knows that is not connected or did not answer in time. A
request without ``gather`` is answered with the receiver's own map only, so
a request fans out one level and never loops.

Both messages travel only on authenticated links. A member's map holds
broker facts (no user data); what arrives from a peer is reduced to the
known keys with the expected types before it is passed on or shown.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from patio.broker.tcp.core import BrokerCore
from patio.broker.tcp.peer import Peer
from patio.stats import OUTCOME_OK, SIDE_EXECUTOR
from patio.version import __version__

log = logging.getLogger("patio.broker")

# How long the entry member waits for the others' answers: long enough for a
# busy member on another node, short enough for a command someone waits on.
GATHER_TIMEOUT: Final = 2.0
# Gathers one broker runs at once: each fans out to every member, so a peer
# looping on requests must not multiply the mesh's traffic.
MAX_GATHERS: Final = 4
# Task names listed per member: a status line, not a registry dump.
MAX_TASKS_SHOWN: Final = 1000

# The keys of a member's map and the types they may have.
FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "node_id": (str,),
    "addresses": (list,),
    "version": (str,),
    "uptime": (int, float),
    "executor": (str,),
    "busy": (int,),
    "capacity": (int,),
    "queued": (int,),
    "served": (int,),
    "failed": (int,),
    "links_up": (int,),
    "links_known": (int,),
    "tasks": (list,),
    "draining": (bool,),
    "error": (str,),
}


def clean_member(raw: Any) -> dict[str, Any] | None:
    """The known, well-typed fields of a member's map from a peer, or None."""
    if type(raw) is not dict or type(raw.get("node_id")) is not str:
        return None
    member: dict[str, Any] = {}
    for key, types in FIELDS.items():
        value = raw.get(key)
        if type(value) in types and not (type(value) is bool and bool not in types):
            if isinstance(value, list):
                value = [str(item) for item in value[:MAX_TASKS_SHOWN] if type(item) is str]
            member[key] = value
    return member


class StatusDesk:
    """Answers STATUS requests and gathers the mesh's answers for the entry member."""

    def __init__(
        self,
        core: BrokerCore,
        by_node: dict[str, Peer],
        links: Callable[[], tuple[int, int, list[tuple[str, str]]]],
        addresses: Callable[[], list[str]],
    ) -> None:
        self._core = core
        self._by_node = by_node
        #: (links up, links known, [(node or address, why missing)]) from membership
        self._links = links
        self._addresses = addresses
        self.started = time.monotonic()
        self._next_id = 0
        self._waiting: dict[Peer, dict[int, asyncio.Future[list[Any]]]] = {}
        self._gathers = 0

    def own(self) -> dict[str, Any]:
        core = self._core
        executor = core.executor
        up, known, _ = self._links()
        served = failed = 0
        for (_, side, outcome), count in core.stats.calls_finished.items():
            if side == SIDE_EXECUTOR:
                served += count
                if outcome != OUTCOME_OK:
                    failed += count
        accepts = executor.accepts_calls
        return {
            "node_id": core.node_id,
            "addresses": self._addresses(),
            "version": __version__,
            "uptime": round(time.monotonic() - self.started, 3),
            "executor": type(executor).__name__,
            "busy": executor.busy if accepts else 0,
            "capacity": executor.max_workers if accepts else 0,
            "queued": executor.queued if accepts else 0,
            "served": served,
            "failed": failed,
            "links_up": up,
            "links_known": known,
            # The first names in order without sorting them all: any key
            # holder may ask, and a registry may hold 100,000.
            "tasks": heapq.nsmallest(MAX_TASKS_SHOWN, core.own_names),
            "draining": core.draining,
        }

    # -- asking ---------------------------------------------------------------

    async def ask(self, peer: Peer, gather: bool, timeout: float) -> list[Any]:
        """Send STATUS to ``peer`` and wait for its reply's member list."""
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[list[Any]] = self._core.running_loop().create_future()
        self._waiting.setdefault(peer, {})[request_id] = future
        try:
            peer.link.connection.send_status(request_id, gather)
            peer.link.schedule_flush()
            async with asyncio.timeout(timeout):
                return await future
        finally:
            waiting = self._waiting.get(peer)
            if waiting is not None:
                waiting.pop(request_id, None)
                if not waiting:
                    del self._waiting[peer]

    def on_reply(self, peer: Peer, request_id: int, members: list[Any]) -> None:
        future = self._waiting.get(peer, {}).get(request_id)
        if future is not None and not future.done():
            future.set_result(members)

    def link_lost(self, peer: Peer, reason: str) -> None:
        for future in self._waiting.pop(peer, {}).values():
            if not future.done():
                future.set_exception(ConnectionError(reason))

    # -- answering -------------------------------------------------------------

    def on_request(self, peer: Peer, request_id: int, gather: bool) -> None:
        if gather and self._gathers < MAX_GATHERS:
            self._gathers += 1
            task = self._core.running_loop().create_task(self._gather(peer, request_id))
            task.add_done_callback(self._gather_done)
            return
        self._reply(peer, request_id, [self.own()])

    def _gather_done(self, task: asyncio.Task[None]) -> None:
        self._gathers -= 1
        if not task.cancelled() and task.exception() is not None:
            log.warning("status gather failed: %r", task.exception())

    async def _gather(self, asker: Peer, request_id: int) -> None:
        others = [
            peer for peer in self._by_node.values() if peer is not asker and not peer.link.closed
        ]
        answers = await asyncio.gather(
            *(self.ask(peer, False, GATHER_TIMEOUT) for peer in others), return_exceptions=True
        )
        members = [self.own()]
        answered: set[str] = {self._core.node_id}
        for peer, answer in zip(others, answers, strict=True):
            cleaned = (
                [m for m in map(clean_member, answer) if m is not None]
                if isinstance(answer, list)
                else []
            )
            if not cleaned:
                why = (
                    f"no answer within {GATHER_TIMEOUT:g}s"
                    if isinstance(answer, TimeoutError)
                    else f"no status: {answer}"
                    if isinstance(answer, BaseException)
                    else "an empty status"
                )
                members.append({"node_id": peer.node_id, "error": why})
                answered.add(peer.node_id)
                continue
            for member in cleaned[:1]:  # a member answers for itself only
                member["node_id"] = peer.node_id  # the authenticated identity wins
                members.append(member)
                answered.add(peer.node_id)
        _, _, missing = self._links()
        for name, why in missing:
            if name not in answered:
                members.append({"node_id": name, "error": why})
        self._reply(asker, request_id, members)

    def _reply(self, peer: Peer, request_id: int, members: list[dict[str, Any]]) -> None:
        if peer.link.closed:
            return
        peer.link.connection.send_status_reply(request_id, members)
        peer.link.schedule_flush()
