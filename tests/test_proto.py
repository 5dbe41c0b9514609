"""The sans-IO wire protocol: handshake, authentication, framing, validation.

No sockets and no event loop: bytes go in, events and bytes come out.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patio.errors import (
    AuthenticationError,
    FrameAuthenticationError,
    HandshakeError,
    ProtocolError,
)
from patio.proto import (
    HANDSHAKE_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Connection,
    KeySet,
    Load,
    Message,
    MessageType,
    PeerAuthenticated,
    Pong,
    Result,
    Role,
)
from patio.proto.connection import RECORD_BATCH, State, _proof
from patio.proto.messages import HEADER, MAGIC, MESSAGE_TYPES, NONCE_SIZE
from patio.proto.session import TAG_SIZE, transcript

KEY = b"k" * 32
OTHER = b"o" * 32


def frame(message: Any) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unframe(data: bytes, *, tagged: bool = False) -> list[Any]:
    """Split a byte stream into the decoded messages it carries.

    Frames after an AUTH travel in records (frames and a tag); ``tagged``
    says the stream starts after it.
    """
    messages: list[Any] = []
    while data:
        (size,) = HEADER.unpack_from(data)
        if tagged:
            messages += unframe(data[4 : 4 + size - TAG_SIZE])
        else:
            message = msgpack.unpackb(data[4 : 4 + size], raw=False)
            messages.append(message)
            tagged = message[0] == MessageType.AUTH
        data = data[4 + size :]
    return messages


def sealed(sender: Connection, message: Any) -> bytes:
    """``message`` (any shape) framed and authenticated as ``sender`` sends frames."""
    sender.send_frame(msgpack.packb(message, use_bin_type=True))
    return sender.data_to_send()


def sealed_body(sender: Connection, body: bytes) -> bytes:
    sender.send_frame(body)
    return sender.data_to_send()


def hello(node: str, instance: str, nonce: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return frame([MessageType.HELLO, MAGIC, version, node, instance, nonce, "", True])


def dialer(keys: KeySet | bytes = KEY, node: str = "dialer", **kw: Any) -> Connection:
    keyset = keys if isinstance(keys, KeySet) else KeySet(keys)
    return Connection(Role.DIALER, node, "inst-d", keyset, **kw)


def acceptor(keys: KeySet | bytes = KEY, node: str = "acceptor", **kw: Any) -> Connection:
    keyset = keys if isinstance(keys, KeySet) else KeySet(keys)
    return Connection(Role.ACCEPTOR, node, "inst-a", keyset, **kw)


def pump(a: Connection, b: Connection, *, b_first: bool = False) -> tuple[list[Any], list[Any]]:
    """Exchange bytes until both sides are quiet; return each side's events."""
    events_a: list[Any] = []
    events_b: list[Any] = []
    for _ in range(10):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            break
        if b_first:
            events_a += a.receive_data(out_b)
            events_b += b.receive_data(out_a)
        else:
            events_b += b.receive_data(out_a)
            events_a += a.receive_data(out_b)
    return events_a, events_b


def open_pair(**kw: Any) -> tuple[Connection, Connection]:
    a, b = dialer(**kw), acceptor(**kw)
    pump(a, b)
    assert a.state is State.OPEN and b.state is State.OPEN
    return a, b


# -- handshake ---------------------------------------------------------------


def both_proofs_fail(a: Connection, b: Connection, match: str) -> None:
    """Each side sends its AUTH; each refuses the other's, saying ``match``."""
    auth_a, auth_b = a.data_to_send(), b.data_to_send()
    with pytest.raises(AuthenticationError, match=match):
        b.receive_data(auth_a)
    with pytest.raises(AuthenticationError, match=match):
        a.receive_data(auth_b)


@pytest.mark.parametrize("b_first", [False, True])
def test_handshake_succeeds_both_ways(b_first: bool) -> None:
    a, b = dialer(), acceptor()
    events_a, events_b = pump(a, b, b_first=b_first)
    assert events_a == [PeerAuthenticated("acceptor", "inst-a", PROTOCOL_VERSION)]
    assert events_b == [PeerAuthenticated("dialer", "inst-d", PROTOCOL_VERSION)]
    assert a.state is State.OPEN and b.state is State.OPEN
    assert a.peer is not None and a.peer.node_id == "acceptor"
    # Nothing is left to say once both sides are open.
    assert a.data_to_send() == b"" and b.data_to_send() == b""


