"""The fuzz targets: each takes one input of bytes and checks what must hold.

A target returns normally when the code under test behaved: it either
accepted the input or refused it with the error its contract names. Any other
exception is a finding (atheris reports it with the input that caused it), and
so are a hang (libFuzzer's ``-timeout``) and memory growth past
``-rss_limit_mb``.

Only public entry points are driven: a :class:`Connection` is fed through
``receive_data`` and ``data_to_send`` and its ``send_*`` methods, the
serializers through ``unpack``. The connection under test is the accepting
side, with fixed nonces so that every run of an input does the same thing.

Targets:

``handshake``
    Bytes from an anonymous peer into a fresh connection.
``open_stream``
    Bytes from an authenticated peer (the handshake is replayed first). Frames
    after the handshake travel in records with a MAC, so most inputs end at
    the tag check: this target fuzzes the record framing and the check itself.
``open_frames``
    The same, but the input is cut into frame bodies, each gets a correct
    length header and they are sealed into records with valid tags (the
    harness holds the dialer's session keys), so the fuzzer spends its time
    on message decoding.
``forged``
    Valid records as in ``open_frames`` (one per frame) with one byte of the
    stream changed: no frame from the changed record on may be handed up.
``roundtrip``
    Messages built from the input are sent with the ``send_*`` methods of one
    side and must come out of the other side as sent, whatever the chunking.
``msgpack``
    The default serializer's ``unpack``, then ``exception_from_payload`` on
    what it returns, and ``pack``/``unpack`` of it again.
``restricted_pickle``
    ``RestrictedPickleSerializer.unpack``.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Callable
from typing import Any

import atheris

from patio.broker.serializer import (
    MsgpackSerializer,
    RestrictedPickleSerializer,
    exception_from_payload,
)
from patio.errors import FrameAuthenticationError, ProtocolError, SerializationError
from patio.proto import Connection, KeySet, PeerAuthenticated, Role
from patio.proto.messages import MESSAGE_TYPES

KEYS = KeySet(b"fuzz-key", (b"fuzz-next-key",))
ACCEPTOR_NONCE = bytes(range(32))
DIALER_NONCE = bytes(range(32, 64))
# A frame body limit small enough that the fuzzer meets it (the cut is the
# same code whatever the number).
MAX_FRAME = 4096
HEADER = struct.Struct(">I")


def acceptor() -> Connection:
    return Connection(
        Role.ACCEPTOR, "fuzz-acceptor", "acceptor-1", KEYS,
        max_frame_size=MAX_FRAME, nonce=ACCEPTOR_NONCE,
    )  # fmt: skip


def dialer() -> Connection:
    return Connection(
        Role.DIALER, "fuzz-dialer", "dialer-1", KEYS,
        max_frame_size=MAX_FRAME, nonce=DIALER_NONCE,
    )  # fmt: skip


def _dialer_handshake() -> bytes:
    """What an honest dialer sends: its HELLO and its AUTH for our fixed nonce."""
    ours, theirs = acceptor(), dialer()
    hello = theirs.data_to_send()
    theirs.receive_data(ours.data_to_send())  # our HELLO: the dialer answers with AUTH
    return hello + theirs.data_to_send()


DIALER_HANDSHAKE = _dialer_handshake()


def _acceptor_handshake() -> bytes:
    """What our side answers to DIALER_HANDSHAKE: its HELLO and its AUTH."""
    ours = acceptor()
    ours.receive_data(DIALER_HANDSHAKE)
    return ours.data_to_send()


ACCEPTOR_HANDSHAKE = _acceptor_handshake()


def open_dialer() -> Connection:
    """The dialer of DIALER_HANDSHAKE, open: its frames carry valid tags for us."""
    theirs = dialer()
    theirs.data_to_send()
    theirs.receive_data(ACCEPTOR_HANDSHAKE)
    assert theirs.peer is not None
    theirs.data_to_send()  # its AUTH, already in DIALER_HANDSHAKE
    return theirs


def open_connection() -> Connection:
    conn = acceptor()
    events = conn.receive_data(DIALER_HANDSHAKE)
    assert len(events) == 1 and isinstance(events[0], PeerAuthenticated), events
    conn.data_to_send()
    return conn


def open_pair() -> tuple[Connection, Connection]:
    ours, theirs = acceptor(), dialer()
    theirs.receive_data(ours.data_to_send())
    ours.receive_data(theirs.data_to_send())
    theirs.receive_data(ours.data_to_send())
    assert ours.peer is not None and theirs.peer is not None
    return ours, theirs


# -- feeding bytes ------------------------------------------------------------

Outcome = tuple[list[Any], str | None, bytes]


def feed(conn: Connection, chunks: list[bytes]) -> Outcome:
    """Feed ``chunks`` in order; (events, error, output) with error as 'Type: text'."""
    events: list[Any] = []
    error = None
    for chunk in chunks:
        try:
            events += conn.receive_data(chunk)
        except ProtocolError as exc:  # HandshakeError and AuthenticationError derive from it
            error = f"{type(exc).__name__}: {exc}"
            assert conn.receive_data(b"\0\0\0\1") == [], "a closed connection took more input"
            break
    return events, error, conn.data_to_send()


def chunked(data: bytes) -> list[bytes]:
    """Cut ``data`` into pieces of 1, 2, 3 ... 7 bytes, again and again."""
    chunks, pos, size = [], 0, 1
    while pos < len(data):
        chunks.append(data[pos : pos + size])
        pos += size
        size = size % 7 + 1
    return chunks


def same_either_way(make: Callable[[], Connection], data: bytes) -> None:
    """One chunk or many small ones: the same error, or the same events and output.

    When a chunk ends in a violation, the events completed earlier in that
    same chunk are not returned (the connection is closed at once), so only
    the errors are compared then.
    """
    whole = feed(make(), [data])
    pieces = feed(make(), chunked(data))
    assert whole[1] == pieces[1], (whole[1], pieces[1])
    if whole[1] is None:
        assert whole[0] == pieces[0], (whole[0], pieces[0])
        assert whole[2] == pieces[2]


# -- the targets ----------------------------------------------------------------


def handshake(data: bytes) -> None:
    same_either_way(acceptor, data)


def open_stream(data: bytes) -> None:
    same_either_way(open_connection, data)


def bodies_from(data: bytes) -> list[bytes]:
    """Cut ``data`` into bodies, each preceded by a one-byte length."""
    bodies = []
    pos = 0
    while pos < len(data):
        size = data[pos]
        bodies.append(data[pos + 1 : pos + 1 + size])
        pos += 1 + size
    return bodies


def frames_from(data: bytes) -> bytes:
    """The bodies in ``data``, each framed and tagged as the open dialer sends them."""
    theirs = open_dialer()
    for body in bodies_from(data):
        theirs.send_frame(body)
    return theirs.data_to_send()


def open_frames(data: bytes) -> None:
    same_either_way(open_connection, frames_from(data))


def forged(data: bytes) -> None:
    """One byte of a valid tagged stream changed: nothing from there on is handed up."""
    if len(data) < 3:
        return
    theirs = open_dialer()
    ends = []  # where each frame ends in the stream
    stream = b""
    for body in bodies_from(data[2:]):
        theirs.send_frame(body)
        stream += theirs.data_to_send()
        ends.append(len(stream))
    if not stream:
        return
    where = int.from_bytes(data[:2], "big") % len(stream)
    changed = bytearray(stream)
    changed[where] ^= 1 + data[1] % 255
    # What the honest stream hands up, frame by frame, up to its first refusal.
    honest: list[Any] = []
    reader, start = open_connection(), 0
    with contextlib.suppress(ProtocolError):
        for end in ends:
            honest += reader.receive_data(stream[start:end])
            start = end
    ours = open_connection()
    try:
        events = ours.receive_data(bytes(changed))
    except FrameAuthenticationError:
        return
    except ProtocolError:
        # Another refusal (a changed header over the size limit) is fine too.
        return
    # No error: the change left the changed frame incomplete (a header
    # announcing more bytes than came). Only frames wholly before it count.
    before = sum(1 for end in ends if end <= where)
    assert events == honest[: len(events)] and len(events) <= before, (events, before)


def roundtrip(data: bytes) -> None:
    """What one side's send_* methods queue, the other side decodes as sent."""
    fdp = atheris.FuzzedDataProvider(data)
    ours, theirs = open_pair()
    expected: list[list[Any]] = []
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        kind = fdp.PickValueInList(SENDABLE)
        try:
            message = _send(theirs, kind, fdp)
        except (ValueError, OverflowError) as exc:
            # Refused at the sender, which is where a bad argument must be caught.
            assert str(exc), "an error without a message"
            continue
        if message is not None:
            expected.append(message)
    out = theirs.data_to_send()
    received: list[Any] = []
    for chunk in chunked(out) if fdp.ConsumeBool() else [out]:
        received += ours.receive_data(chunk)
    # Handed up typed (Call, Result...), field for field what was sent.
    assert [list(m) for m in received] == expected, (received, expected)
    assert all(type(m) is MESSAGE_TYPES[m[0]] for m in received), received


