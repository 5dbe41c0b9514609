"""A mesh member process for the fault tests: ``python -m tests.mesh_member``.

Arguments: node-id host port key [peer-host:peer-port ...]. It prints READY
once listening and runs until killed or sent SIGTERM (then it drains).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from patio import AsyncExecutor, Registry, TCPMeshBroker

rpc = Registry(project="mesh-test", auto_naming=False)


@rpc("work")
async def work(value: int, delay: float = 0.0) -> list[object]:
    if delay:
        await asyncio.sleep(delay)
    return [value * 2, os.environ.get("NODE_ID", "")]


@rpc("whoami")
def whoami() -> str:
    return os.environ.get("NODE_ID", "")


async def main() -> None:
    node_id, host, port, key, *peers = sys.argv[1:]
    os.environ["NODE_ID"] = node_id
    async with (
        AsyncExecutor(rpc, max_workers=2048) as executor,
        TCPMeshBroker(
            executor, key=key.encode(), node_id=node_id, heartbeat_interval=1.0
        ) as broker,
    ):
        await broker.listen(host, int(port))
        for peer in peers:
            peer_host, peer_port = peer.rsplit(":", 1)
            broker.add_peer(peer_host, int(peer_port))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("READY", flush=True)
        await stop.wait()
        await broker.drain(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
