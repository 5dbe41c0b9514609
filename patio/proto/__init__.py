"""The patio wire protocol as a sans-IO state machine.

Bytes go in through :meth:`Connection.receive_data`, typed events come out
(:class:`PeerAuthenticated`, then :data:`Message`: ``Call``, ``Result``...), bytes to
send are taken with :meth:`Connection.data_to_send`. Nothing here touches a
socket, an event loop or a clock, so every rule of the protocol can be tested
by feeding bytes.
"""

from patio.proto.connection import Connection, KeySet, PeerAuthenticated, Role
from patio.proto.messages import (
    DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    Announce,
    Call,
    Cancel,
    Error,
    ErrorKind,
    Goodbye,
    Load,
    Message,
    MessageType,
    Pong,
    Result,
    Status,
    StatusReply,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HANDSHAKE_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "Announce",
    "Call",
    "Cancel",
    "Connection",
    "Error",
    "ErrorKind",
    "Goodbye",
    "KeySet",
    "Load",
    "Message",
    "MessageType",
    "PeerAuthenticated",
    "Pong",
    "Result",
    "Role",
    "Status",
    "StatusReply",
]
