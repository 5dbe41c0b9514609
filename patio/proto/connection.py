"""The connection state machine: framing, handshake, message validation.

States and the only transitions between them::

    AWAIT_HELLO --HELLO ok--> AWAIT_AUTH --AUTH ok--> OPEN --close()--> CLOSED
         \\________________________\\___any violation____/--> CLOSED (ProtocolError)

Both sides send HELLO as soon as the connection starts (no side waits for the
other), so the handshake costs one round trip plus one flight:

1. HELLO carries the protocol version, the sender's node id, a per-process
   instance id and a fresh random nonce.
2. On the peer's HELLO each side sends AUTH: an HMAC-SHA256 with its primary
   key over both nonces, both identities and its role (dialer or acceptor).
   Both nonces make a proof useless on any other connection (no replay); the
   role makes a proof useless when reflected back at its sender.
3. A side that verifies the peer's AUTH against any key it accepts (constant
   time compare) is OPEN. Until then only HELLO and AUTH frames of at most
   ``HANDSHAKE_MAX_FRAME_SIZE`` bytes are accepted, and nothing is handed to
   a serializer.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from math import isnan
from typing import Any, Final

import msgpack
from msgpack import unpackb

from patio.errors import (
    AuthenticationError,
    FrameTooLargeError,
    HandshakeError,
    NameTooLongError,
    ProtocolError,
    TooManyNamesError,
    VersionMismatchError,
)
from patio.proto import keys
from patio.proto.messages import (
    DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_MAX_FRAME_SIZE,
    HEADER,
    MAGIC,
    MAX_ANNOUNCED_NAMES,
    MAX_NAME_LENGTH,
    MAX_NODE_ID_LENGTH,
    MESSAGE_TYPES,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Call,
    Message,
    MessageType,
    Result,
    shape_error,
)

_AUTH_CONTEXT: Final = b"patio-auth-v1"
MAX_FINGERPRINT_LENGTH: Final = 64


class Role(enum.Enum):
    DIALER = b"D"
    ACCEPTOR = b"A"


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class KeySet:
    """The key a side proves itself with, and every key it accepts from peers.

    Holding two keys at once (the current one and the next) is what lets a
    cluster rotate its key without a moment in which two members disagree.
    """

    primary: bytes
    accepted: tuple[bytes, ...] = ()

    def all_accepted(self) -> tuple[bytes, ...]:
        return (self.primary, *(k for k in self.accepted if k != self.primary))

    @property
    def fingerprint(self) -> str:
        """A digest naming the primary key without revealing it (keys.fingerprint)."""
        return keys.fingerprint(self.primary)


@dataclass(frozen=True, slots=True)
class PeerAuthenticated:
    """The event that ends the handshake: the peer holds one of our keys."""

    node_id: str
    instance: str
    version: int


_new = tuple.__new__
# The hot path compares plain ints: an IntEnum member is a slower lookup.
_CALL: Final = int(MessageType.CALL)
_RESULT: Final = int(MessageType.RESULT)


def _fast_event(message: Any) -> Result | Call | None:
    """A well-formed RESULT or CALL, typed; None for anything else (checked slowly).

    The hot path of the read loop: one call, type checks only, no shape_error.
    """
    if type(message) is not list:
        return None
    size = len(message)
    if size == 3:
        kind, call_id, payload = message
        if (
            kind == _RESULT
            and type(kind) is int
            and type(call_id) is int
            and type(payload) is bytes
        ):
            return _new(Result, message)
        return None
    if size != 6:
        return None
    kind, call_id, name, payload, timeout, route = message
    good = (
        kind == _CALL
        and type(kind) is int
        and type(call_id) is int
        and type(name) is str
        and type(payload) is bytes
        and type(route) is bool
        and len(name) <= MAX_NAME_LENGTH
        # None, an int, or a float that is not NaN
        and (
            timeout is None
            or type(timeout) is int
            or (type(timeout) is float and not isnan(timeout))
        )
    )
    return _new(Call, message) if good else None


def _checked_call(message: list[Any]) -> list[Any]:
    """``message`` if it is a well-formed CALL, else ProtocolError."""
    _, call_id, name, payload, timeout, route = message
    if (
        type(call_id) is not int
        or type(name) is not str
        or type(payload) is not bytes
        or type(route) is not bool
        or (timeout is not None and type(timeout) is not int and type(timeout) is not float)
    ):
        raise ProtocolError(shape_error(message) or "malformed CALL")
    if len(name) > MAX_NAME_LENGTH:
        raise NameTooLongError(_name_too_long("CALL", name))
    if type(timeout) is float and isnan(timeout):
        # A NaN deadline in the event loop's timer heap breaks its order:
        # every timer of the process would fire at once.
        raise ProtocolError("CALL timeout is NaN")
    return message


def _name_too_long(where: str, name: str) -> str:
    return (
        f"{where} names a task of {len(name)} characters, over the limit of "
        f"{MAX_NAME_LENGTH}: {name[:40]!r}..."
    )


def _check_announce(message: list[Any]) -> None:
    """Bound what one ANNOUNCE makes a peer keep: how many names, how long each."""
    for names in (message[1], message[2]):
        if len(names) > MAX_ANNOUNCED_NAMES:
            raise TooManyNamesError(
                f"ANNOUNCE lists {len(names)} names, over the limit of {MAX_ANNOUNCED_NAMES}"
            )
        for name in names:
            if type(name) is str and len(name) > MAX_NAME_LENGTH:
                raise NameTooLongError(_name_too_long("ANNOUNCE", name))


def _proof(
    key: bytes,
    role: Role,
    own_nonce: bytes,
    peer_nonce: bytes,
    own_identity: tuple[str, str],
    peer_identity: tuple[str, str],
) -> bytes:
    packed = msgpack.packb(
        [role.value, own_nonce, peer_nonce, list(own_identity), list(peer_identity)]
    )
    return hmac.new(key, _AUTH_CONTEXT + packed, hashlib.sha256).digest()


class Connection:
    """One side of one connection. Feed it bytes, read events and bytes back."""

    def __init__(
        self,
        role: Role,
        node_id: str,
        instance: str,
        keys: KeySet,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        nonce: bytes | None = None,
    ) -> None:
        if len(node_id) > MAX_NODE_ID_LENGTH:
            raise ValueError(f"node id longer than {MAX_NODE_ID_LENGTH} characters")
        self.role = role
        self.node_id = node_id
        self.instance = instance
        self.keys = keys
        self.max_frame_size = max_frame_size
        self.state = State.AWAIT_HELLO
        self.peer: PeerAuthenticated | None = None
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        self._peer_nonce = b""
        self._peer_identity = ("", "")
        self._peer_fingerprint = ""  # of the key it presents, from its HELLO (if it sent one)
        self._in = bytearray()
        self._out = bytearray()
        self._packer = msgpack.Packer(use_bin_type=True)
        #: Called when output is queued while none was waiting (the driver
        #: schedules a write): every send_* is then the whole of a send.
        self.on_output: Callable[[], None] | None = None
        # The key's fingerprint is safe to publish (keys.py) and lets a side
        # that refuses our proof name both keys in one log line.
        self._queue(
            [MessageType.HELLO, MAGIC, PROTOCOL_VERSION, node_id, instance, self._nonce,
             self.keys.fingerprint]
        )  # fmt: skip

    # -- output -------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call, as one chunk."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def _queue(self, message: list[Any]) -> None:
        body = self._packer.pack(message)
        out = self._out
        if not out and self.on_output is not None:
            self.on_output()
        out += HEADER.pack(len(body))
        out += body

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise ProtocolError(f"cannot send in state {self.state.value}")

    def send_announce(
        self, names: list[str], routable: list[str], capacity: int, window: int, draining: bool
    ) -> None:
        self._require_open()
        try:
            _check_announce([MessageType.ANNOUNCE, names, routable])
        except ProtocolError as exc:  # the peer would close the link: refuse it here
            raise ValueError(str(exc)) from None
        self._queue([MessageType.ANNOUNCE, names, routable, capacity, window, draining])

    def send_call(
        self, call_id: int, name: str, payload: bytes, timeout: float | None, route: bool
    ) -> None:
        # Hot path: no state check beyond the one that matters.
        if self.state is not State.OPEN:
            self._require_open()
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(_name_too_long("CALL", name))
        if type(timeout) is float and isnan(timeout):  # the peer would close the link
            raise ValueError("CALL timeout is NaN")
        body = self._packer.pack([3, call_id, name, payload, timeout, route])
        out = self._out
        if not out and self.on_output is not None:
            self.on_output()
        out += HEADER.pack(len(body))
        out += body

    def send_result(self, call_id: int, payload: bytes) -> None:
        if self.state is not State.OPEN:
            self._require_open()
        body = self._packer.pack([4, call_id, payload])
        out = self._out
        if not out and self.on_output is not None:
            self.on_output()
        out += HEADER.pack(len(body))
        out += body

    def send_error(self, call_id: int, kind: int, payload: bytes) -> None:
        self._require_open()
        self._queue([MessageType.ERROR, call_id, int(kind), payload])

    def send_cancel(self, call_id: int) -> None:
        self._require_open()
        self._queue([MessageType.CANCEL, call_id])

    def send_ping(self) -> None:
        self._require_open()
        self._queue([MessageType.PING])

    def send_goodbye(self, reason: str) -> None:
        self._require_open()
        self._queue([MessageType.GOODBYE, reason])

    def send_status(self, request_id: int, gather: bool) -> None:
        self._require_open()
        self._queue([MessageType.STATUS, request_id, gather])

    def send_status_reply(self, request_id: int, members: list[dict[str, Any]]) -> None:
        self._require_open()
        self._queue([MessageType.STATUS_REPLY, request_id, members])

    def send_load(self, load: int) -> None:
        self._require_open()
        self._queue([MessageType.LOAD, load])

    def close(self) -> None:
        self.state = State.CLOSED

    # -- input --------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[PeerAuthenticated | Message]:
        """Consume bytes; return the events they complete.

        Events are :class:`PeerAuthenticated` once, then typed messages
        (:data:`~patio.proto.messages.Message`: ``Call``, ``Result``...),
        validated field by field. PING is answered here and never returned.
        Raises :class:`ProtocolError` (or a subclass) on any violation; the
        connection is CLOSED then.
        """
        if self.state is State.CLOSED:
            return []
        buf = self._in
        buf += data
        events: list[PeerAuthenticated | Message] = []
        pos = 0
        end = len(buf)
        opened = self.state is State.OPEN
        limit = self.max_frame_size if opened else HANDSHAKE_MAX_FRAME_SIZE
        # Frames are decoded from a view of the buffer, not copies of it (a
        # 64 KiB argument is copied once less); the view is released before
        # the buffer is trimmed, which a live view would forbid.
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(buf, pos)
                if size > limit:
                    raise FrameTooLargeError(
                        f"frame of {size} bytes exceeds the limit of {limit} bytes"
                        + ("" if opened else " before authentication")
                    )
                if end - pos - 4 < size:
                    break
                start = pos + 4
                pos = start + size
                try:
                    message = unpackb(view[start:pos], raw=False, strict_map_key=False)
                except Exception as exc:
                    raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
                event: PeerAuthenticated | Message | None
                if not opened:
                    event = self._handshake(message)
                    opened = self.state is State.OPEN
                    limit = self.max_frame_size if opened else HANDSHAKE_MAX_FRAME_SIZE
                elif (event := _fast_event(message)) is None:
                    event = self._message(message)
                if event is not None:
                    events.append(event)
        except ProtocolError:
            view.release()
            self.state = State.CLOSED
            buf.clear()
            raise
        finally:
            view.release()  # idempotent
        if pos:
            del buf[:pos]
        return events

    def _message(self, message: Any) -> Message | None:
        """Check one post-handshake message and type it; None for what is handled here."""
        if (
            type(message) is list
            and len(message) == 6
            and message[0] == _CALL
            and type(message[0]) is int
        ):
            # Hot path: a CALL is checked field by field, without shape_error.
            return _new(Call, _checked_call(message))
        problem = shape_error(message)
        if problem is not None:
            raise ProtocolError(problem)
        kind = message[0]
        if kind == MessageType.ANNOUNCE:
            _check_announce(message)
        elif kind == MessageType.PING:
            self._queue([MessageType.PONG])
            return None
        elif kind == MessageType.REFUSED:
            raise self._refused()
        return _new(MESSAGE_TYPES[kind], message)

    def _refused(self) -> AuthenticationError:
        self.state = State.CLOSED
        theirs = f", its key's is {self._peer_fingerprint}" if self._peer_fingerprint else ""
        return AuthenticationError(
            f"peer {self._peer_identity[0]!r} refused our key (fingerprint "
            f"{self.keys.fingerprint}{theirs}); give both sides the same key"
        )

    def _on_hello(self, kind: int, message: list[Any]) -> None:
        """Check the peer's HELLO and answer it with our AUTH."""
        if kind != MessageType.HELLO:
            raise HandshakeError(f"expected HELLO, got message type {kind}")
        if len(message) < 3 or message[1] != MAGIC:
            raise HandshakeError("peer is not speaking the patio protocol")
        version = message[2]
        if version != PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"peer speaks protocol version {version!r}, this side speaks {PROTOCOL_VERSION}"
            )
        if len(message) not in (6, 7):  # the fingerprint came later: optional
            raise HandshakeError("HELLO has the wrong number of fields")
        _, _, _, node_id, instance, nonce = message[:6]
        fingerprint = message[6] if len(message) == 7 else ""
        if type(fingerprint) is not str or len(fingerprint) > MAX_FINGERPRINT_LENGTH:
            raise HandshakeError("HELLO fields are malformed")
        self._peer_fingerprint = fingerprint
        if (
            type(node_id) is not str
            or type(instance) is not str
            or type(nonce) is not bytes
            or len(nonce) != NONCE_SIZE
            or len(node_id) > MAX_NODE_ID_LENGTH
            or len(instance) > MAX_NODE_ID_LENGTH
        ):
            raise HandshakeError("HELLO fields are malformed")
        if nonce == self._nonce:
            raise HandshakeError("peer echoed our nonce")
        self._peer_nonce = nonce
        self._peer_identity = (node_id, instance)
        own_identity = (self.node_id, self.instance)
        proof = _proof(
            self.keys.primary,
            self.role,
            self._nonce,
            nonce,
            own_identity,
            self._peer_identity,
        )
        self._queue([MessageType.AUTH, proof])
        self.state = State.AWAIT_AUTH

    def _handshake(self, message: Any) -> PeerAuthenticated | None:
        if type(message) is not list or not message or type(message[0]) is not int:
            raise HandshakeError("handshake frame is not a message array")
        kind = message[0]
        if self.state is State.AWAIT_HELLO:
            self._on_hello(kind, message)
            return None
        # AWAIT_AUTH
        if kind == MessageType.REFUSED:
            raise self._refused()
        if kind != MessageType.AUTH or len(message) != 2 or type(message[1]) is not bytes:
            raise HandshakeError(f"expected AUTH, got message type {kind}")
        peer_role = Role.ACCEPTOR if self.role is Role.DIALER else Role.DIALER
        own_identity = (self.node_id, self.instance)
        matched = False
        for key in self.keys.all_accepted():
            expected = _proof(
                key, peer_role, self._peer_nonce, self._nonce, self._peer_identity, own_identity
            )
            # Check every key so the time taken does not say which one matched.
            matched |= hmac.compare_digest(expected, message[1])
        if not matched:
            # Tell the peer it was refused, and nothing else: it stops retrying.
            self._queue([MessageType.REFUSED])
            theirs = f", its key's is {self._peer_fingerprint}" if self._peer_fingerprint else ""
            raise AuthenticationError(
                f"peer {self._peer_identity[0]!r} did not prove it holds an accepted key "
                f"(our key's fingerprint is {self.keys.fingerprint}{theirs}); give both sides "
                "the same key"
            )
        self.state = State.OPEN
        self.peer = PeerAuthenticated(self._peer_identity[0], self._peer_identity[1], 1)
        return self.peer