def test_handshake_byte_by_byte() -> None:
    a, b = dialer(), acceptor()
    hello_a, hello_b = a.data_to_send(), b.data_to_send()
    for i in range(len(hello_a)):
        assert b.receive_data(hello_a[i : i + 1]) == []
    for i in range(len(hello_b)):
        assert a.receive_data(hello_b[i : i + 1]) == []
    auth_a, auth_b = a.data_to_send(), b.data_to_send()
    got_b = [e for i in range(len(auth_a)) for e in b.receive_data(auth_a[i : i + 1])]
    got_a = [e for i in range(len(auth_b)) for e in a.receive_data(auth_b[i : i + 1])]
    assert [type(e) for e in got_a] == [PeerAuthenticated]
    assert [type(e) for e in got_b] == [PeerAuthenticated]


@pytest.mark.parametrize("wrong", ["dialer", "acceptor"])
def test_wrong_key_fails_authentication(wrong: str) -> None:
    a = dialer(OTHER if wrong == "dialer" else KEY)
    b = acceptor(OTHER if wrong == "acceptor" else KEY)
    hello_a, hello_b = a.data_to_send(), b.data_to_send()
    b.receive_data(hello_a)
    a.receive_data(hello_b)
    both_proofs_fail(a, b, "accepted key")
    assert a.state is State.CLOSED and b.state is State.CLOSED
    assert a.peer is None and b.peer is None
    # A closed connection ignores whatever else arrives.
    assert b.receive_data(frame([MessageType.PING])) == []


A, B, C = b"key-A", b"key-B", b"key-C"


@pytest.mark.parametrize(
    ("keys_d", "keys_a", "dialer_ok", "acceptor_ok"),
    [
        # Mid-rotation: each side proves with its own primary and accepts both.
        (KeySet(A, (B,)), KeySet(B, (A,)), True, True),
        (KeySet(A, (A, B)), KeySet(B, (A, B)), True, True),
        # One side already rotated to B, the other still knows only A.
        (KeySet(B, (A,)), KeySet(A), True, False),
        (KeySet(A), KeySet(B, (A,)), False, True),
        # Accepting a key is not the same as holding it.
        (KeySet(A, (B,)), KeySet(C, (B,)), False, False),
        # Old key retired on both sides.
        (KeySet(B), KeySet(B, (A,)), True, True),
    ],
)
def test_key_rotation(keys_d: KeySet, keys_a: KeySet, dialer_ok: bool, acceptor_ok: bool) -> None:
    """``dialer_ok``: the dialer accepts the acceptor's proof (and vice versa)."""
    a, b = dialer(keys_d), acceptor(keys_a)
    hello_a, hello_b = a.data_to_send(), b.data_to_send()
    b.receive_data(hello_a)
    a.receive_data(hello_b)
    auth_a, auth_b = a.data_to_send(), b.data_to_send()
    for conn, data, ok in ((a, auth_b, dialer_ok), (b, auth_a, acceptor_ok)):
        if ok:
            assert [type(e) for e in conn.receive_data(data)] == [PeerAuthenticated]
            assert conn.state is State.OPEN
        else:
            with pytest.raises(AuthenticationError):
                conn.receive_data(data)
            assert conn.state is State.CLOSED


def test_keyset_fingerprint_names_primary_without_revealing_it() -> None:
    strong_a, strong_b = A * 8, B * 8  # long enough to be fingerprinted (tests/test_keys.py)
    assert KeySet(strong_a).fingerprint == KeySet(strong_a, (strong_b,)).fingerprint
    assert KeySet(strong_a).fingerprint != KeySet(strong_b).fingerprint
    assert strong_a.hex() not in KeySet(strong_a).fingerprint
    assert KeySet(A, (B, A)).all_accepted() == (A, B)


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, 0, 99])
def test_version_mismatch_names_both_versions(version: int) -> None:
    b = acceptor()
    with pytest.raises(HandshakeError) as info:
        b.receive_data(hello("peer", "i", b"n" * NONCE_SIZE, version))
    assert not isinstance(info.value, AuthenticationError)
    text = str(info.value)
    assert str(version) in text and str(PROTOCOL_VERSION) in text
    assert "version" in text
    assert b.state is State.CLOSED


