"""What is measured: one definition per scenario, shared by all systems."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    kind: str  # memory | pair | fanout | mesh | flood
    concurrency: int  # in-flight calls per caller process
    count: int  # calls issued per caller process (upper bound)
    max_seconds: float  # stop issuing after this long (bounded load)
    payload: int = 0  # bytes of argument and result; 0 = a small int
    task: str = "echo"
    workers: int = 0  # executor max_workers; 0 = same as concurrency
    executors: int = 1  # executing processes (fanout) / mesh size
    warmup: int = 500
    remote_only: bool = False  # mesh: every call goes to another process
    call_timeout: float | None = None  # passed as call(..., timeout=) when set
    frame_mac: bool = True  # False: frames without MAC (our patio only, loopback)

    @property
    def executor_workers(self) -> int:
        return self.workers or max(self.concurrency, 1)

    def describe(self) -> str:
        return self.title


FULL: list[Scenario] = [
    Scenario(
        "memory_c1", "in-memory broker, async executor, concurrency 1", "memory", 1, 30_000, 5.0
    ),
    Scenario(
        "memory_c256",
        "in-memory broker, async executor, concurrency 256",
        "memory",
        256,
        100_000,
        5.0,
    ),
    Scenario(
        "tcp_c1", "TCP, one caller -> one executor, concurrency 1 (latency)", "pair", 1, 8_000, 5.0
    ),
    Scenario("tcp_c64", "TCP, one caller -> one executor, concurrency 64", "pair", 64, 80_000, 6.0),
    Scenario(
        "tcp_c64_nomac",
        "TCP, concurrency 64, frames without MAC (ours only: the cost of authenticated frames)",
        "pair",
        64,
        80_000,
        6.0,
        frame_mac=False,
    ),
    Scenario(
        "tcp_c1024",
        "TCP, one caller -> one executor, concurrency 1024",
        "pair",
        1024,
        100_000,
        6.0,
        warmup=2048,
    ),
    Scenario(
        "tcp_c64_timeout",
        "TCP, concurrency 64, every call with timeout=30 s (the cost of a per-call deadline)",
        "pair",
        64,
        80_000,
        6.0,
        call_timeout=30.0,
    ),
    Scenario(
        "tcp_64k_c64",
        "TCP, 64 KiB argument and result, concurrency 64",
        "pair",
        64,
        8_000,
        6.0,
        payload=64 * 1024,
        warmup=200,
    ),
    Scenario(
        "fanout2_c256",
        "TCP, one caller -> two executing processes, concurrency 256",
        "fanout",
        256,
        80_000,
        6.0,
        executors=2,
    ),
    Scenario(
        "mesh4_c64",
        "4-process mesh, each caller+executor, concurrency 64 each "
        "(any member may serve a call, itself included)",
        "mesh",
        64,
        25_000,
        6.0,
        executors=4,
    ),
    Scenario(
        "mesh4_remote_c64",
        "4-process mesh, concurrency 64 each, every call served by "
        "another process (node i calls echo<i>, served by the other three)",
        "mesh",
        64,
        25_000,
        6.0,
        executors=4,
        remote_only=True,
    ),
    Scenario(
        "flood_100k",
        "100,000 calls at once, task sleeps 10 ms, executor max_workers 512",
        "flood",
        100_000,
        100_000,
        120.0,
        task="slow",
        workers=512,
        warmup=0,
    ),
]

QUICK: list[Scenario] = [
    Scenario(
        "memory_c256",
        "in-memory broker, async executor, concurrency 256",
        "memory",
        256,
        2_000,
        2.0,
        warmup=100,
    ),
    Scenario(
        "tcp_c1",
        "TCP, one caller -> one executor, concurrency 1 (latency)",
        "pair",
        1,
        300,
        2.0,
        warmup=20,
    ),
    Scenario(
        "tcp_c64",
        "TCP, one caller -> one executor, concurrency 64",
        "pair",
        64,
        3_000,
        2.0,
        warmup=100,
    ),
    Scenario(
        "flood_2k",
        "2,000 calls at once, task sleeps 10 ms, executor max_workers 512",
        "flood",
        2_000,
        2_000,
        30.0,
        task="slow",
        workers=512,
        warmup=0,
    ),
]


def select(quick: bool, names: list[str] | None) -> list[Scenario]:
    pool = QUICK if quick else FULL
    if not names:
        return list(pool)
    other = QUICK if pool is FULL else FULL
    known = {**{s.name: s for s in other}, **{s.name: s for s in pool}}
    missing = [n for n in names if n not in known]
    if missing:
        raise SystemExit(f"unknown scenario(s): {', '.join(missing)}; known: {sorted(known)}")
    return [known[n] for n in names]
