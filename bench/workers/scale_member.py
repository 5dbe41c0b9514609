"""One member of the scale scenario (``python -m bench.scale``).

Listens, then (``go``) dials every other member and reports ``meshed`` once a
link to each is up; then reports the CPU time it spent between ``measure``
and ``report``, and exits on ``stop``.
Memory is read before dialing and once meshed, so the difference is what the
links cost. Output: JSON lines on stdout, as every bench worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import _bench_common as common  # type: ignore[import-not-found]

from patio import NullExecutor, Registry, TCPMeshBroker


def rss_mb() -> float:
    """Current resident set (not the peak): what the process holds now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def main(cfg: dict[str, Any]) -> None:
    control = common.Control()
    rpc = Registry(project="scale", auto_naming=False)
    async with (
        NullExecutor(rpc) as executor,
        TCPMeshBroker(
            executor,
            key=cfg["key"].encode(),
            node_id=f"member-{cfg['index']}",
            heartbeat_interval=cfg["heartbeat"],
        ) as broker,
    ):
        await broker.listen(cfg["host"], cfg["port"])
        common.emit("ready", rss_mb=rss_mb(), fds=fds())
        await control.wait("go")
        for host in cfg["peers"]:
            broker.add_peer(host, cfg["port"])
        want = len(cfg["peers"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 240  # bounded: the orchestrator gives up after 300 s
        while loop.time() < deadline:
            if broker.membership_links()[0] >= want:
                break
            await asyncio.sleep(0.05)
        common.emit("meshed", at=time.time(), rss_mb=rss_mb(), fds=fds())
        await control.wait("measure")
        cpu = common.cpu_seconds()
        await control.wait("report")  # every member is still up: links are counted
        up, known, missing = broker.membership_links()
        common.emit(
            "idle",
            cpu_s=common.cpu_seconds() - cpu,
            links_up=up,
            links_known=known,
            missing=missing[:3],
            bytes_sent=broker.stats.bytes_sent,
            rss_mb=rss_mb(),
        )
        await control.wait("stop")


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(json.loads(sys.argv[1])))
    else:
        uvloop.run(main(json.loads(sys.argv[1])))
