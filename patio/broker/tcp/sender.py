"""Sending calls: the caller's side of a call, from routing to its result.

A call is routed (:mod:`patio.broker.tcp.router`), then either run on this
broker's own executor or sent on a peer's link, where it waits as a pending
future for RESULT, ERROR, its deadline, or the loss of the link. A call made
retryable is re-sent elsewhere when its link drops, within its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from patio.broker.base import LoopTurns
from patio.broker.tcp.codec import (
    FRAME_OVERHEAD,
    ErrorReply,
    LinkLost,
    error_from_reply,
    outcome_of,
    pack_value,
)
from patio.broker.tcp.core import BrokerCore
from patio.broker.tcp.peer import Peer, PeerState
from patio.broker.tcp.protocol import Protocol
from patio.broker.tcp.router import Router, _Local
from patio.errors import CallTimeoutError, PeerConnectionError, SerializationError
from patio.proto.messages import ErrorKind
from patio.stats import OUTCOME_ERROR, OUTCOME_OK, SIDE_CALLER

log = logging.getLogger("patio.broker")


def _not_nan(timeout: float) -> None:
    """NaN would poison the loop's timer heap (every timer would fire at once)."""
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds or None, not NaN")


def _expire(future: asyncio.Future[bytes], name: str, timeout: float | None) -> None:
    if not future.done():
        future.set_exception(CallTimeoutError(f"call to {name!r} timed out after {timeout} s"))


