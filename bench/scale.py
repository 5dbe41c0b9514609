"""A mesh of many members on this machine: ``python -m bench.scale``.

Starts ``--members`` processes (default 64) on 127.0.0.2, 127.0.0.3, ...
(one port), each a ``TCPMeshBroker`` with a ``NullExecutor`` given every
other member's address, and reports:

- time to full mesh: from telling every member to dial until the last one
  has a link to each of the others;
- memory per link: each member's resident set once meshed minus before it
  dialed, over its links (median over members);
- file descriptors per member once meshed;
- idle CPU per member: CPU time over ``--idle`` seconds of a quiet mesh
  (heartbeats only), as a share of one core (median and max over members).

Every process runs in its own session and the whole group is ended in a
``finally`` block, as in the rest of the bench. The machine's load average is
printed with the figures: other work on it stretches the time to full mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.envs import WORKERS, ours_env
from bench.procs import Proc, ProcGroup, free_port

KEY = "bench-scale-key-0123456789abcdef0123"


def run(members: int, idle: float, heartbeat: float, log_dir: Path) -> dict[str, object]:
    env = ours_env()
    port = free_port()
    hosts = [f"127.0.0.{i + 2}" for i in range(members)]
    load = os.getloadavg()
    started = time.monotonic()
    with ProcGroup() as group:
        procs = [
            group.add(
                Proc(
                    env,
                    WORKERS / "scale_member.py",
                    {
                        "index": i,
                        "host": host,
                        "port": port,
                        "key": KEY,
                        "heartbeat": heartbeat,
                        "peers": [h for h in hosts if h != host],
                    },
                    f"scale-{i}",
                    log_dir,
                )
            )
            for i, host in enumerate(hosts)
        ]
        ready = [p.expect("ready", 120) for p in procs]
        started_s = time.monotonic() - started
        go = time.time()
        for p in procs:
            p.send("go")
        meshed = [p.expect("meshed", 300) for p in procs]
        full_mesh_s = max(float(m["at"]) for m in meshed) - go
        for p in procs:
            p.send("measure")
        time.sleep(idle)
        for p in procs:
            p.send("report")
        idles = [p.expect("idle", 60) for p in procs]
        for p in procs:
            p.send("stop")
    links = members - 1
    per_link_kb = [
        (float(m["rss_mb"]) - float(r["rss_mb"])) * 1024 / links
        for m, r in zip(meshed, ready, strict=True)
    ]
    idle_share = [float(i["cpu_s"]) / idle for i in idles]
    return {
        "members": members,
        "links_per_member": links,
        "start_s": round(started_s, 2),
        "full_mesh_s": round(full_mesh_s, 2),
        "rss_before_mb": round(statistics.median(float(r["rss_mb"]) for r in ready), 1),
        "rss_meshed_mb": round(statistics.median(float(m["rss_mb"]) for m in meshed), 1),
        "memory_per_link_kb": round(statistics.median(per_link_kb), 1),
        "fds_per_member": statistics.median(int(m["fds"]) for m in meshed),
        "heartbeat_s": heartbeat,
        "idle_window_s": idle,
        "idle_cpu_share_median": round(statistics.median(idle_share), 5),
        "idle_cpu_share_max": round(max(idle_share), 5),
        "all_links_up_after_idle": all(int(i["links_up"]) == links for i in idles),
        "links_missing_after_idle": [m for i in idles for m in i.get("missing", [])][:5],
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--idle", type=float, default=15.0, help="seconds of idle measured")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval (s)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON line here")
    args = parser.parse_args()
    log_dir = Path(__file__).resolve().parent / "results" / "tmp" / "logs"
    result = run(args.members, args.idle, args.heartbeat, log_dir)
    line = json.dumps(result)
    print(line)
    if args.out is not None:
        with args.out.open("a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
