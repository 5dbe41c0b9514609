"""Message types, limits and the shape rules every frame is checked against.

A frame on the wire is a 4-byte big-endian length followed by that many bytes
of one msgpack array whose first element is the message type::

    HELLO     [0, "patio", version, node_id, instance, nonce, key_fingerprint, frame_mac]
    AUTH      [1, proof]
    ANNOUNCE  [2, names, routable, capacity, window, draining]
    CALL      [3, call_id, name, payload, timeout, route]
    RESULT    [4, call_id, payload]
    ERROR     [5, call_id, kind, payload]
    CANCEL    [6, call_id]
    PING      [7]
    PONG      [8]
    GOODBYE   [9, reason]
    REFUSED   [10]
    STATUS    [11, request_id, gather]
    STATUS_REPLY [12, request_id, members]
    LOAD      [13, load]

REFUSED is the last frame a side sends when the peer's AUTH does not verify
against any key it accepts: it tells the peer that it was refused (so the
peer fails at once instead of retrying as if the network failed) and nothing
more.

STATUS asks the receiver how it is; with ``gather`` it also asks every
mesh member it is connected to (with ``gather`` false, so nothing fans out
twice) and answers for all of them. ``members`` is a list of maps, one per
member, of plain values (docs/protocol.md lists the keys); they are broker
facts, not user data, and are checked field by field by whoever reads them.

LOAD tells a peer how many calls the sender's executor has running or
queued (``load``, an int >= 0), so a peer routing calls compares members by
their real load, not only by the calls it sent them itself. It is sent
while the figure changes, a few times a second at most, and never when idle.

``names`` are the tasks the sender executes itself; ``routable`` the further
tasks it will forward to a mesh peer for a caller that sets ``route``.
``payload`` is opaque bytes made by the broker's serializer: this layer never
deserializes user data, so nothing a peer sends reaches a serializer before
the handshake has authenticated it. Calls are small arrays rather than maps
because they are built and parsed on the hot path.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Final, NamedTuple

PROTOCOL_VERSION: Final = 2
MAGIC: Final = "patio"

HEADER: Final = struct.Struct(">I")

# 16 MiB: large enough for the megabyte-sized arguments people do send through
# RPC, small enough that one peer cannot make us buffer an unbounded frame.
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024

# Before a peer has authenticated it can only send HELLO and AUTH, both tiny.
# Capping their size caps what an anonymous connection can make us hold.
HANDSHAKE_MAX_FRAME_SIZE: Final = 1024

NONCE_SIZE: Final = 32
MAX_NODE_ID_LENGTH: Final = 253  # a DNS name / pod name fits
MAX_NAME_LENGTH: Final = 1024
MAX_ANNOUNCED_NAMES: Final = 100_000


class MessageType(enum.IntEnum):
    HELLO = 0
    AUTH = 1
    ANNOUNCE = 2
    CALL = 3
    RESULT = 4
    ERROR = 5
    CANCEL = 6
    PING = 7
    PONG = 8
    GOODBYE = 9
    REFUSED = 10
    STATUS = 11
    STATUS_REPLY = 12
    LOAD = 13


class ErrorKind(enum.IntEnum):
    """Why a call failed on the far side; the payload's meaning depends on it."""

    EXCEPTION = 0  # the task raised: payload is a serialized exception description
    NOT_FOUND = 1  # no such task on that peer: payload is a UTF-8 message
    NO_ROUTE = 2  # a forwarding peer found nobody serving the name
    REFUSED = 3  # the executor refused (NullExecutor, shut down)
    TIMEOUT = 4  # the deadline passed before or while the task ran
    CANCELLED = 5  # the work was cancelled on the executing side
    CONNECTION = 6  # a forwarded call lost its connection
    SERIALIZATION = 7  # arguments or result could not be (de)serialized
    OVERLOADED = 8  # the peer got more calls than the window it announced