# Every message type a side sends once open (PONG only as the answer to PING).
SENDABLE = [2, 3, 4, 5, 6, 7, 9]


def _text(fdp: Any) -> str:
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40)))


def _send(conn: Connection, kind: int, fdp: Any) -> list[Any] | None:
    """Send one message of type ``kind`` built from ``fdp``; what the peer must see."""
    if kind == 2:
        names = [_text(fdp) for _ in range(fdp.ConsumeIntInRange(0, 5))]
        routable = [_text(fdp) for _ in range(fdp.ConsumeIntInRange(0, 5))]
        capacity, window = fdp.ConsumeInt(8), fdp.ConsumeInt(8)
        draining = fdp.ConsumeBool()
        conn.send_announce(names, routable, capacity, window, draining)
        return [2, names, routable, capacity, window, draining]
    if kind == 3:
        call_id, name = fdp.ConsumeInt(9), _text(fdp)
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        timeout: float | None = None
        choice = fdp.ConsumeIntInRange(0, 2)
        if choice == 1:
            timeout = fdp.ConsumeRegularFloat()
        elif choice == 2:
            timeout = fdp.PickValueInList([math.inf, -math.inf, 0.0, -0.0, math.nan])
        route = fdp.ConsumeBool()
        conn.send_call(call_id, name, payload, timeout, route)  # NaN: ValueError
        return [3, call_id, name, payload, timeout, route]
    if kind == 4:
        call_id, payload = fdp.ConsumeInt(9), fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        conn.send_result(call_id, payload)
        return [4, call_id, payload]
    if kind == 5:
        call_id, error_kind = fdp.ConsumeInt(9), fdp.ConsumeIntInRange(0, 8)
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        conn.send_error(call_id, error_kind, payload)
        return [5, call_id, error_kind, payload]
    if kind == 6:
        call_id = fdp.ConsumeInt(9)
        conn.send_cancel(call_id)
        return [6, call_id]
    if kind == 7:
        conn.send_ping()  # answered by the peer itself, never handed up
        return None
    reason = _text(fdp)
    conn.send_goodbye(reason)
    return [9, reason]


