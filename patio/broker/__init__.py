"""Brokers carry calls: in memory, or over TCP (server, client, full mesh)."""

from patio.broker.base import AbstractBroker
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
    PeerInfo,
    TCPBroker,
    TCPClientBroker,
    TCPServerBroker,
)

__all__ = [
    "DEFAULT_PORT",
    "AbstractBroker",
    "AbstractSerializer",
    "MemoryBroker",
    "MsgpackSerializer",
    "PeerInfo",
    "PickleSerializer",
    "RestrictedPickleSerializer",
    "TCPBroker",
    "TCPClientBroker",
    "TCPMeshBroker",
    "TCPServerBroker",
]
