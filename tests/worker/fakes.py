"""A stand-in for TCPMeshBroker for in-process runtime tests.

It implements the read-only views and the membership/key/TLS calls of
docs/broker-api.md over a MemoryBroker, listens on a real socket (so "port in
use" is real) and records what the worker asked of it.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

from patio.broker.memory import MemoryBroker


@dataclass
class FakePeer:
    node_id: str
    address: tuple[str, int]
    connected: bool = False
    in_flight: int = 0
    capacity: int = 0
    names: frozenset[str] = field(default_factory=frozenset)


class FakeMeshBroker(MemoryBroker):
    instances: list[FakeMeshBroker] = []

    def __init__(
        self,
        executor: Any,
        *,
        key: bytes = b"",
        accepted_keys: tuple[bytes, ...] = (),
        ssl_context: Any = None,
        client_ssl_context: Any = None,
        node_id: str = "fake",
        allow_empty_key: bool = False,
        allow_weak_key: bool = False,
        max_frame_size: int = 0,
        max_buffered_output: int = 0,
        max_peer_call_bytes: int = 0,
        frame_mac: bool = True,
    ) -> None:
        super().__init__(executor)
        self.limits = (max_frame_size, max_buffered_output)
        self.max_peer_call_bytes = max_peer_call_bytes
        self.frame_mac = frame_mac
        self.node_id = node_id
        self.key = key
        self.accepted_keys = tuple(accepted_keys)
        self.ssl_contexts = (ssl_context, client_ssl_context)
        self.ssl_reloads = 0
        self.static: set[tuple[str, int]] = set()
        self.sources: dict[str, set[tuple[str, int]]] = {}
        self.connected: set[tuple[str, int]] = set()
        self.draining = False
        self.listening: list[tuple[str, int]] = []
        self.key_history: list[tuple[bytes, tuple[bytes, ...]]] = [(key, self.accepted_keys)]
        self._server: asyncio.Server | None = None
        FakeMeshBroker.instances.append(self)

    @property
    def key_fingerprint(self) -> str:
        material = b"|".join([self.key, *sorted(self.accepted_keys)])
        return hashlib.sha256(material).hexdigest()[:12]

    async def listen(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(lambda r, w: w.close(), host, port)
        self.listening.append((host, self._server.sockets[0].getsockname()[1]))

    def add_peer(self, host: str, port: int) -> None:
        self.static.add((host, port))

    def remove_peer(self, host: str, port: int) -> None:
        self.static.discard((host, port))

    def set_peers(self, source: str, peers: set[tuple[str, int]]) -> None:
        self.sources[source] = set(peers)

    def watch_peers_file(self, path: str, default_port: int = 0) -> None:
        self.watched_file = path

    def watch_dns(self, name: str, port: int = 0, interval: float = 5.0) -> None:
        self.watched_dns = (name, port)

    def known(self) -> set[tuple[str, int]]:
        out = set(self.static)
        for peers in self.sources.values():
            out |= peers
        return out

    def peers(self) -> list[FakePeer]:
        return [
            FakePeer(f"{h}:{p}", (h, p), (h, p) in self.connected) for h, p in sorted(self.known())
        ]

    def membership_links(self) -> tuple[int, int, list[tuple[str, str]]]:
        known = sorted(self.known())
        missing = [(f"{h}:{p}", "not connected") for h, p in known if (h, p) not in self.connected]
        return len(known) - len(missing), len(known), missing

    def set_keys(self, key: bytes, accepted_keys: tuple[bytes, ...] = ()) -> None:
        self.key, self.accepted_keys = key, tuple(accepted_keys)
        self.key_history.append((key, self.accepted_keys))

    def set_ssl_contexts(self, server: Any, client: Any) -> None:
        self.ssl_contexts = (server, client)
        self.ssl_reloads += 1

    async def drain(self, timeout: float | None = None) -> bool:
        self.draining = True
        return await self.executor.drain(timeout)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await super().close()
