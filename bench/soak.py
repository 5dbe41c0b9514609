"""Soak: a local mesh of worker processes under steady load while members come and go.

``bash bench/soak.sh [MINUTES]`` (or ``python -m bench.soak MINUTES``).

- ``--members`` (6) ``patio worker`` processes serve the demo tasks of ``patio local``,
  each on its own loopback address and given every slot as a static peer, as
  pods get them from the operator. ``--slots`` (8) leaves room to add members.
- This process joins as a caller (it serves nothing) and keeps ``--lanes``
  calls of ``lookup`` (a short sleep) in flight, each ``retryable`` with a
  ``--call-timeout`` deadline.
- Every ``--churn-every`` seconds one member outside the first ``--stable``
  (3) is killed (SIGKILL, restarted 2 s later), removed (SIGTERM: it drains and
  stays away) or added back, keeping between ``members - 2`` and ``slots``
  members up.
- Every ``--report-every`` seconds: RSS and open fds (from /proc), asyncio
  tasks and links (from the member's /metrics) per member, calls ok / failed /
  retried / hung, p99.

Pass: no retryable call failed, no call outlived its deadline (a hung call is
one not finished ``HANG_MARGIN`` seconds after it), and no growth trend in RSS,
fds or tasks of the stable members after the warm-up. Exit status 0 on pass.
Figures taken while other work runs on the machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patio import NullExecutor, Registry, TCPMeshBroker
from patio.worker.local import (
    DEMO_REGISTRY,
    _die_with_parent,
    free_port,
    http_get,
    loopback_hosts,
    percentile,
)

ROOT = Path(__file__).resolve().parents[1]
HANG_MARGIN = 5.0
RESTART_DELAY = 2.0
# Growth of a stable member after warm-up that counts as a trend, over the
# whole measured span: (absolute floor, share of the mean), whichever is larger.
# Open fds follow the links (one socket each), which churn moves between 4
# and 8: what must stay flat is the rest, "fds_beyond_links".
GROWTH_LIMITS = {"rss_mb": (8.0, 0.10), "fds_beyond_links": (4.0, 0.20), "tasks": (8.0, 0.20)}
_METRIC = re.compile(r"^(patio_event_loop_tasks|patio_peers_connected) ([0-9.e+-]+)$", re.M)


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _proc_usage(pid: int) -> tuple[int, int]:
    """(resident set in KiB, open file descriptors) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+)", status)
    if match is None:
        raise ValueError(f"no VmRSS for {pid}")
    return int(match.group(1)), len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Member:
    slot: int
    host: str
    port: int
    metrics_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def node_id(self) -> str:
        return f"soak-{self.slot}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Tally:
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    hung: int = 0
    latencies: list[float] = field(default_factory=list)  # this report window only
    all_latencies: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.random = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="patio-soak-"))
        self.key_file = self.workdir / "key"
        self.key = secrets.token_urlsafe(32)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(self.key + "\n")
        taken: set[tuple[str, int]] = set()
        self.members = [
            Member(
                slot,
                host,
                free_port(host, 21000 + slot, taken),
                free_port(host, 22000 + slot, taken),
                self.workdir / f"soak-{slot}.log",
            )
            for slot, host in enumerate(loopback_hosts(args.slots))
        ]
        if len({m.host for m in self.members}) < len(self.members):
            raise SystemExit("the soak needs one loopback address per member (Linux)")
        self.tally = Tally()
        self.actions: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.stopping = False

    # -- members ---------------------------------------------------------------

    def start(self, member: Member) -> None:
        peers = ",".join(f"{m.host}:{m.port}" for m in self.members if m is not member)
        argv = [
            sys.executable, "-m", "patio", "worker", DEMO_REGISTRY,
            "--listen", member.host, "--port", str(member.port),
            "--metrics-port", str(member.metrics_port),
            "--node-id", member.node_id, "--key-file", str(self.key_file),
            "--peers", peers, "--drain-timeout", "5", "--log-level", "warning",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATIO_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(member.log, "ab") as log:
            member.process = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )  # fmt: skip
        member.starts += 1

    def kill(self, member: Member, sig: signal.Signals) -> None:
        if member.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if sig == signal.SIGKILL:
                    os.killpg(member.process.pid, sig)
                else:
                    member.process.send_signal(sig)

    def stop_all(self) -> None:
        for member in self.members:
            if member.running:
                self.kill(member, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for member in self.members:
            if member.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    member.process.wait(max(0.0, deadline - time.monotonic()))
                self.kill(member, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    member.process.wait(5)

    async def wait_live(self, member: Member, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not member.running:
                raise RuntimeError(f"{member.node_id} exited:\n{_tail(member.log)}")
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, _ = await http_get(member.host, member.metrics_port, "/livez", 1.0)
                if status == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{member.node_id} not live after {limit} s:\n{_tail(member.log)}")

    # -- load ------------------------------------------------------------------

    async def lane(self, broker: TCPMeshBroker, lane: int) -> None:
        tally, args = self.tally, self.args
        n = 0
        while not self.stopping:
            n += 1
            started = time.monotonic()
            call = asyncio.ensure_future(
                broker.call(
                    "lookup",
                    f"k{lane}-{n}",
                    args.delay_ms,
                    timeout=args.call_timeout,
                    retryable=True,
                )
            )
            done, _ = await asyncio.wait({call}, timeout=args.call_timeout + HANG_MARGIN)
            if not done:
                tally.hung += 1
                call.cancel()
                with contextlib.suppress(BaseException):
                    await call
                continue
            error = call.exception()
            if error is None:
                tally.ok += 1
                seconds = time.monotonic() - started
                tally.latencies.append(seconds)
                tally.all_latencies.append(seconds)
            else:
                tally.failed[type(error).__name__] += 1

    async def churn(self) -> None:
        args = self.args
        churned = self.members[args.stable :]
        while not self.stopping:
            await asyncio.sleep(args.churn_every)
            if self.stopping:
                break
            up = [m for m in churned if m.running]
            down = [m for m in churned if not m.running]
            total_up = sum(m.running for m in self.members)
            choices = []
            if up and total_up > args.members - 2:
                choices += ["kill", "remove"]
            if down and total_up < args.slots:
                choices += ["add"] * (2 if total_up < args.members else 1)
            if not choices:
                continue
            action = self.random.choice(choices)
            self.actions[action] += 1
            if action == "add":
                self.start(self.random.choice(down))
            elif action == "remove":
                self.kill(self.random.choice(up), signal.SIGTERM)
            else:
                victim = self.random.choice(up)
                self.kill(victim, signal.SIGKILL)
                asyncio.get_running_loop().call_later(RESTART_DELAY, self._restart, victim)

    def _restart(self, member: Member) -> None:
        if not self.stopping and member.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                member.process.wait(1)
            if not member.running:
                self.actions["restart"] += 1
                self.start(member)

    # -- reports ---------------------------------------------------------------

    async def sample(self, member: Member) -> dict[str, Any] | None:
        if not member.running:
            return None
        assert member.process is not None
        try:
            rss_kb, fds = _proc_usage(member.process.pid)
            code, body = await http_get(member.host, member.metrics_port, "/metrics", 2.0)
        except (OSError, AttributeError, TimeoutError, ValueError, IndexError):
            return None
        if code != 200:
            return None
        values = {name: float(value) for name, value in _METRIC.findall(body)}
        return {
            "t": round(time.monotonic() - self.started, 1),
            "slot": member.slot,
            "start": member.starts,
            "rss_mb": round(rss_kb / 1024, 1),
            "fds": fds,
            "fds_beyond_links": fds - int(values.get("patio_peers_connected", 0)),
            "tasks": int(values.get("patio_event_loop_tasks", -1)),
            "links": int(values.get("patio_peers_connected", -1)),
        }

    async def report(self, broker: TCPMeshBroker) -> None:
        tally = self.tally
        window = sorted(tally.latencies)
        tally.latencies = []
        rows = [s for s in await asyncio.gather(*map(self.sample, self.members)) if s]
        self.samples += rows
        elapsed = time.monotonic() - self.started
        p99 = percentile(window, 0.99) * 1000 if window else float("nan")
        print(
            f"[{elapsed:7.1f} s] calls ok={tally.ok} failed={sum(tally.failed.values())} "
            f"retried={broker.stats.calls_retried} hung={tally.hung} "
            f"p99={p99:.1f} ms ({len(window)} calls)  churn {dict(self.actions)}",
            flush=True,
        )
        for row in rows:
            print(
                f"    soak-{row['slot']} (start {row['start']}): rss {row['rss_mb']:6.1f} MB  "
                f"fds {row['fds']:4}  tasks {row['tasks']:4}  links {row['links']}",
                flush=True,
            )

    # -- verdict ---------------------------------------------------------------

    def trends(self) -> dict[str, dict[str, float]]:
        """Per stable member and metric: growth over the measured span (least squares)."""
        warmup = self.args.warmup
        out: dict[str, dict[str, float]] = {}
        for slot in range(self.args.stable):
            rows = [s for s in self.samples if s["slot"] == slot and s["t"] >= warmup]
            if len(rows) < 3:
                continue
            ts = [r["t"] for r in rows]
            span = ts[-1] - ts[0]
            mean_t = sum(ts) / len(ts)
            var_t = sum((t - mean_t) ** 2 for t in ts) or 1.0
            for metric in GROWTH_LIMITS:
                ys = [float(r[metric]) for r in rows]
                mean_y = sum(ys) / len(ys)
                slope = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True))
                out.setdefault(f"soak-{slot}", {})[metric] = round(slope / var_t * span, 2)
                out[f"soak-{slot}"][f"{metric}_mean"] = round(mean_y, 1)
        return out

    def verdict(self, retried: int) -> tuple[bool, dict[str, Any]]:
        tally = self.tally
        problems = []
        if tally.failed:
            problems.append(f"retryable calls failed: {dict(tally.failed)}")
        if tally.hung:
            problems.append(f"{tally.hung} calls outlived their deadline by {HANG_MARGIN} s")
        if tally.ok == 0:
            problems.append("no call succeeded")
        trends = self.trends()
        if not trends:
            problems.append("too few samples after the warm-up to judge growth")
        for member, values in trends.items():
            for metric, (floor, share) in GROWTH_LIMITS.items():
                limit = max(floor, share * values[f"{metric}_mean"])
                if values[metric] > limit:
                    problems.append(
                        f"{member} {metric} grew {values[metric]} after warm-up (limit {limit:.1f})"
                    )
        ordered = sorted(tally.all_latencies)
        summary = {
            "minutes": self.args.minutes,
            "ok": tally.ok,
            "failed": dict(tally.failed),
            "retried": retried,
            "hung": tally.hung,
            "p50_ms": round(percentile(ordered, 0.50) * 1000, 2) if ordered else None,
            "p99_ms": round(percentile(ordered, 0.99) * 1000, 2) if ordered else None,
            "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
            "churn": dict(self.actions),
            "growth_after_warmup": trends,
            "problems": problems,
        }
        return not problems, summary

    def write(self, path: str, summary: dict[str, Any]) -> None:
        Path(path).write_text(json.dumps({"samples": self.samples, **summary}, indent=1))

    # -- run -------------------------------------------------------------------

    async def run(self) -> int:
        args = self.args
        for member in self.members[: args.members]:
            self.start(member)
        await asyncio.gather(*(self.wait_live(m) for m in self.members[: args.members]))
        broker = TCPMeshBroker(NullExecutor(Registry()), key=self.key.encode(), node_id="soak")
        async with broker:
            for member in self.members:
                broker.add_peer(member.host, member.port)
            for _ in range(300):
                if sum(1 for p in broker.peers() if p.connected and p.names) >= args.members:
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"the caller did not reach {args.members} members in 30 s")
            print(
                f"soak: {args.members} members up, {args.lanes} lanes, churn every "
                f"{args.churn_every} s, {args.minutes} min; logs in {self.workdir}",
                flush=True,
            )
            self.started = time.monotonic()
            lanes = [asyncio.create_task(self.lane(broker, i)) for i in range(args.lanes)]
            churn = asyncio.create_task(self.churn())
            end = self.started + args.minutes * 60
            while (now := time.monotonic()) < end:
                await asyncio.sleep(min(args.report_every, end - now))
                await self.report(broker)
            self.stopping = True
            churn.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            with contextlib.suppress(asyncio.CancelledError):
                await churn
            retried = broker.stats.calls_retried
        passed, summary = self.verdict(retried)
        print(json.dumps(summary, indent=2), flush=True)
        if args.out:
            self.write(args.out, summary)
        print("PASS" if passed else "FAIL: " + "; ".join(summary["problems"]), flush=True)
        return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak.sh", description=__doc__.split("\n")[0])
    parser.add_argument("minutes", nargs="?", type=float, default=30.0)
    parser.add_argument("--members", type=int, default=6)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--stable", type=int, default=3, help="members never churned")
    parser.add_argument("--lanes", type=int, default=8, help="calls kept in flight")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="each call's sleep")
    parser.add_argument("--call-timeout", type=float, default=10.0)
    parser.add_argument("--churn-every", type=float, default=4.0)
    parser.add_argument("--report-every", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=None, help="s (default: 1/4, max 120)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", help="write samples and summary as JSON here")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(120.0, args.minutes * 60 / 4)
    soak = Soak(args)
    try:
        return asyncio.run(soak.run())
    finally:
        soak.stopping = True
        soak.stop_all()
        shutil.rmtree(soak.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