@pytest.mark.parametrize(
    "hello",
    [
        [MessageType.HELLO, "http", PROTOCOL_VERSION, "p", "i", b"n" * NONCE_SIZE],
        [MessageType.HELLO, MAGIC, PROTOCOL_VERSION, "p", "i"],
        [MessageType.HELLO, MAGIC, PROTOCOL_VERSION, "p", "i", b"short"],
        [MessageType.HELLO, MAGIC, PROTOCOL_VERSION, 7, "i", b"n" * NONCE_SIZE],
        [MessageType.HELLO, MAGIC, PROTOCOL_VERSION, "p" * 300, "i", b"n" * NONCE_SIZE],
        [MessageType.AUTH, b"x" * 32],
        [MessageType.CALL, 1, "t", b"", None, False],
        {"type": 0},
        "GET / HTTP/1.1",
        [],
    ],
)
def test_malformed_hello_is_a_handshake_error(hello: Any) -> None:
    b = acceptor()
    with pytest.raises(HandshakeError):
        b.receive_data(frame(hello))
    assert b.state is State.CLOSED


def test_call_before_auth_is_refused() -> None:
    """After HELLO only AUTH may come: a CALL cannot sneak in before authentication."""
    a, b = dialer(), acceptor()
    b.receive_data(a.data_to_send())
    with pytest.raises(HandshakeError, match="expected AUTH"):
        b.receive_data(frame([MessageType.CALL, 1, "t", b"", None, False]))


# -- replay and reflection --------------------------------------------------


def test_replayed_auth_is_rejected_on_another_connection() -> None:
    a1, b1 = dialer(), acceptor()
    hello_a1 = a1.data_to_send()
    b1.receive_data(hello_a1)
    a1.receive_data(b1.data_to_send())
    auth_a1 = a1.data_to_send()
    assert [type(e) for e in b1.receive_data(auth_a1)] == [PeerAuthenticated]

    # An eavesdropper replays the dialer's HELLO and AUTH verbatim to a new connection.
    b2 = acceptor()
    assert b2.receive_data(hello_a1) == []
    assert b2.state is State.AWAIT_AUTH
    with pytest.raises(AuthenticationError):
        b2.receive_data(auth_a1)
    assert b2.peer is None


def test_nonces_are_fresh() -> None:
    nonces = {unframe(dialer().data_to_send())[0][5] for _ in range(50)}
    assert len(nonces) == 50
    assert all(len(n) == NONCE_SIZE for n in nonces)


def test_own_hello_echoed_back_is_rejected() -> None:
    b = acceptor()
    with pytest.raises(HandshakeError, match="echoed"):
        b.receive_data(b.data_to_send())


def test_own_auth_reflected_back_is_rejected() -> None:
    """An attacker without the key claims our identity and reflects our proof."""
    b = acceptor()
    own_hello = unframe(b.data_to_send())[0]
    attacker_nonce = b"\x01" * NONCE_SIZE
    b.receive_data(hello("acceptor", "inst-a", attacker_nonce))
    auth = b.data_to_send()
    with pytest.raises(AuthenticationError):
        b.receive_data(auth)
    assert own_hello[5] != attacker_nonce


def test_cross_connection_reflection_fails_only_because_of_the_role() -> None:
    """Two connections to one node, nonces swapped: the role tells the proofs apart.

    The attacker opens c1 and c2 to the same node, sends on c1 a HELLO whose
    nonce is c2's nonce and on c2 one whose nonce is c1's, both claiming the
    node's own identity. c2's AUTH then covers the nonces and identities c1
    expects; it must still fail on c1 because it was made by an acceptor
    (the transcript puts each nonce in its role's place, and the role byte
    is proven too).
    """
    c1, c2 = acceptor(), acceptor()
    n1 = unframe(c1.data_to_send())[0][5]
    n2 = unframe(c2.data_to_send())[0][5]
    ident = ("acceptor", "inst-a")
    c1.receive_data(hello(*ident, n2))
    c2.receive_data(hello(*ident, n1))
    c1.data_to_send()
    (auth_c2,) = unframe(c2.data_to_send())
    # The proof c1 wants differs from c2's only by the role byte.
    agreed_c2 = transcript(PROTOCOL_VERSION, True, ident, ident, n1, n2, b"")
    expected_by_c1 = transcript(PROTOCOL_VERSION, True, ident, ident, n2, n1, b"")
    assert auth_c2[1] == _proof(KEY, Role.ACCEPTOR, agreed_c2)
    assert _proof(KEY, Role.DIALER, expected_by_c1) != auth_c2[1]
    with pytest.raises(AuthenticationError):
        c1.receive_data(frame(auth_c2))


