"""asyncio transports (plain TCP and TLS) that drive a :mod:`patio.proto` connection."""

from patio.transport.link import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    Link,
    LinkHandler,
    LinkSettings,
    dial,
    listen,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "Link",
    "LinkHandler",
    "LinkSettings",
    "dial",
    "listen",
]
