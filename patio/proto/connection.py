"""The connection state machine: framing, handshake, message validation.

States and the only transitions between them::

    AWAIT_HELLO --HELLO ok--> AWAIT_AUTH --AUTH ok--> OPEN --close()--> CLOSED
         \\________________________\\___any violation____/--> CLOSED (ProtocolError)

Both sides send HELLO as soon as the connection starts (no side waits for the
other), so the handshake costs one round trip plus one flight:

1. HELLO carries the protocol version, the sender's node id, a per-process
   instance id, a fresh random nonce, its key's fingerprint and whether it
   authenticates frames (``frame_mac``; both sides must agree).
2. On the peer's HELLO each side sends AUTH: an HMAC-SHA256 with its primary
   key over its role (dialer or acceptor) and the transcript
   (:func:`patio.proto.session.transcript`): the protocol version, the
   ``frame_mac`` flag, both identities, both nonces and the TLS channel
   binding. Both nonces make a proof useless on any other connection (no
   replay); the role makes a proof useless when reflected back at its
   sender; the version, flag and binding make a proof fail when any of them
   was changed on the way, or when a relay terminates TLS on both sides.
3. A side that verifies the peer's AUTH against any key it accepts (constant
   time compare) is OPEN. Until then only HELLO and AUTH frames of at most
   ``HANDSHAKE_MAX_FRAME_SIZE`` bytes are accepted, and nothing is handed to
   a serializer.
4. From then on frames travel in records, each sealed with a tag under that
   direction's session key and its implicit sequence number
   (:mod:`patio.proto.session`); a record whose tag fails closes the link
   before any of its frames is decoded.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from math import isnan
from typing import Any, Final

import msgpack
from msgpack import unpackb

from patio.errors import (
    AuthenticationError,
    FrameAuthenticationError,
    FrameMacMismatchError,
    FrameTooLargeError,
    HandshakeError,
    NameTooLongError,
    ProtocolError,
    TooManyNamesError,
    VersionMismatchError,
)
from patio.proto import keys, session
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

_AUTH_CONTEXT: Final = b"patio-auth-v2"
_TAG_SIZE: Final = session.TAG_SIZE
#: Frame bytes several frames may share one record with (a larger frame has
#: a record of its own): a constant, so a peer's records never depend on its
#: own max_frame_size, only its frames do, as before records.
RECORD_BATCH: Final = 64 * 1024
_REFUSED_BODY: Final = msgpack.packb([int(MessageType.REFUSED)])
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


def _proof(key: bytes, role: Role, agreed: bytes) -> bytes:
    """The proof that the side in ``role`` holds ``key``, over the transcript."""
    return hmac.new(key, _AUTH_CONTEXT + role.value + agreed, hashlib.sha256).digest()


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
        frame_mac: bool = True,
        channel_binding: bytes = b"",
    ) -> None:
        if len(node_id) > MAX_NODE_ID_LENGTH:
            raise ValueError(f"node id longer than {MAX_NODE_ID_LENGTH} characters")
        self.role = role
        self.node_id = node_id
        self.instance = instance
        self.keys = keys
        self.max_frame_size = max_frame_size
        #: Whether frames after the handshake carry a MAC (both sides must agree).
        self.frame_mac = frame_mac
        #: What identifies the TLS channel under this connection (b"" without
        #: TLS); may be set until the peer's HELLO arrives (the link knows it
        #: only once TLS is up, after the HELLO was queued).
        self.channel_binding = channel_binding
        self.state = State.AWAIT_HELLO
        self.peer: PeerAuthenticated | None = None
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        self._peer_nonce = b""
        self._peer_identity = ("", "")
        self._peer_fingerprint = ""  # of the key it presents, from its HELLO (if it sent one)
        self._agreed = b""  # the transcript both proofs cover (session.transcript)
        # Per-direction MACs, from the handshake on (None: frames are not
        # authenticated, before the handshake or with frame_mac off).
        self._send_mac: session.FrameMac | None = None
        self._receive_mac: session.FrameMac | None = None
        self._in = bytearray()
        self._out = bytearray()
        # Frames not yet sealed into a record: _out itself until frames are
        # authenticated, then a buffer sealed into _out by _seal.
        self._pending = self._out
        self._record_room = sys.maxsize  # most frame bytes one record may hold
        self._packer = msgpack.Packer(use_bin_type=True)
        #: Called when output is queued while none was waiting (the driver
        #: schedules a write): every send_* is then the whole of a send.
        self.on_output: Callable[[], None] | None = None
        # The key's fingerprint is safe to publish (keys.py) and lets a side
        # that refuses our proof name both keys in one log line.
        self._queue(
            [MessageType.HELLO, MAGIC, PROTOCOL_VERSION, node_id, instance, self._nonce,
             self.keys.fingerprint, frame_mac]
        )  # fmt: skip

    # -- output -------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call, as one chunk.

        With authenticated frames, what was queued since the last call is
        sealed here into one record: one tag per write, not per frame.
        """
        if self._pending is not self._out and self._pending:
            self._seal()
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def pending_output(self) -> int:
        pending = self._pending
        return len(self._out) + (len(pending) if pending is not self._out else 0)

    def _queue(self, message: list[Any]) -> None:
        self.send_frame(self._packer.pack(message))

    def send_frame(self, body: bytes) -> None:
        """Queue one frame carrying ``body`` as is, authenticated once the link is.

        Every send_* method ends here. Tests and tools use it to send what no
        send_* method would; ``body`` is not checked.
        """
        pending = self._pending
        if pending and len(pending) + 4 + len(body) > self._record_room:
            self._seal()  # several frames share a record up to RECORD_BATCH bytes
        if not pending and not self._out and self.on_output is not None:
            self.on_output()
        pending += HEADER.pack(len(body))
        pending += body

    def _seal(self) -> None:
        """Move the pending frames into the output as one authenticated record."""
        pending = self._pending
        mac = self._send_mac
        assert mac is not None and pending is not self._out
        length = len(pending) + _TAG_SIZE
        out = self._out
        out += HEADER.pack(length)
        out += pending
        out += mac.tag(length, pending)
        pending.clear()

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
        self.send_frame(self._packer.pack([3, call_id, name, payload, timeout, route]))

    def send_result(self, call_id: int, payload: bytes) -> None:
        if self.state is not State.OPEN:
            self._require_open()
        self.send_frame(self._packer.pack([4, call_id, payload]))

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
        # Frames are decoded from a view of the buffer, not copies of it (a
        # 64 KiB argument is copied once less); the view is released before
        # the buffer is trimmed, which a live view would forbid.
        view = memoryview(buf)
        try:
            if self.state is not State.OPEN:
                pos = self._frames(view, 0, len(buf), HANDSHAKE_MAX_FRAME_SIZE, events)
            if self.state is State.OPEN:
                if self._receive_mac is None:
                    pos = self._frames(view, pos, len(buf), self.max_frame_size, events)
                else:
                    pos = self._records(view, pos, events)
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

    def _frames(
        self,
        view: memoryview,
        pos: int,
        end: int,
        limit: int,
        events: list[PeerAuthenticated | Message],
    ) -> int:
        """Decode the whole frames in ``view[pos:end]``; return where the first partial one starts.

        Before authentication it stops after the frame that opens the link:
        what follows is in records (with authenticated frames).
        """
        handshaking = self.state is not State.OPEN
        event: PeerAuthenticated | Message | None
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(view, pos)
            if size > limit:
                raise FrameTooLargeError(
                    f"frame of {size} bytes exceeds the limit of {limit} bytes"
                    + (" before authentication" if handshaking else "")
                )
            if end - pos - 4 < size:
                break
            start = pos + 4
            pos = start + size
            try:
                message = unpackb(view[start:pos], raw=False, strict_map_key=False)
            except Exception as exc:
                raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
            if handshaking:
                event = self._handshake(message)
                if event is not None:
                    events.append(event)
                if self.state is State.OPEN:
                    break
                continue
            if (event := _fast_event(message)) is None:
                event = self._message(message)
            if event is not None:
                events.append(event)
        return pos

    def _records(
        self, view: memoryview, pos: int, events: list[PeerAuthenticated | Message]
    ) -> int:
        """Verify and decode the whole records in ``view[pos:]``; return where the rest starts."""
        end = len(view)
        limit = self.max_frame_size + 4 + _TAG_SIZE
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(view, pos)
            if size > limit:
                raise FrameTooLargeError(
                    f"record of {size} bytes exceeds the limit of {limit} bytes (a frame of "
                    f"at most {self.max_frame_size} bytes and its MAC)"
                )
            if end - pos - 4 < size:
                break
            start = pos + 4
            pos = start + size
            # Nothing of a record is decoded before its tag is checked.
            stop = self._verify(view, start, pos)
            if self._frames(view, start, stop, self.max_frame_size, events) != stop:
                raise ProtocolError("a frame crosses the end of its record")
        return pos

    def _verify(self, view: memoryview, start: int, end: int) -> int:
        """Check the tag of the record at ``view[start:end]``; return where its frames end."""
        mac = self._receive_mac
        assert mac is not None
        stop = end - _TAG_SIZE
        sequence = mac.sequence
        if stop >= start and hmac.compare_digest(
            mac.tag(end - start, view[start:stop]), view[stop:end]
        ):
            return stop
        if sequence == 0 and view[start:end] == _REFUSED_BODY:
            # The peer refused our proof after we accepted its own: it never
            # opened, so its REFUSED has no tag. Forging one only closes the
            # link, which anyone on the path can do anyway.
            raise self._refused()
        raise FrameAuthenticationError(
            f"frame authentication failed: record {sequence} after the handshake "
            f"({end - start} bytes) from peer {self._peer_identity[0]!r} does not carry its "
            "MAC; it was injected, changed, replayed, reordered, reflected or a record before "
            "it was dropped on the way (none of its frames was used; the link is closed)"
        )

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
        if len(message) != 8:
            raise HandshakeError("HELLO has the wrong number of fields")
        _, _, _, node_id, instance, nonce, fingerprint, frame_mac = message
        if (
            type(fingerprint) is not str
            or len(fingerprint) > MAX_FINGERPRINT_LENGTH
            or type(frame_mac) is not bool
        ):
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
        if frame_mac is not self.frame_mac:
            raise FrameMacMismatchError(
                f"peer {node_id!r} has frame authentication "
                f"{'on' if frame_mac else 'off'} and this side has it "
                f"{'on' if self.frame_mac else 'off'}: both ends must agree; start both ends "
                "with --no-frame-mac (frame_mac=False, benchmarks on loopback only), or neither"
            )
        own = (self.node_id, self.instance)
        if self.role is Role.DIALER:
            ids, nonces = (own, self._peer_identity), (self._nonce, nonce)
        else:
            ids, nonces = (self._peer_identity, own), (nonce, self._nonce)
        self._agreed = session.transcript(
            PROTOCOL_VERSION, self.frame_mac, *ids, *nonces, self.channel_binding
        )
        self._queue([MessageType.AUTH, _proof(self.keys.primary, self.role, self._agreed)])
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
        peer_key: bytes | None = None
        for key in self.keys.all_accepted():
            # Check every key so the time taken does not say which one matched.
            if hmac.compare_digest(_proof(key, peer_role, self._agreed), message[1]):
                peer_key = key
        if peer_key is None:
            # Tell the peer it was refused, and nothing else: it stops retrying.
            self._queue([MessageType.REFUSED])
            raise AuthenticationError(self._refusal())
        if self.frame_mac:
            own_key = self.keys.primary
            if self.role is Role.DIALER:
                keys = (own_key, peer_key, self._nonce, self._peer_nonce)
            else:
                keys = (peer_key, own_key, self._peer_nonce, self._nonce)
            to_acceptor, to_dialer = session.session_keys(*keys, self._agreed)
            dialing = self.role is Role.DIALER
            self._send_mac = session.FrameMac(to_acceptor if dialing else to_dialer)
            self._receive_mac = session.FrameMac(to_dialer if dialing else to_acceptor)
            self._pending = bytearray()
            self._record_room = RECORD_BATCH
        self.state = State.OPEN
        self.peer = PeerAuthenticated(
            self._peer_identity[0], self._peer_identity[1], PROTOCOL_VERSION
        )
        return self.peer

    def _refusal(self) -> str:
        """Why the peer's proof did not verify, as precisely as this side can tell."""
        peer = self._peer_identity[0]
        ours = self.keys.fingerprint
        theirs = self._peer_fingerprint
        shared = {keys.fingerprint(key) for key in self.keys.all_accepted()}
        if theirs and theirs != keys.WEAK_KEY_FINGERPRINT and theirs in shared:
            # It presents a key we accept, yet its proof does not verify: what
            # the proof covers differs between the two sides.
            where = (
                "the TLS channel binding differs, so a relay terminates TLS between us "
                "(configure a CA so both sides verify certificates), or "
                if self.channel_binding
                else ""
            )
            return (
                f"peer {peer!r} presents a key we accept (fingerprint {theirs}) but its "
                f"proof does not verify: the handshake was altered on the way ({where}an "
                "on-path attacker changed it)"
            )
        named = f", its key's is {theirs}" if theirs else ""
        return (
            f"peer {peer!r} did not prove it holds an accepted key (our key's fingerprint is "
            f"{ours}{named}); give both sides the same key"
        )