# -- framing ----------------------------------------------------------------


FIXED_NONCE = b"\x07" * NONCE_SIZE


def handshake_and_traffic() -> tuple[bytes, list[Any]]:
    """A dialer's whole output (HELLO, AUTH, messages) and the messages it carries."""
    a, b = dialer(), acceptor(nonce=FIXED_NONCE)
    stream = a.data_to_send()
    b.receive_data(stream)  # b only needs a's HELLO to produce its own AUTH
    a.receive_data(b.data_to_send())
    stream += a.data_to_send()
    assert a.state is State.OPEN
    a.send_announce(["t1", "t2"], [], 4, 1024, False)
    a.send_call(1, "t1", b"\x92\x90\x80", 2.5, False)
    a.send_call(2, "t2", b"x" * 3000, None, True)
    a.send_result(7, b"")
    a.send_error(8, 0, b"boom")
    a.send_cancel(9)
    a.send_ping()
    a.send_goodbye("bye")
    stream += a.data_to_send()
    expected = [
        [MessageType.ANNOUNCE, ["t1", "t2"], [], 4, 1024, False],
        [MessageType.CALL, 1, "t1", b"\x92\x90\x80", 2.5, False],
        [MessageType.CALL, 2, "t2", b"x" * 3000, None, True],
        [MessageType.RESULT, 7, b""],
        [MessageType.ERROR, 8, 0, b"boom"],
        [MessageType.CANCEL, 9],
        [MessageType.GOODBYE, "bye"],
    ]
    return stream, [MESSAGE_TYPES[fields[0]](*fields) for fields in expected]


def feed_split(stream: bytes, cuts: list[int]) -> tuple[Connection, list[Any]]:
    b = acceptor(nonce=FIXED_NONCE)  # the dialer's AUTH was made for this nonce
    events: list[Any] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        events += b.receive_data(stream[last:cut])
        last = cut
    return b, events


def test_frames_split_at_every_byte_boundary() -> None:
    stream, expected = handshake_and_traffic()
    for cut in range(len(stream) + 1):
        b, events = feed_split(stream, [cut])
        assert isinstance(events[0], PeerAuthenticated), cut
        assert events[1:] == expected, cut
        # The PING was answered internally and never surfaced.
        assert [MessageType.PONG] in unframe(b.data_to_send())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_frames_split_anywhere_parse(data: st.DataObject) -> None:
    stream, expected = handshake_and_traffic()
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    _, events = feed_split(stream, cuts)
    assert isinstance(events[0], PeerAuthenticated)
    assert events[1:] == expected


def test_oversized_header_before_auth() -> None:
    b = acceptor()
    # A frame of exactly the limit is allowed: the header alone waits for a body.
    assert b.receive_data(HEADER.pack(HANDSHAKE_MAX_FRAME_SIZE)) == []
    b = acceptor()
    with pytest.raises(ProtocolError, match="before authentication"):
        b.receive_data(HEADER.pack(HANDSHAKE_MAX_FRAME_SIZE + 1))
    assert b.state is State.CLOSED


def test_oversized_header_after_hello_before_auth() -> None:
    a, b = dialer(), acceptor()
    b.receive_data(a.data_to_send())
    assert b.state is State.AWAIT_AUTH
    with pytest.raises(ProtocolError, match="exceeds"):
        b.receive_data(HEADER.pack(64 * 1024))


@pytest.mark.parametrize("size", [0xFFFFFFFF, 1 << 31, 1024 * 1024 + 4 + TAG_SIZE + 1])
def test_oversized_header_after_auth(size: int) -> None:
    _, b = open_pair(max_frame_size=1024 * 1024)
    with pytest.raises(ProtocolError, match="exceeds") as info:
        b.receive_data(HEADER.pack(size))  # only the header: rejected before any body
    assert str(size) in str(info.value)
    assert not isinstance(info.value, HandshakeError)
    assert b.state is State.CLOSED


