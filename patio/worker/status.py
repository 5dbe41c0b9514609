"""``patio status``: every member of a mesh, asked through any one of them.

The command connects as a client (like ``patio call``) and sends one STATUS
request over the mesh protocol; the member it reached gathers the others'
answers (patio.broker.tcp.status). Output is a table for people or, with
``--json``, one JSON object per refresh for scripts; ``--watch`` refreshes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from patio.worker.client import connected_client, describe_error, format_peers, to_json
from patio.worker.config import PeerAddress


@dataclass(frozen=True, slots=True)
class StatusRequest:
    peers: tuple[PeerAddress, ...]
    key: bytes
    timeout: float
    as_json: bool = False
    watch: float | None = None  # seconds between refreshes
    ssl_context: Any = None
    allow_weak_key: bool = False
    frame_mac: bool = True


def format_uptime(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


COLUMNS = ("NODE", "ADDRESS", "VERSION", "UPTIME", "EXECUTOR", "BUSY/CAP", "QUEUED", "SERVED",
           "FAILED", "LINKS", "TASKS")  # fmt: skip


def member_row(member: dict[str, Any]) -> list[str]:
    if "error" in member:
        return [member["node_id"], "-", "-", "-", "-", "-", "-", "-", "-", "-",
                f"UNREACHABLE: {member['error']}"]  # fmt: skip
    tasks = member.get("tasks", [])
    shown = ", ".join(tasks[:6]) + (f", ... ({len(tasks)})" if len(tasks) > 6 else "")
    executor = str(member.get("executor", "?")).removesuffix("Executor").lower() or "?"
    state = " (draining)" if member.get("draining") else ""
    return [
        member["node_id"] + state,
        ",".join(member.get("addresses", [])) or "-",
        str(member.get("version", "?")),
        format_uptime(float(member.get("uptime", 0))),
        executor,
        f"{member.get('busy', 0)}/{member.get('capacity', 0)}",
        str(member.get("queued", 0)),
        str(member.get("served", 0)),
        str(member.get("failed", 0)),
        f"{member.get('links_up', 0)}/{member.get('links_known', 0)}",
        shown or "-",
    ]


def is_member(member: dict[str, Any]) -> bool:
    """Members listen; a connected caller (patio call, an app's client) does not."""
    return "error" in member or bool(member.get("addresses"))


def render_table(members: Sequence[dict[str, Any]]) -> str:
    listed = sorted((m for m in members if is_member(m)), key=lambda m: m["node_id"])
    callers = sorted(m["node_id"] for m in members if not is_member(m))
    rows = [list(COLUMNS), *(member_row(m) for m in listed)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    ]
    down = sum(1 for m in listed if "error" in m)
    summary = f"{len(listed)} members" + (f", {down} unreachable" if down else "")
    if callers:
        summary += f"; also connected: {len(callers)} caller(s) ({', '.join(callers[:5])})"
    return "\n".join([*lines, summary])


async def gather_status(request: StatusRequest, out: TextIO) -> int:
    async with connected_client(
        request.peers,
        request.key,
        timeout=request.timeout,
        ssl_context=request.ssl_context,
        command="patio status",
        allow_weak_key=request.allow_weak_key,
        frame_mac=request.frame_mac,
    ) as broker:
        while True:
            members = await broker.mesh_status(timeout=request.timeout)
            if request.as_json:
                print(to_json({"time": time.time(), "members": members}), file=out, flush=True)
            else:
                if request.watch is not None and out.isatty():
                    print("\x1b[H\x1b[2J", end="", file=out)
                if request.watch is not None:
                    print(time.strftime("%H:%M:%S  patio status (Ctrl-C to stop)"), file=out)
                print(render_table(members), file=out, flush=True)
            if request.watch is None:
                return 0 if all("error" not in m for m in members) else 1
            await asyncio.sleep(request.watch)
            if not request.as_json and not out.isatty():
                print(file=out)


def run_status(
    request: StatusRequest, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    try:
        return asyncio.run(gather_status(request, out))
    except KeyboardInterrupt:
        return 0 if request.watch is not None else 130
    except Exception as exc:
        where = format_peers(request.peers)
        print(f"patio status via {where} failed: {describe_error(exc)}", file=err)
        return 1
