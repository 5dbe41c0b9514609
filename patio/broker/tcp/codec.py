"""How calls and their failures travel: payload encoding and ONE error table.

``ERROR_RULES`` is the only place that says which exception on the executing
side becomes which :class:`~patio.proto.messages.ErrorKind` on the wire, which
exception the caller raises for that kind, and which outcome both sides count
it under. The server, the call sender and the stats all read it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

from patio.broker.serializer import (
    AbstractSerializer,
    exception_from_payload,
    exception_to_payload,
)
from patio.errors import (
    CallTimeoutError,
    ExecutionRefusedError,
    NoRouteError,
    PatioError,
    PeerConnectionError,
    SerializationError,
    TaskNotFoundError,
)
from patio.proto.messages import ErrorKind
from patio.stats import (
    OUTCOME_CANCELLED,
    OUTCOME_CONNECTION,
    OUTCOME_ERROR,
    OUTCOME_NO_ROUTE,
    OUTCOME_REFUSED,
    OUTCOME_TIMEOUT,
)

# Bytes a CALL/RESULT frame adds around its payload and name (type, ids,
# timeout, msgpack headers), rounded up.
FRAME_OVERHEAD: Final = 64


class LinkLost(Exception):
    """Internal: the link carrying a call went away (a retryable failure)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ErrorReply(Exception):
    """Internal: the far side answered ERROR; kept raw so a forwarder can relay it."""

    def __init__(self, kind: int, payload: bytes) -> None:
        super().__init__(kind)
        self.kind = kind
        self.payload = payload


@dataclass(frozen=True, slots=True)
class ErrorRule:
    #: the exception on the executing side that is sent as ``kind`` (None: never raised there)
    raised: type[BaseException] | None
    kind: ErrorKind
    #: what a finished call is counted under, on either side
    outcome: str
    #: what the caller raises on receiving ``kind``
    rebuilt: type[PatioError]
    #: whether the text names the node that answered
    names_node: bool = False


ERROR_RULES: Final = (
    ErrorRule(TaskNotFoundError, ErrorKind.NOT_FOUND, OUTCOME_NO_ROUTE, NoRouteError, True),
    ErrorRule(NoRouteError, ErrorKind.NO_ROUTE, OUTCOME_NO_ROUTE, NoRouteError),
    ErrorRule(CallTimeoutError, ErrorKind.TIMEOUT, OUTCOME_TIMEOUT, CallTimeoutError),
    ErrorRule(
        ExecutionRefusedError, ErrorKind.REFUSED, OUTCOME_REFUSED, ExecutionRefusedError, True
    ),
    ErrorRule(None, ErrorKind.OVERLOADED, OUTCOME_REFUSED, ExecutionRefusedError),
    ErrorRule(LinkLost, ErrorKind.CONNECTION, OUTCOME_CONNECTION, PeerConnectionError),
    ErrorRule(SerializationError, ErrorKind.SERIALIZATION, OUTCOME_ERROR, SerializationError),
    ErrorRule(asyncio.CancelledError, ErrorKind.CANCELLED, OUTCOME_CANCELLED, PeerConnectionError),
)
_BY_KIND: Final = {int(rule.kind): rule for rule in ERROR_RULES}


def rule_for(exc: BaseException) -> ErrorRule | None:
    """The rule an exception raised while serving a call falls under (None: a task's own error)."""
    for rule in ERROR_RULES:
        if rule.raised is not None and isinstance(exc, rule.raised):
            return rule
    return None


def outcome_of(exc: BaseException) -> str:
    """The outcome a call that ended in ``exc`` is counted under, on the calling side."""
    for rule in ERROR_RULES:
        if isinstance(exc, rule.rebuilt) or (
            rule.raised is not None and isinstance(exc, rule.raised)
        ):
            return rule.outcome
    return OUTCOME_ERROR


def error_from_reply(
    reply: ErrorReply, name: str, node_id: str, serializer: AbstractSerializer
) -> BaseException:
    """The exception a caller raises for an ERROR answer from ``node_id``."""
    if reply.kind == ErrorKind.EXCEPTION:
        try:
            payload = serializer.unpack(reply.payload)
        except SerializationError as exc:
            return SerializationError(f"error raised by {name!r} could not be decoded: {exc}")
        return exception_from_payload(payload)
    text = reply.payload.decode("utf-8", "replace")
    rule = _BY_KIND.get(reply.kind)
    if rule is None:
        return PatioError(f"call to {name!r} failed on {node_id}: {text}")
    if rule.kind == ErrorKind.CANCELLED:
        return rule.rebuilt(f"call to {name!r} was cancelled by {node_id}: {text}")
    return rule.rebuilt(text)


def pack_value(serializer: AbstractSerializer, name: str, value: Any, what: str) -> bytes:
    """Serialize the arguments or result of a call, naming the call if it fails."""
    try:
        return serializer.pack(value)
    except SerializationError as exc:
        raise SerializationError(f"{what} of {name!r} cannot be serialized: {exc}") from None
    except Exception as exc:
        raise SerializationError(f"{what} of {name!r} cannot be serialized: {exc}") from exc


def describe_error(
    exc: BaseException, serializer: AbstractSerializer, max_frame_size: int
) -> bytes:
    """The exception as an ERROR payload that always fits in one frame."""
    description = exception_to_payload(exc, serializer)
    limit = max_frame_size - FRAME_OVERHEAD
    try:
        data = serializer.pack(description)
    except Exception:
        data = b""
    if 0 < len(data) <= limit:
        return data
    # Too large (or unpackable): drop the arguments, then cut the texts.
    description["args"] = []
    text_limit = max(limit // 4, 256)
    for field in ("traceback", "message"):
        text = str(description.get(field, ""))
        if len(text) > text_limit:
            description[field] = text[:text_limit] + f"... [{len(text)} characters]"
    return serializer.pack(description)