def test_frame_at_max_size_after_auth_is_accepted() -> None:
    a, b = open_pair(max_frame_size=4096)
    payload = b"p" * 4000
    a.send_result(1, payload)
    data = a.data_to_send()
    assert HEADER.unpack_from(data)[0] <= 4096
    assert b.receive_data(data) == [Result(MessageType.RESULT, 1, payload)]
    a.send_result(2, b"p" * 5000)
    with pytest.raises(ProtocolError, match="exceeds"):
        b.receive_data(a.data_to_send())


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=4096))
def test_random_bytes_before_auth_only_raise_protocol_errors(junk: bytes) -> None:
    b = acceptor()
    try:
        events = b.receive_data(junk)
    except ProtocolError as exc:
        assert str(exc)
        assert b.state is State.CLOSED
    else:
        assert events == []  # nothing random can authenticate


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=4096), framed=st.booleans())
def test_random_bytes_after_auth_only_raise_protocol_errors(junk: bytes, framed: bool) -> None:
    a, b = open_pair()
    if framed:  # a frame with a valid tag: reaches the decoder
        a.send_frame(junk)
        data = a.data_to_send()
    else:
        data = junk
    try:
        events = b.receive_data(data)
    except ProtocolError as exc:
        assert str(exc)
        assert b.state is State.CLOSED
    else:
        for event in events:
            assert isinstance(event, Message) and event[0] in MessageType.__members__.values()
            assert type(event) is MESSAGE_TYPES[event.kind]


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.integers(-2, 12) | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=3),
    fields=st.lists(MSGPACK_VALUES, max_size=7),
)
def test_random_messages_after_auth_are_valid_or_protocol_errors(
    kind: Any, fields: list[Any]
) -> None:
    """Any well-framed msgpack array is either a well-shaped event or a ProtocolError."""
    a, b = open_pair()
    try:
        events = b.receive_data(sealed(a, [kind, *fields]))
    except ProtocolError as exc:
        assert str(exc)
        return
    for event in events:
        assert type(event[0]) is int
        kind_ = MessageType(event[0])
        assert kind_ not in (MessageType.HELLO, MessageType.AUTH, MessageType.PING)
        # Typed, with the fields of the frame in order.
        assert type(event) is MESSAGE_TYPES[kind_]
        assert list(event) == [kind, *fields]


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ([MessageType.RESULT, 1], "RESULT has 2 fields"),
        ([MessageType.CALL, 1, "t", b"", None], "CALL has 5 fields"),
        ([MessageType.CALL, 1, "t", b"", None, False, 0], "CALL has 7 fields"),
        ([MessageType.CALL, "1", "t", b"", None, False], "CALL field 1"),
        ([MessageType.CALL, 1, 5, b"", None, False], "CALL field 2"),
        ([MessageType.CALL, 1, "t", "text", None, False], "CALL field 3"),
        ([MessageType.CALL, 1, "t", b"", "soon", False], "CALL field 4"),
        ([MessageType.CALL, 1, "t", b"", None, 1], "CALL field 5"),
        ([MessageType.CALL, 1, "t", b"", float("nan"), False], "NaN"),
        ([MessageType.CALL, 1, "t", b"", -float("nan"), False], "NaN"),
        ([MessageType.RESULT, 1, "text"], "RESULT field 2"),
        ([MessageType.RESULT, None, b""], "RESULT field 1"),
        ([MessageType.ERROR, 1, "x", b""], "ERROR field 2"),
        ([MessageType.CANCEL, 1.5], "CANCEL field 1"),
        ([MessageType.ANNOUNCE, "t1", [], 1, 1, False], "ANNOUNCE field 1"),
        ([MessageType.GOODBYE, b"bytes"], "GOODBYE field 1"),
        ([MessageType.PING, 1], "PING has 2 fields"),
        ([42], "unknown"),
        ([3.0, 1, "t", b"", None, False], "unknown"),
        ([4.0, 1, b""], "unknown"),
        ([True, b"proof"], "unknown"),
        (["CALL", 1], "unknown"),
        ([MessageType.HELLO, MAGIC, 1, "n", "i", b"n" * NONCE_SIZE], "unexpected"),
        ([MessageType.AUTH, b"proof"], "unexpected"),
        ([], "non-empty array"),
        ({"type": 3}, "non-empty array"),
        (3, "non-empty array"),
    ],
)
def test_malformed_messages_after_auth(message: Any, needle: str) -> None:
    a, b = open_pair()
    with pytest.raises(ProtocolError, match=needle):
        b.receive_data(sealed(a, message))
    assert b.state is State.CLOSED


