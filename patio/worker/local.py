"""``patio local``: a mesh of worker processes on this machine, and a demo workload.

What it does, in order:

1. Generates a key into a private temporary directory (file mode 0600) and
   starts N ``python -m patio worker`` processes, each on its own loopback
   address (127.0.0.2, 127.0.0.3, ... on Linux, where all of 127/8 is local;
   elsewhere 127.0.0.1 with one port each), every worker given all the others
   as static peers, exactly as pods get them from the operator.
2. Waits until every worker answers ``/readyz`` with 200.
3. Joins the mesh itself as a caller (NullExecutor: it serves nothing) and runs
   the workload from :mod:`patio.worker.demo.workload` against the demo tasks in
   :mod:`patio.worker.demo.tasks` (both ship in the package, so this works from
   a wheel, in any folder), with a progress line when it takes a while. A
   worker that exits is reported the moment it does; Ctrl-C (or SIGTERM)
   stops the workload and still prints what it measured.
4. Prints results per task, throughput and latency percentiles, the metrics
   URLs, and a summary scraped from each worker's ``/metrics``.
5. Stops everything: SIGTERM to each worker (graceful drain), then SIGKILL to
   each worker's process group for anything still alive. Workers run in their
   own sessions so a Ctrl-C in the terminal reaches only this process, which
   then stops them in order; the ``finally`` makes sure no process outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from patio.broker import TCPMeshBroker
from patio.executor import NullExecutor
from patio.registry import Registry
from patio.worker.aio import run_async
from patio.worker.client import describe_error, to_json
from patio.worker.config import DEFAULT_METRICS_PORT, DEFAULT_PORT
from patio.worker.demo import workload as demo_workload
from patio.worker.runtime import read_key_file

READY_TIMEOUT = 60.0
CONNECT_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
CALL_TIMEOUT = 30.0
PROGRESS_INTERVAL = 0.5
MONITOR_INTERVAL = 0.2
DEMO_REGISTRY = "patio.worker.demo.tasks:rpc"
# Workers get 127.0.0.2 ... 127.0.0.254 (one address each, default ports);
# .1 is left to everything else on the machine and .255 is the broadcast
# address of 127.0.0.0/24 on systems that route only that much.
FIRST_HOST = 2
MAX_WORKERS = 253
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True, slots=True)
class LocalOptions:
    workers: int = 3
    calls: int | None = 1000
    duration: float | None = None
    concurrency: int = 64
    executor: str = "async"
    registry: str | None = None
    keep_running: bool = False
    event_loop: str = "auto"
    key_file: str | None = None  # None: a fresh key in the private work directory


@dataclass(slots=True)
class LocalWorker:
    index: int
    node_id: str
    host: str
    port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"


@dataclass(slots=True)
class CallRecord:
    task: str
    ok: bool
    seconds: float
    error: str = ""


@dataclass(slots=True)
class WorkloadResult:
    records: list[CallRecord] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when `patio local` dies.

    Workers run in their own sessions so that Ctrl-C reaches only `patio local`,
    which then stops them in order; if `patio local` itself is killed with
    SIGKILL nothing would stop them, so ask the kernel to (a graceful drain).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def loopback_hosts(count: int) -> list[str]:
    """127.0.0.2..N+1 where the OS routes all of 127/8 to loopback (Linux), else 127.0.0.1.

    Starting at .2 keeps the demo off the address everything else on the
    machine uses, so its default ports are nearly always free.
    """
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"{count} workers: loopback addressing gives 1 to {MAX_WORKERS}")
    hosts = [f"127.0.0.{i + FIRST_HOST}" for i in range(count)]
    try:
        with socket.socket() as probe:
            probe.bind((hosts[-1], 0))
    except OSError:
        return ["127.0.0.1"] * count
    return hosts


def free_port(host: str, preferred: int, taken: set[tuple[str, int]]) -> int:
    """``preferred`` if it can be bound on ``host`` (and we did not hand it out), else any."""
    candidates = [preferred + i for i in range(20)]
    for port in candidates:
        if (host, port) in taken:
            continue
        with socket.socket() as probe:
            # As the worker's listener will: a port with only TIME_WAIT
            # connections left on it is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                continue
        taken.add((host, port))
        return port
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = int(probe.getsockname()[1])
    taken.add((host, port))
    return port


def percentile(sorted_values: list[float], share: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(share * (len(sorted_values) - 1))))
    return sorted_values[index]


async def http_get(host: str, port: int, path: str, limit: float = 2.0) -> tuple[int, str]:
    """A minimal GET (the cluster is ours, on loopback; no need for a client library)."""
    async with asyncio.timeout(limit):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("utf-8", "replace")


class LocalCluster:
    """The worker processes, their key and logs; :meth:`stop` leaves nothing behind."""

    def __init__(self, options: LocalOptions, *, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.out = out
        self.workdir = Path(tempfile.mkdtemp(prefix="patio-local-"))  # created 0700
        given = options.key_file
        self.key_file = Path(given).resolve() if given is not None else self.workdir / "key"
        self.workers: list[LocalWorker] = []
        self.keep_workdir = False
        self.reported_dead: set[int] = set()

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def plan(self) -> None:
        hosts = loopback_hosts(self.options.workers)
        taken: set[tuple[str, int]] = set()
        for index, host in enumerate(hosts):
            self.workers.append(
                LocalWorker(
                    index=index,
                    node_id=f"local-{index}",
                    host=host,
                    port=free_port(host, DEFAULT_PORT, taken),
                    metrics_port=free_port(host, DEFAULT_METRICS_PORT, taken),
                    log_path=self.workdir / f"local-{index}.log",
                )
            )

    def write_key(self) -> bytes:
        """The key of ``--key-file`` (checked before anything starts), else a fresh one."""
        if self.options.key_file is not None:
            return read_key_file(str(self.key_file))
        key = secrets.token_urlsafe(32)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(key + "\n")
        return key.encode()

    def child_env(self) -> dict[str, str]:
        # A PATIO_* variable in the user's shell (a peers file, a key) must not
        # leak into the demo workers: each gets exactly the flags below.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PATIO_") and k not in ("POD_IP", "POD_NAME")
        }
        # Where this patio was imported from (a checkout or site-packages), so
        # the workers run the same patio even when it is not installed.
        paths = [str(Path(__file__).resolve().parents[2])]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        env = self.child_env()
        registry = self.options.registry or DEMO_REGISTRY
        for worker in self.workers:
            peers = ",".join(w.address for w in self.workers if w is not worker)
            argv = [
                sys.executable, "-m", "patio", "worker", registry,
                "--listen", worker.host,
                "--port", str(worker.port),
                "--metrics-port", str(worker.metrics_port),
                "--node-id", worker.node_id,
                "--key-file", str(self.key_file),
                "--executor", self.options.executor,
                "--drain-timeout", "10",
                "--event-loop", self.options.event_loop,
            ]  # fmt: skip
            if peers:
                argv += ["--peers", peers]
            with open(worker.log_path, "wb") as log:
                worker.process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,
                    # no threads run yet: the caller and to_thread start after this
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
                )  # fmt: skip

    def newly_dead(self) -> list[LocalWorker]:
        """Workers that exited since the last look (each one is returned once)."""
        dead = []
        for worker in self.workers:
            process = worker.process
            exited = process is not None and process.poll() is not None
            if exited and worker.index not in self.reported_dead:
                self.reported_dead.add(worker.index)
                dead.append(worker)
        return dead

    def report_dead(self, worker: LocalWorker, lines: int = 8) -> None:
        assert worker.process is not None
        code = worker.process.returncode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with code {code}"
        )
        self.keep_workdir = True
        self.say(
            f"\npatio local: worker {worker.node_id} ({worker.address}, pid {worker.process.pid}) "
            f"{how} at {time.strftime('%H:%M:%S')}; the end of its log ({worker.log_path}):"
        )
        self.say(self.log_tail(worker, lines))

    def log_tail(self, worker: LocalWorker, lines: int = 8) -> str:
        try:
            text = worker.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    async def wait_ready(self) -> LocalWorker | None:
        """None when every worker is ready; else the first one that died or never got ready."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        pending = list(self.workers)
        while pending:
            for worker in self.workers:
                assert worker.process is not None
                if worker.process.poll() is not None:
                    return worker
            for worker in list(pending):
                with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                    status, body = await http_get(
                        worker.host, worker.metrics_port, "/readyz?verbose", 1.0
                    )
                    # Ours, not another program that took the port first.
                    if status == 200 and f"\nnode {worker.node_id}\n" in body:
                        pending.remove(worker)
            if pending and loop.time() > deadline:
                return pending[0]
            if pending:
                await asyncio.sleep(0.1)
        return None

    def stop(self) -> None:
        """SIGTERM every worker (graceful drain), then SIGKILL each process group."""
        alive = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        for worker in alive:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in alive:
            assert worker.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process is None:
                continue
            # The process group also holds what a worker started (a process pool).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(5)
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def connect_caller(cluster: LocalCluster, key: bytes) -> Any:
    broker = TCPMeshBroker(NullExecutor(Registry()), key=key, node_id="local-caller")
    await broker.__aenter__()
    for worker in cluster.workers:
        broker.add_peer(worker.host, worker.port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT
    while loop.time() < deadline:
        peers = list(broker.peers())
        if sum(1 for p in peers if p.connected) >= len(cluster.workers):
            return broker
        await asyncio.sleep(0.02)
    await broker.close()
    raise ConnectionError(f"the caller could not connect to all {len(cluster.workers)} workers")


class Progress:
    """A progress line: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, out: TextIO, total: int | None, duration: float | None) -> None:
        self.out = out
        self.total = total
        self.duration = duration
        self.tty = out.isatty()
        self.started = time.perf_counter()
        self.last_line = 0.0
        self.printed = False

    def update(self, done: int, errors: int, final: bool = False) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        if not self.tty and not final and (elapsed < 2.0 or now - self.last_line < 2.0):
            return
        if final and not self.printed:
            return
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            share = min(1.0, done / self.total)
        elif self.duration:
            share = min(1.0, elapsed / self.duration)
        else:
            share = 0.0
        bar = "#" * int(share * 24)
        line = (
            f"  [{bar:<24}] {done}{'/' + str(self.total) if self.total else ''} calls"
            f"  {rate:,.0f} calls/s  {errors} errors  {elapsed:.1f}s"
        )
        self.last_line = now
        self.printed = True
        if self.tty:
            end = "\n" if final else ""
            print("\r" + line + "\x1b[K", end=end, file=self.out, flush=True)
        else:
            print(line, file=self.out, flush=True)


async def run_workload(
    broker: Any,
    options: LocalOptions,
    out: TextIO,
    calls: Iterator[tuple[str, tuple[Any, ...]]],
    result: WorkloadResult,
) -> None:
    """Fill ``result`` as calls finish, so a cancelled run still has what it measured."""
    limit = options.calls
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.duration if options.duration else None
    progress = Progress(out, limit, options.duration)
    issued = 0
    errors = 0

    def next_call() -> tuple[str, tuple[Any, ...]] | None:
        nonlocal issued
        if limit is not None and issued >= limit:
            return None
        if deadline is not None and loop.time() >= deadline:
            return None
        issued += 1
        return next(calls)

    async def lane() -> None:
        nonlocal errors
        while (item := next_call()) is not None:
            task, args = item
            t0 = time.perf_counter()
            try:
                value = await broker.call(task, *args, timeout=CALL_TIMEOUT)
            except Exception as exc:
                seconds = time.perf_counter() - t0
                errors += 1
                result.records.append(CallRecord(task, False, seconds, describe_error(exc)))
                result.examples.setdefault(
                    f"{task}!", f"{task}{_args(args)} -> {describe_error(exc)}"
                )
            else:
                seconds = time.perf_counter() - t0
                result.records.append(CallRecord(task, True, seconds))
                result.examples.setdefault(task, f"{task}{_args(args)} = {_short(to_json(value))}")

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            progress.update(len(result.records), errors)

    reporter = asyncio.ensure_future(report())
    started = time.perf_counter()
    try:
        await asyncio.gather(*(lane() for _ in range(options.concurrency)))
    finally:
        result.elapsed = time.perf_counter() - started
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    progress.update(len(result.records), errors, final=True)


def _args(args: tuple[Any, ...]) -> str:
    return "(" + ", ".join(_short(repr(a), 24) for a in args) + ")"


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summarize(result: WorkloadResult, expected_errors: set[str], out: TextIO) -> bool:
    """Print per-task results and totals; False if a call failed that should not have."""
    by_task: dict[str, list[CallRecord]] = defaultdict(list)
    for record in result.records:
        by_task[record.task].append(record)
    header = f"{'task':<8} {'calls':>6} {'ok':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}"
    print(f"\n  {header}  example", file=out)
    unexpected = 0
    for task in sorted(by_task):
        records = by_task[task]
        latencies = sorted(r.seconds for r in records)
        failed = [r for r in records if not r.ok]
        if task not in expected_errors:
            unexpected += len(failed)
        example = result.examples.get(task) or result.examples.get(f"{task}!", "")
        print(
            f"  {task:<8} {len(records):>6} {len(records) - len(failed):>6} {len(failed):>6} "
            f"{percentile(latencies, 0.5) * 1000:>8.2f} {percentile(latencies, 0.99) * 1000:>8.2f}"
            f"  {example}",
            file=out,
        )
        if failed:
            kinds = Counter(r.error.split(":", 1)[0] for r in failed)
            sample = result.examples.get(f"{task}!", "")
            note = " (on purpose)" if task in expected_errors else " (UNEXPECTED)"
            print(f"  {'':<8} errors{note}: "
                  + ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
                  + (f"; e.g. {_short(sample, 90)}" if sample else ""), file=out)  # fmt: skip
    latencies = sorted(r.seconds for r in result.records)
    total = len(result.records)
    failed_total = sum(1 for r in result.records if not r.ok)
    rate = total / result.elapsed if result.elapsed > 0 else 0.0
    print(
        f"\n  total: {total} calls in {result.elapsed:.2f}s = {rate:,.0f} calls/s; "
        f"latency p50 {percentile(latencies, 0.5) * 1000:.2f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms; {failed_total} errors"
        + (f" ({unexpected} unexpected)" if unexpected else ""),
        file=out,
    )
    return unexpected == 0


async def scrape_summary(cluster: LocalCluster) -> list[str]:
    lines = []
    for worker in cluster.workers:
        try:
            _, text = await http_get(worker.host, worker.metrics_port, "/metrics")
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            lines.append(f"  {worker.node_id}: /metrics unreachable ({exc})")
            continue
        executed: Counter[str] = Counter()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "patio_calls_finished_total"
                    and sample.labels.get("side") == "executor"
                ):
                    executed[sample.labels.get("outcome", "?")] += int(sample.value)
                elif sample.name in ("patio_peers_missing", "patio_bytes_received_total"):
                    values[sample.name] = sample.value
        outcomes = ", ".join(
            f"{k} {v}" for k, v in sorted(executed.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
        )
        lines.append(
            f"  {worker.node_id}  executed {sum(executed.values())} calls ({outcomes or 'none'}); "
            f"{int(values.get('patio_peers_missing', 0))} links missing; "
            f"received {values.get('patio_bytes_received_total', 0) / 1024:,.0f} KiB"
        )
    return lines


def patio_command() -> list[str]:
    """How to run this patio again from a shell: ``patio`` when that is what runs."""
    script = Path(sys.argv[0])
    if script.name == "patio":
        on_path = shutil.which("patio")
        if on_path is not None and Path(on_path).resolve() == script.resolve():
            return ["patio"]
        return [str(script.resolve())]
    return [sys.executable, "-m", "patio"]


def cluster_commands(cluster: LocalCluster) -> list[str]:
    """Commands that reach the running cluster, ready to paste."""
    first = cluster.workers[0]
    auth = ["--peer", first.address, "--key-file", str(cluster.key_file)]
    base = patio_command()
    return [
        shlex.join([*base, "status", *auth]),
        shlex.join([*base, "call", *auth, "mul", "6", "7"]),
        f"curl {first.metrics_url}/metrics",
    ]


async def watch_workers(cluster: LocalCluster, all_dead: asyncio.Event) -> None:
    """Report each worker the moment it exits; set ``all_dead`` when none is left."""
    while True:
        for worker in cluster.newly_dead():
            cluster.report_dead(worker)
        if len(cluster.reported_dead) == len(cluster.workers):
            all_dead.set()
            return
        await asyncio.sleep(MONITOR_INTERVAL)


async def _first(*waits: asyncio.Future[Any]) -> None:
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)


async def _main(cluster: LocalCluster, key: bytes) -> int:
    """Run the cluster; SIGINT/SIGTERM end whatever phase is running, cleanly."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        return await _run(cluster, key, interrupted)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(cluster: LocalCluster, key: bytes, interrupted: asyncio.Event) -> int:
    options = cluster.options
    say = cluster.say
    run_demo = options.registry is None and (options.calls != 0 or bool(options.duration))
    interrupt = asyncio.ensure_future(interrupted.wait())
    all_dead = asyncio.Event()
    monitor: asyncio.Future[None] | None = None
    try:
        say(f"patio local: starting {len(cluster.workers)} workers ({options.executor} executor)")
        cluster.start()
        # From now on a worker that exits is reported when it does, even
        # while the others are still starting.
        monitor = asyncio.ensure_future(watch_workers(cluster, all_dead))
        t0 = time.perf_counter()
        ready = asyncio.ensure_future(cluster.wait_ready())
        await _first(ready, interrupt)
        if not ready.done():
            ready.cancel()
            say("\npatio local: interrupted while starting")
            return 130
        failed = ready.result()
        if failed is not None:
            _report_not_ready(cluster, failed)
            return 1
        _say_ready(cluster, time.perf_counter() - t0)

        ok = True
        if run_demo:
            ok = await _run_demo(cluster, key, interrupt)
            if interrupt.done():
                return 130

        say("\nmetrics per worker (scraped from /metrics):")
        for line in await scrape_summary(cluster):
            say(line)
        targets = ", ".join(f"{w.host}:{w.metrics_port}" for w in cluster.workers)
        say(f"  Prometheus scrape targets: {targets}")

        if options.keep_running and not await _keep_running(cluster, interrupt, all_dead):
            return 1
        return 0 if ok and not cluster.reported_dead else 1
    finally:
        interrupt.cancel()
        if monitor is not None:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor


def _report_not_ready(cluster: LocalCluster, failed: LocalWorker) -> None:
    """Why a worker did not become ready: its exit, or its log when it still runs."""
    assert failed.process is not None
    if failed.process.poll() is not None:
        for worker in cluster.newly_dead():
            cluster.report_dead(worker, lines=15)
        return
    cluster.say(f"patio local: worker {failed.node_id} not ready after {READY_TIMEOUT:g}s; "
                f"its log ({failed.log_path}):")  # fmt: skip
    cluster.say(cluster.log_tail(failed, 15))
    cluster.keep_workdir = True


def _say_ready(cluster: LocalCluster, seconds: float) -> None:
    """Each worker's addresses and the commands that reach the cluster."""
    say = cluster.say
    say(f"  all {len(cluster.workers)} workers ready in {seconds:.1f}s:")
    for worker in cluster.workers:
        pid = worker.process.pid if worker.process is not None else 0
        say(
            f"  {worker.node_id}  mesh {worker.address}  "
            f"metrics {worker.metrics_url}/metrics  health {worker.metrics_url}/readyz  "
            f"pid {pid}"
        )
    say("  reach it with:")
    for command in cluster_commands(cluster):
        say(f"    {command}")


async def _keep_running(
    cluster: LocalCluster, interrupt: asyncio.Future[Any], all_dead: asyncio.Event
) -> bool:
    """Until Ctrl-C (True) or until every worker has exited (False)."""
    cluster.say("\ncluster is running (commands above); Ctrl-C stops it.")
    dead = asyncio.ensure_future(all_dead.wait())
    try:
        await _first(interrupt, dead)
    finally:
        dead.cancel()
    if not interrupt.done():
        cluster.say("patio local: every worker exited; stopping")
        return False
    cluster.say("\npatio local: stopping the workers")
    return True


async def _run_demo(cluster: LocalCluster, key: bytes, interrupt: asyncio.Future[Any]) -> bool:
    """The demo workload until done or interrupted; prints what it measured either way."""
    options = cluster.options
    say = cluster.say
    broker = await connect_caller(cluster, key)
    result = WorkloadResult()
    try:
        what = f"{options.calls} calls" if options.calls else f"calls for {options.duration:g}s"
        if options.calls and options.duration:
            what += f" (at most {options.duration:g}s)"
        say(f"\nworkload: {what} over tasks {', '.join(demo_workload.MIX)} "
            f"({options.concurrency} in flight)")  # fmt: skip
        work = asyncio.ensure_future(
            run_workload(broker, options, cluster.out, demo_workload.calls(), result)
        )
        try:
            await _first(work, interrupt)
        finally:
            if not work.done():
                work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    finally:
        await broker.close()
    if interrupt.done():
        say(f"\npatio local: interrupted; results of the {len(result.records)} calls made so far:")
    return summarize(result, set(demo_workload.EXPECTED_ERRORS), cluster.out)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_local(options: LocalOptions, *, out: TextIO = sys.stdout) -> int:
    cluster = LocalCluster(options, out=out)
    # Outside the event loop (planning, stopping) SIGTERM is a KeyboardInterrupt
    # like Ctrl-C; inside it both are handled by _main.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cluster.plan()
        key = cluster.write_key()
        code = run_async(_main(cluster, key), event_loop=options.event_loop)
    except KeyboardInterrupt:
        print("\npatio local: interrupted; stopping the workers", file=out, flush=True)
        code = 130
    except Exception as exc:  # one clear line, and the workers' logs kept to look at
        print(f"patio local: error: {describe_error(exc)}", file=out, flush=True)
        cluster.keep_workdir = True
        code = 1
    finally:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # a signal during stop() still stops
        try:
            cluster.stop()
        except KeyboardInterrupt:
            for worker in cluster.workers:
                if worker.process is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(worker.process.pid, signal.SIGKILL)
        signal.signal(signal.SIGTERM, previous)
    if cluster.keep_workdir:
        print(f"patio local: worker logs kept in {cluster.workdir}", file=out)
    else:
        print("patio local: stopped all workers", file=out)
    return code
