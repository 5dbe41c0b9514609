"""Code written for patio 0.1.4 runs unchanged: its imports and its behaviours.

The names below are what patio 0.1.4 exports from each module (read from its
sdist); each must import from the same path and mean the same thing here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib
import inspect
import os
import pickle
from typing import Any

import pytest

from patio import AsyncExecutor, Registry
from patio.broker import TCPClientBroker, TCPServerBroker
from patio.broker.serializer import RestrictedPickleSerializer
from patio.broker.tcp.protocol import Header, PacketTypes, Protocol

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftover_tasks")]

KEY = b"compat-test-key"

EXPORTS_014 = {
    "patio": [
        "AbstractBroker",
        "AbstractExecutor",
        "AsyncExecutor",
        "MemoryBroker",
        "NullExecutor",
        "ProcessPoolExecutor",
        "Registry",
        "TCPBrokerBase",
        "TCPClientBroker",
        "TCPServerBroker",
        "TaskFunctionType",
        "ThreadPoolExecutor",
    ],
    "patio.broker": [
        "AbstractBroker",
        "MemoryBroker",
        "TCPBrokerBase",
        "TCPClientBroker",
        "TCPServerBroker",
        "TimeoutType",
    ],
    "patio.broker.tcp": ["TCPBrokerBase", "TCPClientBroker", "TCPServerBroker"],
    "patio.broker.tcp.protocol": ["PacketTypes", "Header", "Protocol"],
    "patio.broker.serializer": [
        "AbstractSerializer",
        "PickleSerializer",
        "RestrictedPickleSerializer",
        "RestrictedUnpickler",
    ],
    "patio.executor": [
        "AbstractExecutor",
        "AsyncExecutor",
        "NullExecutor",
        "ProcessPoolExecutor",
        "ThreadPoolExecutor",
    ],
    "patio.registry": [
        "AsyncTaskFunctionType",
        "Registry",
        "SyncTaskFunctionType",
        "T",
        "TaskFunctionType",
    ],
}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, ns in EXPORTS_014.items() for n in ns])
def test_every_name_of_014_imports_from_the_same_path(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"


def test_the_names_mean_the_same_things() -> None:
    import patio
    import patio.broker
    import patio.broker.tcp
    import patio.executor

    # One class under every path it is exported from.
    for name in ("TCPBrokerBase", "TCPClientBroker", "TCPServerBroker"):
        cls = getattr(patio, name)
        assert cls is getattr(patio.broker, name) is getattr(patio.broker.tcp, name)
    assert issubclass(patio.TCPServerBroker, patio.TCPBrokerBase)
    assert issubclass(patio.TCPClientBroker, patio.TCPBrokerBase)
    assert issubclass(patio.TCPBrokerBase, patio.AbstractBroker)
    assert issubclass(patio.MemoryBroker, patio.AbstractBroker)
    for name in ("AsyncExecutor", "NullExecutor", "ProcessPoolExecutor", "ThreadPoolExecutor"):
        assert issubclass(getattr(patio.executor, name), patio.AbstractExecutor)
    # TimeoutType: the numbers a timeout may be.
    from patio.broker import TimeoutType

    assert isinstance(1, TimeoutType) and isinstance(0.5, TimeoutType)
    assert not isinstance("1", TimeoutType)
    # The packet types keep their wire values.
    assert [(t.name, t.value) for t in PacketTypes] == [
        ("AUTH_DIGEST", 0),
        ("AUTH_REQUEST", 1),
        ("AUTH_RESPONSE", 2),
        ("AUTH_OK", 3),
        ("DISCOVER_REQUEST", 5),
        ("DISCOVER_RESPONSE", 6),
        ("REQUEST", 10),
        ("RESPONSE", 20),
        ("ERROR", 30),
    ]


def test_protocol_packs_and_digests_as_014() -> None:
    protocol = Protocol(serializer=RestrictedPickleSerializer(), key=b"k")
    packet = protocol.pack({"a": 1}, PacketTypes.REQUEST)
    header = Header.unpack(packet[: Header.SIZE])
    assert Header.SIZE == 9
    assert header == Header(PacketTypes.REQUEST, len(packet) - Header.SIZE, 1)
    assert protocol.serializer.unpack(packet[Header.SIZE :]) == {"a": 1}
    # A keyed BLAKE2s digest with a 4-byte salt; a different key does not verify it.
    request = protocol.authorize_request(b"token")
    assert protocol.authorize_check(request[Header.SIZE :])
    other = Protocol(serializer=RestrictedPickleSerializer(), key=b"other")
    assert not other.authorize_check(request[Header.SIZE :])


def test_serial_wraps_to_one_after_max_serial() -> None:
    protocol = Protocol(serializer=RestrictedPickleSerializer())
    protocol.serial = Protocol.MAX_SERIAL - 2
    assert [protocol.get_serial() for _ in range(3)] == [Protocol.MAX_SERIAL - 1, 1, 2]
    assert Protocol.MAX_SERIAL == 4294967295


async def test_broker_protocol_serial_counts_calls_and_wraps() -> None:
    async def mul(a: int, b: int) -> int:
        return a * b

    rpc = Registry()
    rpc.register(mul, "mul")
    async with (
        AsyncExecutor(rpc) as executor,
        TCPServerBroker(executor, KEY) as server,  # the key as 0.1.4's second positional
    ):
        await server.listen("127.0.0.1", 0)
        async with (
            AsyncExecutor(Registry()) as client_executor,
            TCPClientBroker(client_executor, KEY) as client,
        ):
            await client.connect("127.0.0.1", server.listening[0][1])
            assert client.protocol.serial == 0
            assert await client.call("mul", 2, 3) == 6
            assert client.protocol.serial == 1
            client.protocol.serial = Protocol.MAX_SERIAL - 2
            results = await asyncio.gather(*(client.call("mul", i, 2) for i in range(3)))
            assert results == [0, 2, 4]
            assert client.protocol.serial == 2  # MAX - 1, then 1, then 2


def test_duplicate_name_is_a_runtime_error() -> None:
    rpc = Registry()

    def one() -> int:
        return 1

    def two() -> int:
        return 2

    rpc.register(one, "task")
    with pytest.raises(RuntimeError, match="already registered"):
        rpc.register(two, "task")
    with pytest.raises(ValueError, match="already registered"):  # what it raised before
        rpc["task"] = two


def test_rpc_without_name_needs_auto_naming() -> None:
    rpc = Registry(auto_naming=False)
    with pytest.raises(ValueError, match="auto_naming"):

        @rpc
        def task() -> None: ...

    with pytest.raises(ValueError, match="auto_naming"):

        @rpc()
        def other() -> None: ...

    assert len(rpc) == 0


def _name_as_014_computes_it(project: str | None, func: Any) -> str:
    """project, module, qualname, then base64 (no padding) of BLAKE2s over the source."""
    digest = base64.b64encode(hashlib.blake2s(inspect.getsource(func).encode()).digest())
    parts = [project] if project is not None else []
    return ".".join([*parts, func.__module__, func.__qualname__, digest.decode().rstrip("=")])


@pytest.mark.parametrize("project", [None, "example"])
def test_strict_auto_names_are_those_of_014(project: str | None) -> None:
    rpc = Registry(project=project, strict=True)

    @rpc
    def mul(a: int, b: int) -> int:
        return a * b

    assert rpc.get_name(mul) == _name_as_014_computes_it(project, mul)
    plain = Registry(project=project)
    plain.register(mul)
    assert plain.get_name(mul) == ".".join(
        [*([project] if project else []), mul.__module__, mul.__qualname__]
    )


def test_restricted_pickle_refusal_is_an_unpickling_error() -> None:
    serializer = RestrictedPickleSerializer()
    with pytest.raises(pickle.UnpicklingError, match=r"(os|posix)\.system"):
        serializer.unpack(pickle.dumps(os.system))
    with pytest.raises(pickle.UnpicklingError):
        serializer.unpack(b"not a pickle")
    assert serializer.unpack(pickle.dumps({"a": (1, 2.0)})) == {"a": (1, 2.0)}


async def test_signatures_and_helpers_of_014() -> None:
    """Positional max_workers and key, reconnect_timeout, and the broker's loop/create_task."""
    from patio import MemoryBroker, NullExecutor, ProcessPoolExecutor, ThreadPoolExecutor

    rpc = Registry()
    for cls in (AsyncExecutor, ThreadPoolExecutor, ProcessPoolExecutor, NullExecutor):
        assert cls(rpc, 3).max_workers == 3
    client = TCPClientBroker(NullExecutor(rpc), KEY, reconnect_timeout=0.5)
    assert client.key_fingerprint == TCPServerBroker(NullExecutor(rpc), key=KEY).key_fingerprint

    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async with AsyncExecutor(rpc) as executor, MemoryBroker(executor) as broker:
        assert broker.loop is asyncio.get_running_loop()
        task = broker.create_task(forever())
        await started.wait()
    assert task.cancelled()  # closing the broker cancelled it
