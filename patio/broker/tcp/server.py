"""Serving calls: the executing side, and forwarding for mesh members.

Each CALL from a peer becomes a task that runs it on this broker's executor,
or (a mesh member serving an outside caller) forwards it to the best member,
one hop at most, its bytes passing through untouched. What a peer may have
outstanding here is bounded twice: in calls by the window we announce, and
in argument bytes by a per-peer budget. Past either we stop reading that
peer until half of it is free again. A call's arguments stay the bytes they
came as until the executor gives it a slot (see docs/broker-design.md).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from patio.broker.tcp.codec import (
    FRAME_OVERHEAD,
    ErrorReply,
    LinkLost,
    describe_error,
    pack_value,
    rule_for,
)
from patio.broker.tcp.core import BrokerCore
from patio.broker.tcp.peer import Peer, PeerState
from patio.broker.tcp.router import LOCAL, Router, Target, _Local
from patio.broker.tcp.sender import CallSender
from patio.errors import CallTimeoutError, SerializationError
from patio.executor import AbstractExecutor
from patio.proto.messages import Call, ErrorKind
from patio.stats import (
    OTHER_NAME,
    OUTCOME_CANCELLED,
    OUTCOME_ERROR,
    OUTCOME_OK,
    OUTCOME_TIMEOUT,
    SIDE_EXECUTOR,
    SIDE_FORWARDER,
)
from patio.transport import RateLimitedLog

log = logging.getLogger("patio.broker")

# Calls a peer may have outstanding on one link: at least this many, else
# twice its capacity, so the pipe stays full while the executor queue is short.
MIN_WINDOW: Final = 1024
#: Argument bytes of the calls one peer may have outstanding here before we
#: stop reading its link (``max_peer_call_bytes=``): the window alone lets a
#: link make us hold 1,024 calls of 16 MiB each.
DEFAULT_MAX_PEER_CALL_BYTES: Final = 64 * 1024 * 1024
# One WARNING per failing task per this many seconds (TaskErrorLog).
TASK_ERROR_LOG_INTERVAL: Final = 10.0
MAX_LOGGED_MESSAGE: Final = 500


def call_window(executor: AbstractExecutor) -> int:
    """The calls we let one peer have running here at once (announced to it)."""
    return max(2 * executor.max_workers, MIN_WINDOW)


class TaskErrorLog:
    """A task that raises is logged at WARNING: at most once per task per interval.

    A task failing on every call (a bad deploy, a database down) must show in
    the log at once, and must not flood it; the next line says how many more
    failed in between.
    """

    def __init__(
        self, interval: float = TASK_ERROR_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def report(self, name: str, exc: BaseException, caller: str) -> None:
        now = self._clock()
        last = self._last.get(name)
        if last is not None and now - last < self.interval:
            self._since[name] = self._since.get(name, 0) + 1
            return
        self._last[name] = now
        more = self._since.pop(name, 0)
        try:
            text = str(exc)
        except Exception:  # a task's exception may not even print; the log must not fail
            text = "(its message cannot be printed)"
        if len(text) > MAX_LOGGED_MESSAGE:
            text = text[: MAX_LOGGED_MESSAGE - 3] + "..."
        log.warning(
            "task %r raised %s: %s (call from %r)%s",
            name,
            type(exc).__name__,
            text,
            caller,
            f"; {more} more failure{'s' if more != 1 else ''} of it in the last {now - last:.0f}s"
            if more and last is not None
            else "",
        )


if sys.version_info >= (3, 12):

    def start_task(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None]:
        """A task whose first step runs now, inline, up to its first suspension.

        A served call that never suspends (most do not) then completes inside
        the read that brought it: no loop turn, no scheduling, and its reply
        leaves with that read's flush. As a real task from its first line, so
        ``asyncio.current_task()`` and ``asyncio.timeout()`` work in the call.
        A loop with its own task factory gets its tasks made by that factory.
        """
        if loop.get_task_factory() is None:
            return asyncio.Task(coro, loop=loop, eager_start=True)
        return loop.create_task(coro)

else:

    def start_task(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None]:
        """Python 3.11 has no eager start: the task's first step runs next loop turn."""
        return loop.create_task(coro)


def _started(task: asyncio.Task[None]) -> bool:
    return inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED  # type: ignore[arg-type]


