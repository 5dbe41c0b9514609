"""One exception hierarchy for patio.

Every error patio raises derives from :class:`PatioError`. Where code written
for the original patio expected a builtin (a timeout, a connection error, a
missing key), the patio error also derives from that builtin so ``except``
clauses written for the original keep working.
"""

from __future__ import annotations

import pickle
from typing import ClassVar


class PatioError(Exception):
    """Base class of every error raised by patio itself."""


class RegistryLockedError(PatioError, RuntimeError):
    """The registry was locked by a broker and can no longer be changed."""


class TaskNotFoundError(PatioError, KeyError):
    """No function is registered under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a sentence
        return str(self.args[0]) if self.args else "task not found"


class ExecutionRefusedError(PatioError, RuntimeError):
    """The executor will not run anything (``NullExecutor``) or is shut down."""


class RemoteError(PatioError):
    """An exception raised on the executing side that could not be rebuilt here.

    It carries the remote type name, message and formatted traceback so the
    caller can still see what happened.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback


class NoRouteError(PatioError, TimeoutError):
    """No connected peer serves the requested task name.

    It is a ``TimeoutError`` because the original patio reported this case as a
    timeout; code that caught that keeps working.
    """


class CallTimeoutError(PatioError, TimeoutError):
    """The call's deadline passed before a result arrived."""


class PeerConnectionError(PatioError, ConnectionError):
    """The connection carrying a call was lost, or no connection could be made."""


class PeersUnreachableError(PeerConnectionError):
    """No connected peer serves the task and every other known peer refuses connections.

    ``peers`` names the addresses tried. Unlike :class:`NoRouteError` it does
    not mean nobody serves the task: the peers that might are down.
    """

    def __init__(self, message: str, peers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.peers = peers


class ProtocolError(PatioError):
    """A peer sent bytes that break the wire protocol (malformed or oversized).

    ``reason`` is a short fixed label for metrics, set by each subclass, so
    nobody has to read it out of the message.
    """

    reason: ClassVar[str] = "malformed"


class FrameTooLargeError(ProtocolError):
    """A frame announced a size over the limit."""

    reason: ClassVar[str] = "oversized"


class NameTooLongError(ProtocolError):
    """A task name in a CALL or ANNOUNCE is longer than ``MAX_NAME_LENGTH``."""

    reason: ClassVar[str] = "name_too_long"


class TooManyNamesError(ProtocolError):
    """An ANNOUNCE lists more than ``MAX_ANNOUNCED_NAMES`` names."""

    reason: ClassVar[str] = "too_many_names"


class FrameAuthenticationError(ProtocolError):
    """A frame after the handshake does not carry its MAC: injected, changed,
    replayed, reordered, reflected, or one before it was dropped."""

    reason: ClassVar[str] = "frame_auth"


class HandshakeError(ProtocolError):
    """The hello exchange failed: wrong version, timeout or malformed hello."""


class FrameMacMismatchError(HandshakeError):
    """One side authenticates frames and the other does not (``frame_mac``)."""

    reason: ClassVar[str] = "frame_mac"


class VersionMismatchError(HandshakeError):
    """The peer speaks another version of the wire protocol."""

    reason: ClassVar[str] = "version"


class AuthenticationError(HandshakeError):
    """The peer could not prove it holds the shared key, or refused ours."""

    reason: ClassVar[str] = "auth"


class KeyMismatchError(AuthenticationError, PeerConnectionError):
    """``connect()`` failed because one side refused the other's key.

    It is raised at once (retrying cannot help until a key changes), and is
    also a :class:`PeerConnectionError` because that is what a failed
    ``connect()`` raises otherwise.
    """


class FrameMacRefusedError(FrameMacMismatchError, PeerConnectionError):
    """``connect()`` failed because the two ends' ``frame_mac`` settings differ.

    Like :class:`KeyMismatchError` it is raised at once (retrying cannot help
    until one end is restarted with the other setting) and is also a
    :class:`PeerConnectionError`, what a failed ``connect()`` raises otherwise.
    """


class WeakKeyError(PatioError, ValueError):
    """A key under 128 bits would be used where strangers can reach the broker."""


class SerializationError(PatioError, ValueError):
    """A value could not be serialized or deserialized."""


class PickleRefusedError(SerializationError, pickle.UnpicklingError):
    """``RestrictedPickleSerializer`` refused or could not read a payload.

    Also a ``pickle.UnpicklingError``, which is what code written for the
    original patio catches.
    """


class DuplicateTaskNameError(PatioError, RuntimeError, ValueError):
    """A task name is already registered to another function.

    A ``RuntimeError`` as in patio 0.1.4, and a ``ValueError`` as before.
    """
