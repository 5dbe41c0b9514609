"""patio: Python Asynchronous Tasks for AsyncIO.

A :class:`Registry` of functions, executors that run them and brokers that
carry calls between processes, with no message broker in between.
"""

from patio.broker import (
    AbstractBroker,
    MemoryBroker,
    TCPBrokerBase,
    TCPClientBroker,
    TCPMeshBroker,
    TCPServerBroker,
)
from patio.errors import (
    CallTimeoutError,
    ExecutionRefusedError,
    NoRouteError,
    PatioError,
    PeerConnectionError,
    RemoteError,
)
from patio.executor import (
    AbstractExecutor,
    AsyncExecutor,
    NullExecutor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from patio.registry import Registry, TaskFunctionType
from patio.version import __version__

__all__ = [
    "AbstractBroker",
    "AbstractExecutor",
    "AsyncExecutor",
    "CallTimeoutError",
    "ExecutionRefusedError",
    "MemoryBroker",
    "NoRouteError",
    "NullExecutor",
    "PatioError",
    "PeerConnectionError",
    "ProcessPoolExecutor",
    "Registry",
    "RemoteError",
    "TCPBrokerBase",
    "TCPClientBroker",
    "TCPMeshBroker",
    "TCPServerBroker",
    "TaskFunctionType",
    "ThreadPoolExecutor",
    "__version__",
]