class Server:
    def __init__(
        self,
        core: BrokerCore,
        router: Router,
        sender: CallSender,
        max_peer_call_bytes: int = DEFAULT_MAX_PEER_CALL_BYTES,
    ) -> None:
        self._core = core
        self._router = router
        self._sender = sender
        #: the calls we let one peer have running here at once (announced to
        #: it); the executor's size is fixed once it exists
        self.window = call_window(core.executor)
        #: argument bytes one peer may have outstanding before we stop reading it
        self.max_peer_call_bytes = max_peer_call_bytes
        self.task_errors = TaskErrorLog()
        self.over_window_log = RateLimitedLog(log)

    # -- messages, from the link table ------------------------------------------------

    def on_call(self, peer: Peer, call: Call) -> None:
        _, call_id, name, payload, timeout, route = call
        core = self._core
        loop = core.running_loop()
        if timeout is not None and timeout <= 0:
            peer.reply_error(call_id, ErrorKind.TIMEOUT, "deadline passed before start")
            counted = name if self._router.known(name) else OTHER_NAME
            core.stats.calls_finished[(counted, SIDE_EXECUTOR, OUTCOME_TIMEOUT)] += 1
            return
        if call_id in peer.serving:
            core.stats.frames_rejected["malformed"] += 1
            log.warning(
                "closing connection with %r: it reused call id %d while that call runs",
                peer.node_id,
                call_id,
            )
            peer.link.abort(f"peer reused call id {call_id} while it was in flight")
            return
        if len(peer.serving) - len(peer.cancelled) >= self.window:
            self._refuse_over_window(peer, call_id)
            return
        deadline = None if timeout is None else loop.time() + timeout
        # Counted before the task starts: an eager one may finish (and uncount) at once.
        peer.call_bytes += len(payload)
        task = start_task(loop, self._serve(peer, call_id, name, payload, deadline, route))
        if task.done():  # started eagerly (3.12+) and already answered
            return
        peer.serving[call_id] = task
        if peer.link.closed:  # lost while the first step ran, after cancel_all
            self.on_cancel(peer, call_id)
        self._router.load_changed()
        if deadline is not None:
            # A timer handle, cheaper than an asyncio.timeout scope per call.
            peer.deadlines[call_id] = loop.call_at(deadline, self._expire, peer, call_id)
        if not peer.read_paused and (
            len(peer.serving) >= self.window or peer.call_bytes > self.max_peer_call_bytes
        ):
            # Back-pressure, as HTTP/2 flow control gives: the peer's bytes
            # wait in its socket and its own buffers, not in our memory.
            peer.read_paused = True
            peer.link.pause_reading()
            core.stats.reads_paused["window" if len(peer.serving) >= self.window else "bytes"] += 1

    def _refuse_over_window(self, peer: Peer, call_id: int) -> None:
        """Refuse a call past the window we granted ``peer``; the link stays up.

        A patio caller never sends one: it counts its calls in flight to us
        (a call it cancelled, that runs on here, is not counted on either
        side). Reading pauses once the window is full, so only the rest of
        the chunk that filled it can get here.
        """
        self._core.stats.frames_rejected["over_window"] += 1
        text = f"more than {self.window} calls at once, the window this member granted"
        self.over_window_log.warn(
            repr(peer.node_id), "over_window", f"refusing calls from {peer.node_id!r}: {text}"
        )
        peer.reply_error(call_id, ErrorKind.OVERLOADED, text)

    @staticmethod
    def on_cancel(peer: Peer, call_id: int) -> None:
        """Cancel a call we execute for ``peer``; the caller wants no reply.

        A task cancelled before its first step never runs its own ``finally``,
        so one that has not started is not cancelled: it sees the mark at its
        start, does its bookkeeping and returns.
        """
        task = peer.serving.get(call_id)
        if task is None:
            return
        peer.cancelled.add(call_id)
        if _started(task):
            task.cancel()

    def cancel_all(self, peer: Peer) -> None:
        for call_id in list(peer.serving):
            self.on_cancel(peer, call_id)

    def running(self, peer: Peer) -> list[asyncio.Task[None]]:
        return list(peer.serving.values())

    @staticmethod
    def _expire(peer: Peer, call_id: int) -> None:
        """The deadline of a call we execute passed: stop it and answer TIMEOUT."""
        peer.deadlines.pop(call_id, None)
        task = peer.serving.get(call_id)
        if task is None:
            return
        peer.expired.add(call_id)
        if _started(task):
            task.cancel()

    # -- running a call -----------------------------------------------------------

    async def _serve(
        self,
        peer: Peer,
        call_id: int,
        name: str,
        payload: bytes,
        deadline: float | None,
        route: bool,
    ) -> None:
        core = self._core
        stats = core.stats
        # An outside caller's call that a member hands on is counted as
        # forwarded, not executed, so summing executions over members is exact.
        target: Target | None = LOCAL
        if route and core.forwarding:
            target = self._router.choose(name, {peer.node_id})
        side = SIDE_EXECUTOR if target is LOCAL else SIDE_FORWARDER
        counted = name if self._router.known(name) else OTHER_NAME
        stats.calls_started[(counted, side)] += 1
        # Timed only for an observer or the debug log (perf_counter, not
        # loop.time(): 1 ms resolution under uvloop).
        timed = stats.call_observer is not None or log.isEnabledFor(logging.DEBUG)
        started = time.perf_counter() if timed else 0.0
        outcome = OUTCOME_ERROR
        link = peer.link
        try:
            if peer.cancelled and call_id in peer.cancelled:
                outcome = OUTCOME_CANCELLED
                return
            if peer.expired and call_id in peer.expired:
                raise asyncio.CancelledError  # expired before it started: answered below
            if target is not LOCAL:
                reply = await self.forward(peer, name, payload, deadline, target)
            else:
                reply = await self.run(name, payload)
            if not link.closed:
                link.connection.send_result(call_id, reply)
            outcome = OUTCOME_OK
        except (Exception, asyncio.CancelledError) as exc:
            # The task ends here either way: a cancellation is answered, not re-raised.
            outcome = self._reply_failure(peer, call_id, name, exc)
        finally:
            self._served(peer, call_id, deadline, len(payload))
            stats.calls_finished[(counted, side, outcome)] += 1
            if timed:
                self._log_served(peer, name, counted, side, outcome, time.perf_counter() - started)

    def _log_served(
        self, peer: Peer, name: str, counted: str, side: str, outcome: str, seconds: float
    ) -> None:
        """Report a served call's duration to the observer and the debug log."""
        observer = self._core.stats.call_observer
        if observer is not None:
            observer(counted, side, outcome, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "call %r from %r: %s in %.3f ms%s",
                name,
                peer.node_id,
                outcome,
                seconds * 1000,
                "" if side == SIDE_EXECUTOR else " (forwarded)",
            )

    def _reply_failure(self, peer: Peer, call_id: int, name: str, exc: BaseException) -> str:
        """Answer ERROR for a call that failed here; return its outcome."""
        core = self._core
        if isinstance(exc, ErrorReply):  # a forwarded call's answer: relayed as it came
            peer.reply_error(call_id, exc.kind, exc.payload)
            return OUTCOME_ERROR
        if isinstance(exc, asyncio.CancelledError):
            if call_id in peer.expired:
                text = f"call to {name!r} passed its deadline"
                peer.reply_error(call_id, ErrorKind.TIMEOUT, text)
                return OUTCOME_TIMEOUT
            if call_id not in peer.cancelled:  # cancelled here, not by the caller
                peer.reply_error(call_id, ErrorKind.CANCELLED, "cancelled by the executor")
            return OUTCOME_CANCELLED
        rule = rule_for(exc)
        if rule is None:  # the task's own exception
            self.task_errors.report(name, exc, peer.node_id)
            max_size = core.link_settings.max_frame_size
            description = describe_error(exc, core.serializer, max_size)
            peer.reply_error(call_id, ErrorKind.EXCEPTION, description)
            return OUTCOME_ERROR
        text = f"{exc} (on {core.node_id})" if rule.names_node else str(exc)
        peer.reply_error(call_id, rule.kind, text)
        return rule.outcome

    def _served(self, peer: Peer, call_id: int, deadline: float | None, size: int) -> None:
        peer.serving.pop(call_id, None)
        peer.call_bytes -= size
        if deadline is not None:
            handle = peer.deadlines.pop(call_id, None)
            if handle is not None:
                handle.cancel()
            peer.expired.discard(call_id)
        peer.cancelled.discard(call_id)
        if (
            peer.read_paused
            and len(peer.serving) <= self.window // 2
            and peer.call_bytes <= self.max_peer_call_bytes // 2
        ):
            peer.read_paused = False
            peer.link.resume_reading()
        if peer.state is PeerState.RETIRING or self._core.draining:
            peer.close_if_quiet(self._core.draining)

    async def forward(
        self,
        origin: Peer,
        name: str,
        payload: bytes,
        deadline: float | None,
        target: Target | None,
    ) -> bytes:
        """Hand an outside caller's call to the best member; bytes pass through as they are."""
        if target is None:
            target = await self._router.wait(name, deadline, {origin.node_id})
        if isinstance(target, _Local):
            return await self.run(name, payload)
        self._core.stats.calls_forwarded += 1
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                return await self._sender.send(target, name, payload, deadline, None)
        except TimeoutError:
            if scope.expired():
                raise CallTimeoutError(f"forwarded call to {name!r} passed its deadline") from None
            raise
        except LinkLost as exc:
            raise LinkLost(
                f"call to {name!r} failed: {self._core.node_id} forwarded it and lost its "
                f"connection to {target.node_id} ({exc.reason})"
            ) from None

    async def run(self, name: str, payload: bytes) -> bytes:
        """Run the call on our executor, decoding its arguments once it has a slot.

        Until then a waiting call holds only its bytes (counted against the
        peer's budget): decoded, a megabyte of msgpack can be 70 times that.
        """
        core = self._core
        serializer = core.serializer
        observer = core.stats.queue_observer
        # Time from arrival to the moment the call has a slot and starts.
        arrived = time.perf_counter() if observer is not None else 0.0

        def arguments() -> Any:
            if observer is not None:
                observer(name, time.perf_counter() - arrived)
            try:
                args, kwargs = serializer.unpack(payload)
            except (SerializationError, TypeError, ValueError) as exc:
                raise SerializationError(
                    f"arguments of {name!r} could not be decoded: {exc}"
                ) from None
            return args, kwargs

        result = await core.executor.execute_deferred(name, arguments)
        data = pack_value(core.serializer, name, result, "result")
        max_frame_size = core.link_settings.max_frame_size
        if len(data) + FRAME_OVERHEAD > max_frame_size:
            raise SerializationError(
                f"result of {name!r} takes {len(data)} bytes, over the frame limit of "
                f"{max_frame_size} bytes"
            )
        return data
