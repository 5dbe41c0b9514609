"""TCP brokers: server, client and full mesh, built from small parts.

See :mod:`patio.broker.tcp.broker` for the facade and a map of the parts.
"""

from patio.broker.tcp.broker import (
    DEFAULT_PORT,
    TCPBroker,
    TCPBrokerBase,
    TCPClientBroker,
    TCPServerBroker,
)
from patio.broker.tcp.peer import LinkView, PeerInfo, PeerState

__all__ = [
    "DEFAULT_PORT",
    "LinkView",
    "PeerInfo",
    "PeerState",
    "TCPBroker",
    "TCPBrokerBase",
    "TCPClientBroker",
    "TCPServerBroker",
]
