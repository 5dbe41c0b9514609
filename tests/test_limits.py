"""Name limits of the wire protocol: how long a task name, how many in one ANNOUNCE.

``MAX_NAME_LENGTH`` and ``MAX_ANNOUNCED_NAMES`` bound what one peer makes
another keep (its sets of names, the labels of its logs). A frame over either
closes the link, counted in ``frames_rejected`` under its own reason and
logged; the sending side refuses such a message before it leaves.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from patio.errors import NameTooLongError, ProtocolError, TooManyNamesError
from patio.proto import Call, Connection, KeySet, MessageType, Role
from patio.proto.messages import HEADER, MAX_ANNOUNCED_NAMES, MAX_NAME_LENGTH
from tests.test_bad_input import (
    Env,
    close_raw,
    env,
    frame,
    handshake,
    steady_load,
    wait_closed,
    warnings_text,
)

__all__ = ["env"]  # the fixture, used by name

KEYS = KeySet(b"limits")
LONG = "n" * (MAX_NAME_LENGTH + 1)
LONGEST = "n" * MAX_NAME_LENGTH


def open_pair() -> tuple[Connection, Connection]:
    a = Connection(Role.ACCEPTOR, "a", "ia", KEYS)
    d = Connection(Role.DIALER, "d", "id", KEYS)
    d.receive_data(a.data_to_send())
    a.receive_data(d.data_to_send())
    d.receive_data(a.data_to_send())
    return a, d


def raw(message: list[Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def announce(names: list[Any], routable: list[Any] = ()) -> list[Any]:  # type: ignore[assignment]
    return [MessageType.ANNOUNCE, names, list(routable), 1, 1, False]


@pytest.mark.parametrize(
    ("message", "error", "reason"),
    [
        ([MessageType.CALL, 1, LONG, b"", None, False], NameTooLongError, "name_too_long"),
        (announce(["ok", LONG]), NameTooLongError, "name_too_long"),
        (announce([], [LONG]), NameTooLongError, "name_too_long"),
        (announce(["x"] * (MAX_ANNOUNCED_NAMES + 1)), TooManyNamesError, "too_many_names"),
        (announce([], ["x"] * (MAX_ANNOUNCED_NAMES + 1)), TooManyNamesError, "too_many_names"),
    ],
    ids=["call-name", "announced-name", "routable-name", "names", "routable-names"],
)
def test_a_frame_over_a_name_limit_closes_the_connection(
    message: list[Any], error: type[ProtocolError], reason: str
) -> None:
    ours, _ = open_pair()
    with pytest.raises(error, match="over the limit") as caught:
        ours.receive_data(raw(message))
    assert caught.value.reason == reason
    assert ours.receive_data(raw([MessageType.PING])) == []  # closed


def test_names_at_the_limits_pass() -> None:
    ours, theirs = open_pair()
    names = [LONGEST] + [str(i) for i in range(MAX_ANNOUNCED_NAMES - 1)]
    theirs.send_announce(names, [LONGEST], 1, 1, False)
    theirs.send_call(7, LONGEST, b"", None, False)
    got = ours.receive_data(theirs.data_to_send())
    assert len(got[0].names) == MAX_ANNOUNCED_NAMES
    assert got[1] == Call(MessageType.CALL, 7, LONGEST, b"", None, False)


def test_the_sender_refuses_what_the_peer_would_refuse() -> None:
    _, theirs = open_pair()
    with pytest.raises(ValueError, match="over the limit of 1024"):
        theirs.send_call(1, LONG, b"", None, False)
    with pytest.raises(ValueError, match="over the limit of 1024"):
        theirs.send_announce(["a", LONG], [], 1, 1, False)
    with pytest.raises(ValueError, match=f"over the limit of {MAX_ANNOUNCED_NAMES}"):
        theirs.send_announce([], ["x"] * (MAX_ANNOUNCED_NAMES + 1), 1, 1, False)
    assert theirs.data_to_send() == b""  # nothing was queued


@pytest.mark.parametrize(
    ("message", "reason", "logged"),
    [
        (announce(["mul", LONG]), "name_too_long", "announce names a task of 1025 characters"),
        ([MessageType.CALL, 1, LONG, b"", None, False], "name_too_long", "call names a task"),
        (announce(["x"] * (MAX_ANNOUNCED_NAMES + 1)), "too_many_names", "lists 100001 names"),
    ],
    ids=["announced-name", "call-name", "announced-names"],
)
async def test_a_broker_cuts_a_peer_over_a_name_limit_and_counts_why(
    env: Env, caplog: pytest.LogCaptureFixture, message: list[Any], reason: str, logged: str
) -> None:
    async with steady_load(env):  # the other callers are not disturbed
        reader, writer, _ = await handshake(env.port)
        try:
            writer.write(frame(message))
            assert await wait_closed(reader, 3) < 1
        finally:
            close_raw(writer)
    assert env.server.stats.frames_rejected == {reason: 1}
    assert logged in warnings_text(caplog)