class CallSender:
    def __init__(self, core: BrokerCore, router: Router, protocol: Protocol) -> None:
        self._core = core
        self._router = router
        self._protocol = protocol  # its serial numbers the calls, as in patio 0.1.4
        self._turns = LoopTurns()

    async def call(
        self,
        func: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        retryable: bool | None,
    ) -> Any:
        """The whole of a call, as ``TCPBroker.call`` describes it."""
        core = self._core
        timeout, deadline = self._deadline(timeout)
        name = func if type(func) is str else core.task_name(func)
        core.stats.calls_started[(name, SIDE_CALLER)] += 1
        # Durations by perf_counter: loop.time() has 1 ms resolution under
        # uvloop, which would put every sub-millisecond call in one bucket.
        # Read only for an observer: a flood parks many of these frames, and
        # each local or float held is memory per pending call.
        clock = time.perf_counter() if core.stats.call_observer is not None else 0.0
        outcome = OUTCOME_ERROR
        payload: bytes | None = None
        tried: set[str] | None = None
        # One coroutine frame per call on the common path: routing, sending
        # and retrying live here rather than in helpers awaited in turn.
        try:
            while True:
                target = self._router.choose(name, tried)
                if target is None:
                    waiter = self._router.parking(name, deadline, tried)
                    if waiter is not None:
                        # Every peer serving it is at its window: wait in this frame.
                        try:
                            await waiter
                        except BaseException:
                            self._router.pass_on(waiter)
                            raise
                        continue
                    target = await self._router.wait(name, deadline, tried)
                if isinstance(target, _Local):
                    result = await self.execute_local(name, args, kwargs, deadline, timeout)
                    break
                if payload is None:
                    payload = pack_value(core.serializer, name, [list(args), kwargs], "arguments")
                try:
                    reply = await self.send(target, name, payload, deadline, timeout)
                except (LinkLost, ErrorReply) as exc:
                    self._retry_or_raise(exc, name, target, retryable, deadline)
                    tried = (tried or set()) | {target.node_id}
                    continue
                result = self._decode(name, reply)
                break
            outcome = OUTCOME_OK
            return result
        except BaseException as exc:
            outcome = outcome_of(exc)
            raise
        finally:
            core.stats.calls_finished[(name, SIDE_CALLER, outcome)] += 1
            observer = core.stats.call_observer
            if observer is not None and clock:
                observer(name, SIDE_CALLER, outcome, time.perf_counter() - clock)

    def _deadline(self, timeout: float | None) -> tuple[float | None, float | None]:
        """The call's timeout (None: no deadline) and its deadline by the loop's clock."""
        loop = self._core.running_loop()  # also: the broker is set up
        if timeout is None:
            return None, None
        if not timeout < math.inf:
            _not_nan(timeout)
            return None, None  # infinite: no deadline
        return timeout, loop.time() + timeout

    def _retry_or_raise(
        self,
        exc: LinkLost | ErrorReply,
        name: str,
        target: Peer,
        retryable: bool | None,
        deadline: float | None,
    ) -> None:
        """Return if the call may go to another peer; else raise what the caller sees."""
        core = self._core
        retry = retryable if retryable is not None else name in core.retryable_tasks
        if isinstance(exc, ErrorReply):
            if exc.kind != ErrorKind.CONNECTION or not retry:
                raise error_from_reply(exc, name, target.node_id, core.serializer) from None
        elif core.closing or not retry:
            raise PeerConnectionError(
                f"call to {name!r} failed: connection to {target.node_id} lost ({exc.reason})"
            ) from None
        elif deadline is not None and core.running_loop().time() >= deadline:
            raise CallTimeoutError(
                f"call to {name!r} timed out after its connection was lost"
            ) from None
        else:
            log.info("retrying %r elsewhere: connection to %r lost", name, target.node_id)
        core.stats.calls_retried += 1

    def _decode(self, name: str, reply: bytes) -> Any:
        try:
            return self._core.serializer.unpack(reply)
        except SerializationError as exc:
            raise SerializationError(f"result of {name!r} could not be decoded: {exc}") from None

    async def send(
        self,
        peer: Peer,
        name: str,
        payload: bytes,
        deadline: float | None,
        timeout: float | None,
    ) -> bytes:
        """Send one call on ``peer``'s link and wait for the raw answer."""
        loop = self._core.running_loop()
        link = peer.link
        max_frame_size = self._core.link_settings.max_frame_size
        if len(payload) + 4 * len(name) + FRAME_OVERHEAD > max_frame_size and (
            len(payload) + len(name.encode()) + FRAME_OVERHEAD > max_frame_size
        ):
            raise SerializationError(
                f"arguments of {name!r} take {len(payload)} bytes, over the frame limit of "
                f"{max_frame_size} bytes"
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
                raise LinkLost(link.close_reason or "closed")
        # The next serial, as Protocol.get_serial numbers it, without its lock:
        # only the event loop's thread numbers this broker's calls.
        protocol = self._protocol
        pending = peer.pending
        call_id = protocol.serial + 1
        while call_id >= protocol.MAX_SERIAL or call_id in pending:
            # Wrapped around (to 1), or onto a call still in flight on this link.
            call_id = 1 if call_id >= protocol.MAX_SERIAL else call_id + 1
        protocol.serial = call_id
        future: asyncio.Future[bytes] = loop.create_future()
        pending[call_id] = future
        remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
        link.connection.send_call(call_id, name, payload, remaining, self._router.route_flag)
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
                self._call_done(peer)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def execute_local(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        deadline: float | None,
        timeout: float | None,
    ) -> Any:
        if self._turns.due():
            # Calls served here may complete without ever suspending: give the
            # loop its turn now and then, or a task looping over them starves it.
            await asyncio.sleep(0)
        self._router.load_changed()
        executor = self._core.executor
        if deadline is None:
            return await executor.execute(name, *args, **kwargs)
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                return await executor.execute(name, *args, **kwargs)
        except TimeoutError:
            if scope.expired():
                raise CallTimeoutError(f"call to {name!r} timed out after {timeout} s") from None
            raise

    # -- answers, from the link table ---------------------------------------------

    def on_result(self, peer: Peer, call_id: int, payload: bytes) -> None:
        future = peer.pending.pop(call_id, None)
        if future is not None:
            if not future.done():
                future.set_result(payload)
            self._call_done(peer)

    def on_error(self, peer: Peer, call_id: int, kind: int, payload: bytes) -> None:
        future = peer.pending.pop(call_id, None)
        if future is not None:
            if not future.done():
                future.set_exception(ErrorReply(kind, payload))
            self._call_done(peer)

    def fail_pending(self, peer: Peer, reason: str) -> None:
        """The link is gone (or going): fail every call waiting on it."""
        pending, peer.pending = peer.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(LinkLost(reason))
        if pending:
            self._router.wake()

    def _call_done(self, peer: Peer) -> None:
        if self._router.capacity_waiters:
            self._router.wake_one()
        if peer.state is PeerState.RETIRING or self._core.draining:
            peer.close_if_quiet(self._core.draining)