_MSGPACK = MsgpackSerializer(max_message_size=1 << 20)


def msgpack_serializer(data: bytes) -> None:
    try:
        value = _MSGPACK.unpack(data)
    except SerializationError:
        return
    error = exception_from_payload(value)
    assert isinstance(error, BaseException)
    str(error)  # its text is shown to the caller: must not raise either
    # Whatever unpack makes, pack takes back, and it survives the trip.
    again = _MSGPACK.unpack(_MSGPACK.pack(value))
    assert same(value, again), (value, again)


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types, where a NaN equals a NaN."""
    return canonical(a) == canonical(b)


def canonical(value: Any) -> str:
    """A text naming the value and every type in it, the same for any set order."""
    kind = type(value).__name__
    if isinstance(value, list | tuple):
        return f"{kind}[{','.join(map(canonical, value))}]"
    if isinstance(value, dict):
        items = (f"{canonical(k)}:{canonical(v)}" for k, v in value.items())
        return f"{kind}{{{','.join(items)}}}"
    if isinstance(value, set | frozenset):
        return f"{kind}{{{','.join(sorted(map(canonical, value)))}}}"
    return f"{kind}:{value!r}"


_PICKLE = RestrictedPickleSerializer()


def restricted_pickle(data: bytes) -> None:
    with contextlib.suppress(SerializationError):
        _PICKLE.unpack(data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "handshake": handshake,
    "open_stream": open_stream,
    "open_frames": open_frames,
    "forged": forged,
    "roundtrip": roundtrip,
    "msgpack": msgpack_serializer,
    "restricted_pickle": restricted_pickle,
}
