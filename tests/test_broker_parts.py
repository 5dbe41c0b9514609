"""The TCP broker's parts on their own: the peer lifecycle and the one error table."""

from __future__ import annotations

import asyncio

import pytest

from patio import AsyncExecutor, MemoryBroker, NullExecutor, Registry
from patio.broker import PeerState, TCPServerBroker
from patio.broker.serializer import MsgpackSerializer
from patio.broker.tcp.codec import ERROR_RULES, ErrorReply, error_from_reply, outcome_of, rule_for
from patio.broker.tcp.peer import TRANSITIONS
from patio.errors import (
    CallTimeoutError,
    ExecutionRefusedError,
    NoRouteError,
    PeerConnectionError,
    SerializationError,
    TaskNotFoundError,
)
from patio.proto import ErrorKind, MessageType
from patio.stats import (
    OUTCOME_CANCELLED,
    OUTCOME_CONNECTION,
    OUTCOME_ERROR,
    OUTCOME_NO_ROUTE,
    OUTCOME_REFUSED,
    OUTCOME_TIMEOUT,
    SIDE_CALLER,
)
from tests.test_bad_input import close_raw, handshake

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftover_tasks")]

KEY = b"bad-input-test-key"  # what tests.test_bad_input.handshake proves with


def test_every_state_can_close_and_closed_is_final() -> None:
    assert set(TRANSITIONS) == set(PeerState)
    for state, targets in TRANSITIONS.items():
        assert state is PeerState.CLOSED or PeerState.CLOSED in targets
    assert TRANSITIONS[PeerState.CLOSED] == frozenset()
    assert TRANSITIONS[PeerState.RETIRING] == {PeerState.CLOSED}  # retiring is for good
    assert PeerState.CONNECTED not in set().union(*TRANSITIONS.values())


async def test_a_peer_moves_through_its_states_as_it_announces_and_says_goodbye() -> None:
    async with AsyncExecutor(Registry()) as executor, TCPServerBroker(executor, KEY) as server:
        await server.listen("127.0.0.1", 0)
        _, writer, conn = await handshake(server.listening[0][1])

        async def state_after(*messages: list[object]) -> PeerState:
            for message in messages:
                getattr(conn, f"send_{MessageType(message[0]).name.lower()}")(*message[1:])
            writer.write(conn.data_to_send())
            await asyncio.sleep(0.1)
            (view,) = server.links()
            return view.state

        try:
            assert await state_after() is PeerState.CONNECTED  # authenticated, not announced
            announce = [MessageType.ANNOUNCE, ["t"], [], 1, 16]
            assert await state_after([*announce, False]) is PeerState.ACTIVE
            assert await state_after([*announce, True]) is PeerState.DRAINING
            assert await state_after([*announce, False]) is PeerState.ACTIVE  # drain undone
            # Goodbye: retired, and closed at once since no call is in flight either way.
            conn.send_goodbye("bye")
            writer.write(conn.data_to_send())
            for _ in range(100):
                if not server.links():
                    break
                assert server.links()[0].state in (PeerState.ACTIVE, PeerState.RETIRING)
                await asyncio.sleep(0.01)
            assert server.links() == []
        finally:
            close_raw(writer)


def test_every_error_kind_has_one_rule_and_round_trips() -> None:
    kinds = [rule.kind for rule in ERROR_RULES]
    assert len(kinds) == len(set(kinds))
    assert set(kinds) | {ErrorKind.EXCEPTION} == set(ErrorKind)
    serializer = MsgpackSerializer()
    for rule in ERROR_RULES:
        if rule.raised is not None and rule.raised is not asyncio.CancelledError:
            assert rule_for(rule.raised("x")) is rule
        rebuilt = error_from_reply(ErrorReply(rule.kind, b"text"), "task", "node", serializer)
        assert type(rebuilt) is rule.rebuilt
        # The caller counts what it raises; only a cancellation on the far side is
        # seen here as a lost connection.
        expected = OUTCOME_CONNECTION if rule.outcome == OUTCOME_CANCELLED else rule.outcome
        assert outcome_of(rebuilt) == expected


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TaskNotFoundError("no task"), ErrorKind.NOT_FOUND),
        (NoRouteError("none"), ErrorKind.NO_ROUTE),
        (CallTimeoutError("late"), ErrorKind.TIMEOUT),
        (ExecutionRefusedError("no"), ErrorKind.REFUSED),
        (SerializationError("bytes"), ErrorKind.SERIALIZATION),
    ],
)
def test_errors_raised_while_serving_map_to_their_kind(exc: Exception, kind: ErrorKind) -> None:
    rule = rule_for(exc)
    assert rule is not None and rule.kind == kind


def test_a_tasks_own_errors_are_exceptions_not_verdicts() -> None:
    for exc in (KeyError("k"), TimeoutError(), ConnectionError(), ValueError()):
        assert rule_for(exc) is None
    assert outcome_of(ValueError()) == OUTCOME_ERROR
    assert outcome_of(PeerConnectionError("lost")) == OUTCOME_CONNECTION


async def test_the_memory_broker_counts_outcomes_by_the_same_table() -> None:
    # A refused or cancelled call is counted as such, as the TCP brokers count it.
    rpc: Registry = Registry()

    async def slow() -> None:
        await asyncio.sleep(30)

    def boom() -> None:
        raise ValueError("boom")

    rpc.register(slow, "slow")
    rpc.register(boom, "boom")
    async with AsyncExecutor(rpc) as executor, MemoryBroker(executor) as broker:
        with pytest.raises(ValueError):
            await broker.call("boom")
        with pytest.raises(CallTimeoutError):
            await broker.call("slow", timeout=0.01)
        with pytest.raises(NoRouteError):
            await broker.call("missing")
        task = asyncio.create_task(broker.call("slow"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with NullExecutor(rpc) as refusing, MemoryBroker(refusing) as refused:
        with pytest.raises(ExecutionRefusedError):
            await refused.call("slow")

    def counted(b: MemoryBroker) -> dict[tuple[str, str, str], int]:
        return {key: n for key, n in b.stats.calls_finished.items() if n}

    assert counted(broker) == {
        ("boom", SIDE_CALLER, OUTCOME_ERROR): 1,
        ("slow", SIDE_CALLER, OUTCOME_TIMEOUT): 1,
        ("missing", SIDE_CALLER, OUTCOME_NO_ROUTE): 1,
        ("slow", SIDE_CALLER, OUTCOME_CANCELLED): 1,
    }
    assert counted(refused) == {("slow", SIDE_CALLER, OUTCOME_REFUSED): 1}