@pytest.mark.parametrize(
    "timeout", [None, 0, -1, 0.0, 2.5, 10**12, 1e300, float("inf"), float("-inf")]
)
def test_call_timeouts_that_are_accepted(timeout: Any) -> None:
    a, b = open_pair()
    a.send_call(1, "t", b"", timeout, False)
    (call,) = b.receive_data(a.data_to_send())
    assert call == Call(MessageType.CALL, 1, "t", b"", timeout, False)
    assert (call.call_id, call.name, call.timeout, call.route) == (1, "t", timeout, False)


def test_invalid_msgpack_after_auth() -> None:
    a, b = open_pair()
    with pytest.raises(ProtocolError, match="msgpack"):
        b.receive_data(sealed_body(a, b"\xc1"))  # 0xc1 is never used by msgpack


def test_valid_frames_before_a_bad_one_are_not_lost_by_the_parser() -> None:
    """The bad frame raises; the state closes and nothing after it is parsed."""
    a, b = open_pair()
    stream = sealed(a, [MessageType.CANCEL, 1]) + sealed(a, [42]) + sealed(a, [MessageType.PONG])
    with pytest.raises(ProtocolError):
        b.receive_data(stream)
    assert b.receive_data(sealed(a, [MessageType.CANCEL, 2])) == []


def test_ping_is_answered_with_pong_internally() -> None:
    a, b = open_pair()
    a.send_ping()
    assert b.receive_data(a.data_to_send()) == []
    reply = b.data_to_send()
    assert unframe(reply, tagged=True) == [[MessageType.PONG]]
    # The PONG is an event for the side that pinged (a heartbeat answer).
    assert a.receive_data(reply) == [Pong(MessageType.PONG)]
    assert a.data_to_send() == b""


@pytest.mark.parametrize(
    "send",
    [
        lambda c: c.send_announce([], [], 1, 1, False),
        lambda c: c.send_call(1, "t", b"", None, False),
        lambda c: c.send_result(1, b""),
        lambda c: c.send_error(1, 0, b""),
        lambda c: c.send_cancel(1),
        lambda c: c.send_ping(),
        lambda c: c.send_goodbye("x"),
    ],
)
def test_sending_before_open_raises(send: Any) -> None:
    a, b = dialer(), acceptor()
    with pytest.raises(ProtocolError, match="await-hello"):
        send(a)
    b.receive_data(a.data_to_send())
    assert b.state is State.AWAIT_AUTH
    with pytest.raises(ProtocolError, match="await-auth"):
        send(b)
    a.close()
    with pytest.raises(ProtocolError, match="closed"):
        send(a)
    # Nothing but the HELLO and AUTH ever left.
    assert [m[0] for m in unframe(b.data_to_send())] == [MessageType.HELLO, MessageType.AUTH]


def test_node_id_length_is_bounded() -> None:
    with pytest.raises(ValueError, match="node id"):
        Connection(Role.DIALER, "n" * 254, "i", KeySet(KEY))


@pytest.mark.parametrize("refused_while", ["open", "awaiting-auth"])
def test_refusing_side_says_refused_and_nothing_else(refused_while: str) -> None:
    """The side that rejects a proof sends REFUSED; the other fails at once, naming its key."""
    a, b = dialer(KeySet(OTHER, (KEY,))), acceptor(KEY)  # a accepts b's key, not vice versa
    hello_a, hello_b = a.data_to_send(), b.data_to_send()
    b.receive_data(hello_a)
    a.receive_data(hello_b)
    auth_a, auth_b = a.data_to_send(), b.data_to_send()
    if refused_while == "open":
        assert [type(e) for e in a.receive_data(auth_b)] == [PeerAuthenticated]
    with pytest.raises(AuthenticationError, match=KeySet(KEY).fingerprint):
        b.receive_data(auth_a)
    refusal = b.data_to_send()
    assert unframe(refusal) == [[MessageType.REFUSED]]
    with pytest.raises(AuthenticationError, match=f"refused our key.*{KeySet(OTHER).fingerprint}"):
        a.receive_data(refusal)
    assert a.state is State.CLOSED


def test_on_output_is_told_once_per_batch_of_queued_frames() -> None:
    a, _ = open_pair()
    calls: list[int] = []
    a.on_output = lambda: calls.append(a.pending_output)
    a.send_call(1, "t", b"", None, False)
    a.send_result(2, b"")
    a.send_cancel(3)
    assert calls == [0]  # told when the first frame was queued, not again
    assert unframe(a.data_to_send(), tagged=True)[0][0] == MessageType.CALL
    a.send_goodbye("bye")
    assert calls == [0, 0]