# Post-handshake messages: type -> (length, element checks). A check is a
# tuple of accepted Python types for the element at that index (index 0 is the
# type code itself and is not checked again).
_INT = (int,)
_STR = (str,)
_BYTES = (bytes,)
_BOOL = (bool,)
_OPT_NUMBER = (int, float, type(None))
_LIST = (list,)

SHAPES: Final[dict[int, tuple[tuple[type, ...], ...]]] = {
    MessageType.ANNOUNCE: ((), _LIST, _LIST, _INT, _INT, _BOOL),
    MessageType.CALL: ((), _INT, _STR, _BYTES, _OPT_NUMBER, _BOOL),
    MessageType.RESULT: ((), _INT, _BYTES),
    MessageType.ERROR: ((), _INT, _INT, _BYTES),
    MessageType.CANCEL: ((), _INT),
    MessageType.PING: ((),),
    MessageType.PONG: ((),),
    MessageType.GOODBYE: ((), _STR),
    MessageType.REFUSED: ((),),
    MessageType.STATUS: ((), _INT, _BOOL),
    MessageType.STATUS_REPLY: ((), _INT, _LIST),
    MessageType.LOAD: ((), _INT),
}


# -- the typed messages a connection hands up -----------------------------------
#
# Each is a tuple in wire order, its type code first: typed fields for the
# reader, and no copy of the decoded array to build one (``tuple.__new__``
# over the list msgpack made). Indexing (``message[1]``) works as on the wire.


class Announce(NamedTuple):
    kind: int
    names: list[Any]  # validated as a list; non-string entries are the reader's to drop
    routable: list[Any]
    capacity: int
    window: int
    draining: bool


class Call(NamedTuple):
    kind: int
    call_id: int
    name: str
    payload: bytes
    timeout: float | None
    route: bool


class Result(NamedTuple):
    kind: int
    call_id: int
    payload: bytes


class Error(NamedTuple):
    kind: int
    call_id: int
    error_kind: int
    payload: bytes


class Cancel(NamedTuple):
    kind: int
    call_id: int


class Pong(NamedTuple):
    kind: int


class Goodbye(NamedTuple):
    kind: int
    reason: str


class Status(NamedTuple):
    kind: int
    request_id: int
    gather: bool


class StatusReply(NamedTuple):
    kind: int
    request_id: int
    members: list[Any]  # maps of plain values, checked field by field by the reader


class Load(NamedTuple):
    kind: int
    load: int  # calls running or queued on the sender's executor; checked >= 0 by the reader


Message = Announce | Call | Result | Error | Cancel | Pong | Goodbye | Status | StatusReply | Load

#: The type each post-handshake message code is handed up as (PING and
#: REFUSED are handled by the connection itself and never handed up).
MESSAGE_TYPES: Final[dict[int, type[Message]]] = {
    MessageType.ANNOUNCE: Announce,
    MessageType.CALL: Call,
    MessageType.RESULT: Result,
    MessageType.ERROR: Error,
    MessageType.CANCEL: Cancel,
    MessageType.PONG: Pong,
    MessageType.GOODBYE: Goodbye,
    MessageType.STATUS: Status,
    MessageType.STATUS_REPLY: StatusReply,
    MessageType.LOAD: Load,
}


def shape_error(message: Any) -> str | None:
    """Return why ``message`` is not a well-formed post-handshake message, or None."""
    if type(message) is not list or not message:
        return "frame is not a non-empty array"
    kind = message[0]
    shape = SHAPES.get(kind) if type(kind) is int else None
    if shape is None:
        return f"unknown or unexpected message type {kind!r}"
    if len(message) != len(shape):
        return f"{MessageType(kind).name} has {len(message)} fields, expected {len(shape)}"
    for index in range(1, len(shape)):
        value = message[index]
        if type(value) not in shape[index]:
            return (
                f"{MessageType(kind).name} field {index} is {type(value).__name__}, "
                f"expected {'/'.join(t.__name__ for t in shape[index])}"
            )
    return None
