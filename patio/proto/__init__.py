"""The patio wire protocol as a sans-IO state machine.

Bytes go in through :meth:`Connection.receive_data`, events come out, bytes to
send are taken with :meth:`Connection.data_to_send`. Nothing here touches a
socket, an event loop or a clock, so every rule of the protocol can be tested
by feeding bytes.
"""

from patio.proto.connection import Connection, KeySet, PeerAuthenticated, Role
from patio.proto.messages import (
    DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    ErrorKind,
    MessageType,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HANDSHAKE_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "Connection",
    "ErrorKind",
    "KeySet",
    "MessageType",
    "PeerAuthenticated",
    "Role",
]