def test_load_travels_typed_and_a_malformed_one_is_refused() -> None:
    a, b = open_pair()
    a.send_load(37)
    assert b.receive_data(a.data_to_send()) == [Load(MessageType.LOAD, 37)]
    with pytest.raises(ProtocolError, match="LOAD field 1 is str"):
        b.receive_data(sealed(a, [MessageType.LOAD, "37"]))


# -- authenticated frames (issue 16 items 2 and 12) ------------------------------


def test_frames_after_the_handshake_travel_in_authenticated_records() -> None:
    """What one write carries is one record: its frames, then one tag."""
    a, b = open_pair()
    a.send_cancel(1)
    a.send_cancel(2)
    data = a.data_to_send()
    (size,) = HEADER.unpack_from(data)
    frames = frame([MessageType.CANCEL, 1]) + frame([MessageType.CANCEL, 2])
    assert size == len(frames) + TAG_SIZE and len(data) == 4 + size
    assert data[4 : 4 + len(frames)] == frames
    assert b.receive_data(data) == [Cancel(MessageType.CANCEL, i) for i in (1, 2)]


def test_frames_share_a_record_up_to_the_batch_size() -> None:
    """Records stay under RECORD_BATCH bytes of frames; a larger frame has its own."""
    a, b = open_pair()
    for i in range(5):
        a.send_result(i, b"p" * 30_000)
    a.send_result(5, b"q" * (RECORD_BATCH + 1))
    data = a.data_to_send()
    sizes = []
    rest = data
    while rest:
        (size,) = HEADER.unpack_from(rest)
        sizes.append(size - TAG_SIZE)
        rest = rest[4 + size :]
    assert len(sizes) == 4 and max(sizes[:3]) <= RECORD_BATCH < sizes[3], sizes
    assert [r.call_id for r in b.receive_data(data)] == list(range(6))


def test_a_frame_crossing_the_end_of_its_record_is_refused() -> None:
    a, b = open_pair()
    a._pending += HEADER.pack(100) + b"\x90"  # a frame announcing more than the record holds
    with pytest.raises(ProtocolError, match="crosses the end of its record"):
        b.receive_data(a.data_to_send())


def _two_cancels() -> tuple[Connection, Connection, bytes, bytes]:
    a, b = open_pair()
    a.send_cancel(1)
    first = a.data_to_send()
    a.send_cancel(2)
    return a, b, first, a.data_to_send()


def _flip_last_body_byte(frame_bytes: bytes) -> bytes:
    changed = bytearray(frame_bytes)
    changed[-TAG_SIZE - 1] ^= 0x01  # CANCEL 1 becomes CANCEL 0
    return bytes(changed)


@pytest.mark.parametrize(
    "attack",
    ["inject", "modify", "modify-tag", "replay", "drop", "reorder", "reflect", "truncate"],
)
def test_a_frame_not_sent_as_is_fails_authentication(attack: str) -> None:
    """What an on-path relay can do after a handshake it passed through: all refused."""
    _, b, first, second = _two_cancels()
    if attack == "inject":  # a well-formed CALL without the key: executed before v2
        stream = frame([MessageType.CALL, 1, "t", b"", None, False])
    elif attack == "modify":
        stream = _flip_last_body_byte(first)
    elif attack == "modify-tag":
        stream = first[:-1] + bytes([first[-1] ^ 0x80])
    elif attack == "replay":
        assert b.receive_data(first) == [Cancel(MessageType.CANCEL, 1)]
        stream = first
    elif attack == "drop":
        stream = second
    elif attack == "reorder":
        stream = second + first
    elif attack == "reflect":  # b's own frame sent back to b
        b.send_cancel(1)
        stream = b.data_to_send()
    else:  # a frame shorter than a tag
        stream = HEADER.pack(3) + b"\x91\x06\x01"
    with pytest.raises(FrameAuthenticationError, match="frame authentication failed") as info:
        b.receive_data(stream)
    assert info.value.reason == "frame_auth"
    assert b.state is State.CLOSED


def test_nothing_of_a_chunk_after_a_forged_frame_is_used() -> None:
    _, b, first, second = _two_cancels()
    with pytest.raises(FrameAuthenticationError):
        b.receive_data(_flip_last_body_byte(first) + second)
    assert b.receive_data(second) == []  # closed


