"""asyncio transports (plain TCP and TLS) that drive a :mod:`patio.proto` connection."""

from patio.transport.link import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_BUFFERED_OUTPUT,
    Link,
    LinkHandler,
    LinkSettings,
    PreAuthGate,
    RateLimitedLog,
    check_limits,
    dial,
    is_loopback,
    listen,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_MAX_BUFFERED_OUTPUT",
    "Link",
    "LinkHandler",
    "LinkSettings",
    "PreAuthGate",
    "RateLimitedLog",
    "check_limits",
    "dial",
    "is_loopback",
    "listen",
]
