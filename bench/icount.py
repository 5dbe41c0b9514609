"""Instructions per call, robust to machine load: ``python -m bench.icount``.

Runs a TCP server broker and a client broker in one process over loopback
(uvloop if installed), makes a fixed number of calls at a fixed concurrency,
under ``valgrind --tool=callgrind``, twice (``--calls`` and three times as
many) and prints the instructions (Ir) per call from the difference, so the
start-up (imports, handshake) cancels out. Instruction counts do not depend
on what else runs on the machine; wall-clock calls/s do. Both sides of a call
(caller and executor) are counted, as in the bench's CPU per call.

``--timeout`` gives every call a deadline (``tcp_c64_timeout``'s case);
``--payload N`` sends N bytes each way. ``--turns`` counts event-loop
iterations per call instead (stock asyncio loop, no valgrind): the
scheduling hops of one round trip, caller and executor together.
``--no-frame-mac`` turns frame authentication off on both sides
(``tcp_c64_nomac``'s case).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = b"icount-key-0123456789abcdef"


async def _load(
    calls: int, concurrency: int, timeout: float | None, payload: int, frame_mac: bool
) -> None:
    from patio import AsyncExecutor, NullExecutor, Registry
    from patio.broker.tcp import TCPClientBroker, TCPServerBroker

    rpc = Registry(project="icount", auto_naming=False)

    async def echo(x: object) -> object:
        return x

    rpc.register(echo, "echo")
    arg: object = b"x" * payload if payload else 1
    async with (
        AsyncExecutor(rpc, max_workers=concurrency) as executor,
        TCPServerBroker(executor, key=KEY, frame_mac=frame_mac) as server,
        NullExecutor(Registry()) as null,
        TCPClientBroker(null, key=KEY, frame_mac=frame_mac) as client,
    ):
        await server.listen("127.0.0.1", 0)
        port = server.listening[0][1]
        await client.connect("127.0.0.1", port)
        kwargs = {} if timeout is None else {"timeout": timeout}
        await asyncio.gather(*[client.call("echo", arg, **kwargs) for _ in range(concurrency)])
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await client.call("echo", arg, **kwargs)

        await asyncio.gather(*[worker() for _ in range(concurrency)])


def _child(args: argparse.Namespace) -> None:
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(_load(args.calls, args.concurrency, args.timeout, args.payload, not args.no_frame_mac))


def _turns(args: argparse.Namespace) -> float:
    """Event-loop iterations per call, from the difference of two loads."""
    turns = 0
    run_once = asyncio.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def counted(loop: asyncio.BaseEventLoop) -> None:
        nonlocal turns
        turns += 1
        run_once(loop)

    asyncio.BaseEventLoop._run_once = counted  # type: ignore[attr-defined]
    counts: list[int] = []
    calls: int = args.calls
    for load in (calls, 3 * calls):
        turns = 0
        asyncio.run(
            _load(load, args.concurrency, args.timeout, args.payload, not args.no_frame_mac)
        )
        counts.append(turns)
    return (counts[1] - counts[0]) / (2 * calls)


def _instructions(calls: int, args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.icount",
            "--child",
            "--calls",
            str(calls),
            "--concurrency",
            str(args.concurrency),
            "--payload",
            str(args.payload),
        ]
        if args.timeout is not None:
            cmd += ["--timeout", str(args.timeout)]
        if args.no_frame_mac:
            cmd.append("--no-frame-mac")
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"valgrind failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        match = re.search(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
        if match is None:
            raise SystemExit("no summary line in callgrind's output")
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.icount", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--payload", type=int, default=0)
    parser.add_argument("--turns", action="store_true", help="count loop iterations per call")
    parser.add_argument("--no-frame-mac", action="store_true", help="frames without MAC")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.turns:
        print(
            f"{_turns(args):.2f} event-loop iterations per call (caller + executor, concurrency "
            f"{args.concurrency}, Python {sys.version.split()[0]}, stock asyncio loop)"
        )
        return
    small = _instructions(args.calls, args)
    large = _instructions(3 * args.calls, args)
    per_call = (large - small) / (2 * args.calls)
    print(
        f"{per_call:,.0f} instructions per call (caller + executor, concurrency "
        f"{args.concurrency}, timeout {args.timeout}, payload {args.payload} B, "
        f"frame MAC {'off' if args.no_frame_mac else 'on'}; "
        f"callgrind Ir, {args.calls} vs {3 * args.calls} calls)"
    )


if __name__ == "__main__":
    main()