def test_directions_and_links_have_their_own_keys() -> None:
    """A frame from one link, or from the other direction, never verifies."""
    a1, b1 = open_pair()
    _, b2 = open_pair()
    a1.send_cancel(1)
    with pytest.raises(FrameAuthenticationError):
        b2.receive_data(a1.data_to_send())
    b1.send_cancel(1)
    b1_frame = b1.data_to_send()
    with pytest.raises(FrameAuthenticationError):
        b1.receive_data(b1_frame)


def test_the_proof_covers_the_protocol_version() -> None:
    """Item 12: the version is under the proof (and so under the session keys)."""
    a, b = dialer(), acceptor()
    nonce_a = unframe(a.data_to_send())[0][5]
    b.receive_data(hello("dialer", "inst-d", nonce_a))
    hello_b, auth_b = unframe(b.data_to_send())
    ids = (("dialer", "inst-d"), ("acceptor", "inst-a"))
    agreed = transcript(PROTOCOL_VERSION, True, *ids, nonce_a, hello_b[5], b"")
    assert auth_b[1] == _proof(KEY, Role.ACCEPTOR, agreed)
    other = transcript(PROTOCOL_VERSION - 1, True, *ids, nonce_a, hello_b[5], b"")
    assert _proof(KEY, Role.ACCEPTOR, other) != auth_b[1]


def test_a_frame_mac_flag_changed_on_the_way_fails_the_proofs() -> None:
    """A relay turning authentication off in one HELLO cannot make the ends agree."""
    a, b = dialer(), acceptor(frame_mac=False)
    hello_a, hello_b = unframe(a.data_to_send())[0], unframe(b.data_to_send())[0]
    hello_a[7], hello_b[7] = False, True  # what each side expects of the other
    b.receive_data(frame(hello_a))
    a.receive_data(frame(hello_b))
    both_proofs_fail(a, b, "altered on the way")


def test_frame_mac_mismatch_is_refused_naming_both_settings() -> None:
    a, b = dialer(frame_mac=False), acceptor()
    with pytest.raises(HandshakeError, match="off and this side has it on") as info:
        b.receive_data(a.data_to_send())
    assert info.value.reason == "frame_mac"


def test_frames_without_mac_when_both_sides_turn_it_off() -> None:
    a, b = open_pair(frame_mac=False)
    a.send_cancel(1)
    data = a.data_to_send()
    assert data == frame([MessageType.CANCEL, 1])
    assert b.receive_data(data) == [Cancel(MessageType.CANCEL, 1)]


def test_a_version_1_peer_is_refused_naming_both_versions() -> None:
    b = acceptor()
    old = [MessageType.HELLO, MAGIC, 1, "old", "i", b"n" * NONCE_SIZE, ""]
    with pytest.raises(HandshakeError, match="protocol version 1, this side speaks 2"):
        b.receive_data(frame(old))


def test_different_channel_bindings_fail_the_handshake_and_say_why() -> None:
    """A relay terminating TLS on both sides: each end binds to the certificate it saw."""
    a = dialer(channel_binding=b"tls-server-end-point:relay")
    b = acceptor(channel_binding=b"tls-server-end-point:server")
    hello_a, hello_b = a.data_to_send(), b.data_to_send()
    b.receive_data(hello_a)
    a.receive_data(hello_b)
    both_proofs_fail(a, b, "TLS channel binding differs")


def test_rotation_keys_derive_the_same_session_keys_on_both_sides() -> None:
    a, b = dialer(KeySet(A, (B,))), acceptor(KeySet(B, (A,)))
    pump(a, b)
    a.send_cancel(7)
    assert b.receive_data(a.data_to_send()) == [Cancel(MessageType.CANCEL, 7)]
    b.send_cancel(8)
    assert a.receive_data(b.data_to_send()) == [Cancel(MessageType.CANCEL, 8)]


def test_record_tags_are_hmac_sha256_over_the_sequence_length_and_frames() -> None:
    """FrameMac hashes the padded key once per link; its tags are plain HMAC-SHA256."""
    import hmac
    import struct

    from patio.proto.session import FrameMac

    for key in (b"k" * 32, b"", b"x" * 100):
        mac = FrameMac(key)
        for sequence, frames in enumerate([b"", b"abc", b"z" * 70_000]):
            place = struct.pack(">QI", sequence, len(frames) + TAG_SIZE)
            expected = hmac.new(key, place + frames, "sha256").digest()[:TAG_SIZE]
            assert mac.tag(len(frames) + TAG_SIZE, frames) == expected
