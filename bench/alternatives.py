"""``--alternatives``: the same burst of tiny tasks and single-call latency
through Ray (local) and Celery (Redis broker/backend on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.envs import WORKERS, PythonEnv, ensure_venv
from bench.procs import Proc, ProcGroup, WorkerError, free_port

BURST = 5_000
LATENCY_CALLS = 300
MAX_SECONDS = 120.0


def _record(system: str, **fields: Any) -> dict[str, Any]:
    return {"type": "alternative", "system": system, "burst": BURST, **fields}


def _stop_group(popen: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if popen.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)


def run_ray(log_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    try:
        python = ensure_venv("bench-venv-ray", ["ray"], log=log_dir / "ray-setup.log")
    except (subprocess.SubprocessError, OSError) as exc:
        return _record("ray", ok=False, error=f"Ray could not be installed here: {exc}")
    env = PythonEnv(str(python), {}, isolated=True)
    cfg = {"burst": BURST, "latency_calls": LATENCY_CALLS, "max_seconds": MAX_SECONDS}
    try:
        with ProcGroup() as group:
            proc = group.add(Proc(env, WORKERS / "ray_node.py", cfg, "alt-ray", log_dir))
            result = proc.expect("result", MAX_SECONDS * 3)
    except (WorkerError, OSError) as exc:
        return _record("ray", ok=False, error=str(exc)[:1500])
    log(f"ray: {result.get('calls_per_s', 0):,.0f} tasks/s, p50 {result.get('p50_us', 0):,.0f} µs")
    return _record(
        "ray",
        ok=result.get("completed") == BURST,
        **_fields(result),
        version=result.get("ray_version"),
        setup="ray.init(num_cpus=2), local",
    )


def _fields(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("issued", "completed", "elapsed_s", "calls_per_s", "p50_us", "p99_us", "latency_calls")
    out = {k: result.get(k) for k in keys}
    out["caller_rss_mb"] = (result.get("usage") or {}).get("maxrss_mb")
    return out


def _redis_server() -> str | None:
    path = shutil.which("redis-server")
    if path:
        return path
    for cmd in (
        ["apt-get", "install", "-y", "-q", "redis-server"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "redis-server"],
    ):
        subprocess.run(cmd, capture_output=True, timeout=600, check=False)
        path = shutil.which("redis-server")
        if path:
            return path
    return None


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def run_celery(log_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    redis = _redis_server()
    if redis is None:
        return _record("celery", ok=False, error="redis-server could not be installed")
    try:
        python = ensure_venv(
            "bench-venv-celery", ["celery", "redis", "packaging"], log=log_dir / "celery-setup.log"
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return _record("celery", ok=False, error=f"Celery could not be installed: {exc}")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = PythonEnv(
        str(python), {"BENCH_REDIS_URL": url, "PYTHONPATH": str(WORKERS)}, isolated=False
    )
    server = worker = None
    cfg = {"burst": BURST, "latency_calls": LATENCY_CALLS, "max_seconds": MAX_SECONDS}
    try:
        with (
            open(log_dir / "alt-redis.log", "wb") as redis_log,
            open(log_dir / "alt-celery-worker.log", "wb") as worker_log,
        ):
            server = subprocess.Popen(
                [
                    redis,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=redis_log,
                stderr=redis_log,
                start_new_session=True,
            )
            if not _wait_port(port, 20):
                return _record("celery", ok=False, error="redis-server did not start")
            worker = subprocess.Popen(
                [
                    str(python),
                    "-m",
                    "celery",
                    "-A",
                    "celery_app",
                    "worker",
                    "--concurrency=2",
                    "--loglevel=WARNING",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                cwd=WORKERS,
                env=env.environ(),
                stdout=worker_log,
                stderr=worker_log,
                start_new_session=True,
            )
            with ProcGroup() as group:
                proc = group.add(
                    Proc(env, WORKERS / "celery_client.py", cfg, "alt-celery", log_dir)
                )
                result = proc.expect("result", MAX_SECONDS * 3)
    except (WorkerError, OSError) as exc:
        return _record("celery", ok=False, error=str(exc)[:1500])
    finally:
        if worker is not None:
            _stop_group(worker)
        if server is not None:
            _stop_group(server)
    log(
        f"celery: {result.get('calls_per_s', 0):,.0f} tasks/s, "
        f"p50 {result.get('p50_us', 0):,.0f} µs"
    )
    return _record(
        "celery",
        ok=result.get("completed") == BURST,
        **_fields(result),
        version=result.get("celery_version"),
        setup="Celery prefork worker (concurrency 2), Redis broker+backend",
    )


def run_alternatives(
    log_dir: Path, use_uvloop: bool, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    del use_uvloop  # neither Ray nor Celery runs on our loop
    out = []
    for runner in (run_ray, run_celery):
        log(f"alternatives: {runner.__name__}")
        out.append(runner(log_dir, log))
    return out


def markdown(rows: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> str:
    idx = {(s["scenario"], s["system"]): s for s in summaries}
    lines = [
        "## Alternatives (one run)",
        "",
        f"A burst of {BURST:,} tiny tasks submitted at once (tasks/s until all results are "
        f"back) and {LATENCY_CALLS} sequential single calls (latency). For comparison, "
        "patio rows: burst = `tcp_c1024` calls/s, latency = `tcp_c1` p50/p99.",
        "",
        "| system | setup | burst tasks/s | single-call p50 µs | p99 µs | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("calls_per_s") is None:
            lines.append(f"| {r['system']} | — | — | — | — | {str(r.get('error'))[:200]} |")
            continue
        lines.append(
            f"| {r['system']} {r.get('version') or ''} | {r.get('setup')} "
            f"| {r['calls_per_s']:,.0f} | {r['p50_us']:,.0f} | {r['p99_us']:,.0f} "
            f"| {r['completed']}/{r['issued']} completed |"
        )
    for system in ("ours", "original", "ceiling"):
        burst = idx.get(("tcp_c1024", system), {}).get("calls_per_s")
        lat = idx.get(("tcp_c1", system), {})
        if burst is None and not lat:
            continue

        def fmt(v: Any) -> str:
            return "—" if v is None else f"{v:,.0f}"

        lines.append(
            f"| {system} | TCP pair, see main table | {fmt(burst)} "
            f"| {fmt(lat.get('p50_us'))} | {fmt(lat.get('p99_us'))} | |"
        )
    lines.append("")
    return "\n".join(lines)
