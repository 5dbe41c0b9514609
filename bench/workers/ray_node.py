"""Ray (local, ``ray.init(num_cpus=2)``): a burst of tiny tasks, then
single-call latency. Run by ``bench/alternatives.py`` in Ray's own venv."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import _bench_common as common  # type: ignore[import-not-found]
import ray  # type: ignore[import-not-found]


@ray.remote  # type: ignore[untyped-decorator]
def echo(value: Any) -> Any:
    return value


def main(cfg: dict[str, Any]) -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.get([echo.remote(i) for i in range(200)])  # warm the worker pool
        burst = cfg["burst"]
        t0 = time.perf_counter()
        refs = [echo.remote(7) for _ in range(burst)]
        values = ray.get(refs, timeout=cfg["max_seconds"])
        elapsed = time.perf_counter() - t0
        completed = sum(1 for v in values if v == 7)
        lat: list[float] = []
        deadline = time.perf_counter() + cfg["max_seconds"]
        for _ in range(cfg["latency_calls"]):
            if time.perf_counter() > deadline:
                break
            s = time.perf_counter()
            ray.get(echo.remote(7))
            lat.append(time.perf_counter() - s)
        lat.sort()
        common.emit(
            "result",
            issued=burst,
            completed=completed,
            elapsed_s=elapsed,
            calls_per_s=completed / elapsed,
            latency_calls=len(lat),
            p50_us=common.percentile(lat, 0.5) * 1e6,
            p99_us=common.percentile(lat, 0.99) * 1e6,
            ray_version=ray.__version__,
            usage=common.usage(),
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except Exception as exc:
        common.emit("error", error=f"{type(exc).__name__}: {exc}"[:1000])
        raise
