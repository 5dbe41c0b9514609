"""Celery caller: a burst of tiny tasks, then single-call latency."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import _bench_common as common  # type: ignore[import-not-found]
from celery_app import app, echo  # type: ignore[import-not-found]


def main(cfg: dict[str, Any]) -> None:
    deadline = time.perf_counter() + 60
    while True:  # wait for the worker
        replies = app.control.ping(timeout=1.0)
        if replies or time.perf_counter() > deadline:
            break
    for r in [echo.delay(i) for i in range(50)]:
        r.get(timeout=60)
    burst = cfg["burst"]
    t0 = time.perf_counter()
    results = [echo.delay(7) for _ in range(burst)]
    completed = 0
    for r in results:
        if r.get(timeout=cfg["max_seconds"]) == 7:
            completed += 1
    elapsed = time.perf_counter() - t0
    lat: list[float] = []
    stop = time.perf_counter() + cfg["max_seconds"]
    for _ in range(cfg["latency_calls"]):
        if time.perf_counter() > stop:
            break
        s = time.perf_counter()
        echo.delay(7).get(timeout=30)
        lat.append(time.perf_counter() - s)
    lat.sort()
    import celery  # type: ignore[import-not-found]

    common.emit(
        "result",
        issued=burst,
        completed=completed,
        elapsed_s=elapsed,
        calls_per_s=completed / elapsed,
        latency_calls=len(lat),
        p50_us=common.percentile(lat, 0.5) * 1e6,
        p99_us=common.percentile(lat, 0.99) * 1e6,
        celery_version=celery.__version__,
        usage=common.usage(),
    )


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except Exception as exc:
        common.emit("error", error=f"{type(exc).__name__}: {exc}"[:1000])
        raise
