"""Brokers carry calls: in memory, or over TCP (server, client, full mesh)."""

from patio.broker.base import AbstractBroker, TimeoutType
from patio.broker.memory import MemoryBroker
from patio.broker.mesh import TCPMeshBroker
from patio.broker.serializer import (
    AbstractSerializer,
    MsgpackSerializer,
    PickleSerializer,
    RestrictedPickleSerializer,
)
from patio.broker.tcp import (
    DEFAULT_PORT,
    LinkView,
    PeerInfo,
    PeerState,
    TCPBroker,
    TCPBrokerBase,
    TCPClientBroker,
    TCPServerBroker,
)

__all__ = [
    "DEFAULT_PORT",
    "AbstractBroker",
    "AbstractSerializer",
    "LinkView",
    "MemoryBroker",
    "MsgpackSerializer",
    "PeerInfo",
    "PeerState",
    "PickleSerializer",
    "RestrictedPickleSerializer",
    "TCPBroker",
    "TCPBrokerBase",
    "TCPClientBroker",
    "TCPMeshBroker",
    "TCPServerBroker",
    "TimeoutType",
]
