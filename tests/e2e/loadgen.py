"""A steady call load against a patio mesh, run as its own process.

``python -m tests.e2e.loadgen DIR [--concurrency N] [--interval S]``

It is a caller outside the mesh: a ``TCPClientBroker`` with a
``NullExecutor``. Everything it needs comes from files in ``DIR`` that the
test keeps current, and it re-reads them when they change:

- ``peers``: one ``host:port`` a line (the worker pods' addresses);
- ``key`` and ``next-key``: the key it presents and an extra key it accepts,
  copied from the cluster's auth Secret (so it follows a key rotation as the
  workers do);
- ``phase``: a label; every outcome is counted under the phase that was
  current when the call started. The phase ``pause`` stops new calls;
- ``sleep`` (optional): seconds each ``sleep`` call takes (default 0.05).

It writes ``stats.json`` (atomically, a few times a second and on exit):
outcome counts per phase, split into retryable and plain calls, the number
of calls in flight, calls re-sent after a lost connection (``retried``),
wrong results and the last error messages. SIGTERM or
SIGINT stops it.

Calls alternate between ``mul`` (checked against the product) and
``sleep`` (holds a slot for a moment, so a killed worker has calls in
flight); every other call is ``retryable=True``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from patio import Registry
from patio.broker import TCPClientBroker
from patio.executor import NullExecutor

PAUSE = "pause"


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def parse_peers(text: str) -> set[tuple[str, int]]:
    out = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            host, _, port = line.rpartition(":")
            out.add((host.strip("[]"), int(port)))
    return out


class Load:
    def __init__(self, directory: Path, concurrency: int, interval: float, sleep: float) -> None:
        self.dir = directory
        self.concurrency = concurrency
        self.interval = interval
        self.sleep = sleep
        # phase -> "retryable"/"plain" -> outcome -> count
        self.counts: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )
        self.errors: list[dict[str, Any]] = []
        self.in_flight = 0
        self.wrong = 0
        self.phase = ""
        self.seen: dict[str, str] = {}
        self.retried = 0
        self.stopping = asyncio.Event()

    def refresh(self, broker: TCPClientBroker) -> None:
        names = ("peers", "key", "next-key", "phase", "sleep")
        files = {n: read_text(self.dir / n) for n in names}
        if files["key"] and (
            files["key"] != self.seen.get("key") or files["next-key"] != self.seen.get("next-key")
        ):
            nxt = files["next-key"].strip()
            broker.set_keys(files["key"].strip(), accepted_keys=(nxt,) if nxt else ())
        if files["peers"] != self.seen.get("peers"):
            broker.set_peers("file", parse_peers(files["peers"]))
        self.phase = files["phase"].strip() or "start"
        if files["sleep"].strip():
            self.sleep = float(files["sleep"])
        self.retried = broker.stats.calls_retried
        self.seen = files

    def snapshot(self) -> dict[str, Any]:
        return {
            "time": time.time(),
            "pid": os.getpid(),
            "phase": self.phase,
            "in_flight": self.in_flight,
            "wrong_results": self.wrong,
            "retried": self.retried,
            "phases": {
                p: {k: dict(v) for k, v in kinds.items()} for p, kinds in self.counts.items()
            },
            "errors": self.errors[-60:],
        }

    def write_stats(self) -> None:
        tmp = self.dir / "stats.json.tmp"
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, self.dir / "stats.json")

    async def caller(self, broker: TCPClientBroker, index: int) -> None:
        n = index
        while not self.stopping.is_set():
            if self.phase == PAUSE or not self.seen.get("peers"):
                await asyncio.sleep(0.05)
                continue
            n += 1
            retryable = n % 2 == 0
            kind = "retryable" if retryable else "plain"
            phase = self.phase
            self.in_flight += 1
            try:
                if (n // 2) % 2 == 0:
                    a, b = random.randint(-1000, 1000), random.randint(0, 1000)
                    result = await broker.call("mul", a, b, timeout=20, retryable=retryable)
                    expected: Any = a * b
                else:
                    expected = self.sleep
                    result = await broker.call("sleep", expected, timeout=20, retryable=retryable)
                if result != expected:
                    self.wrong += 1
                    outcome = "wrong_result"
                else:
                    outcome = "ok"
            except Exception as exc:  # counted by type; the test decides what is allowed
                outcome = type(exc).__name__
                self.errors.append(
                    {
                        "phase": phase,
                        "kind": kind,
                        "time": time.time(),
                        "error": f"{outcome}: {exc}",
                    }
                )
                del self.errors[:-200]
            finally:
                self.in_flight -= 1
            self.counts[phase][kind][outcome] += 1
            if self.interval:
                await asyncio.sleep(self.interval * (0.5 + random.random()))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        while not read_text(self.dir / "key"):
            await asyncio.sleep(0.05)
        key = read_text(self.dir / "key").strip()
        async with NullExecutor(Registry()) as executor:
            broker = TCPClientBroker(executor, key=key, node_id=f"e2e-load-{os.getpid()}")
            async with broker:
                self.refresh(broker)
                callers = [
                    asyncio.create_task(self.caller(broker, i)) for i in range(self.concurrency)
                ]
                while not self.stopping.is_set():
                    with contextlib.suppress(Exception):
                        self.refresh(broker)
                    self.write_stats()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), 0.1)
                # Let the calls in flight finish (they have deadlines).
                await asyncio.wait(callers, timeout=25)
                for task in callers:
                    task.cancel()
                await asyncio.gather(*callers, return_exceptions=True)
        self.write_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--sleep", type=float, default=0.05)
    ns = parser.parse_args()
    asyncio.run(Load(ns.dir, ns.concurrency, ns.interval, ns.sleep).run())


if __name__ == "__main__":
    main()
