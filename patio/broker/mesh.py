"""The full-mesh broker: every member listens, dials, executes and forwards."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from patio.broker import membership
from patio.broker.tcp import DEFAULT_PORT, TCPBroker


class TCPMeshBroker(TCPBroker):
    """A member of a full mesh.

    It keeps exactly one link per pair of members, counts its own executor as
    a peer when routing, and forwards calls from outside callers (which
    connect to any one member) to the best member, one hop at most.
    Membership comes from any mix of :meth:`add_peer`, :meth:`set_peers`,
    :meth:`watch_peers_file` and :meth:`watch_dns`.
    """

    local_execution = True
    forwarding = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watchers: list[asyncio.Task[None]] = []

    def watch_peers_file(
        self, path: str | os.PathLike[str], default_port: int = DEFAULT_PORT
    ) -> None:
        """Follow a peers file (one ``host:port`` a line), re-read when it changes."""
        source = f"file:{path}"
        self._watchers.append(
            self.running_loop().create_task(
                membership.watch_file(
                    path, lambda peers: self.set_peers(source, peers), default_port=default_port
                )
            )
        )

    def watch_dns(self, name: str, port: int = DEFAULT_PORT, interval: float = 5.0) -> None:
        """Follow every A/AAAA record of ``name``, re-resolved every ``interval`` s."""
        source = f"dns:{name}"
        self._watchers.append(
            self.running_loop().create_task(
                membership.watch_dns(
                    name, port, lambda peers: self.set_peers(source, peers), interval=interval
                )
            )
        )

    async def close(self) -> None:
        for task in self._watchers:
            task.cancel()
        if self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)
            self._watchers.clear()
        await super().close()
