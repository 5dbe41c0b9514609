"""Runs scenarios against the systems, interleaved, and collects records."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.envs import WORKERS, PythonEnv
from bench.procs import Proc, ProcGroup, WorkerError, free_port
from bench.scenarios import Scenario

KEY = "bench-shared-key"
PATIO_SCRIPT = WORKERS / "patio_node.py"
RAW_SCRIPT = WORKERS / "raw_node.py"

PROBE = r"""
import json, importlib
out = {}
try:
    import patio
    from importlib import metadata
    out["file"] = patio.__file__
    try:
        out["version"] = metadata.version("patio")
    except Exception:
        out["version"] = getattr(patio, "__version__", "work tree (not pip-installed)")
    from patio import Registry  # noqa
    from patio.executor import AsyncExecutor  # noqa
    from patio.broker import MemoryBroker  # noqa
    out["memory"] = True
except Exception as exc:
    out["memory"] = False
    out["memory_error"] = repr(exc)
try:
    try:
        from patio.broker.tcp import TCPServerBroker, TCPClientBroker  # noqa
    except ImportError:
        from patio.broker import TCPServerBroker, TCPClientBroker  # noqa
    out["tcp"] = True
except Exception as exc:
    out["tcp"] = False
    out["tcp_error"] = repr(exc)
try:
    import patio.broker as b
    out["mesh"] = hasattr(b, "TCPMeshBroker")
except Exception:
    out["mesh"] = False
for mod in ("uvloop", "msgpack"):
    try:
        importlib.import_module(mod)
        out[mod] = True
    except Exception:
        out[mod] = False
print(json.dumps(out))
"""


@dataclass
class System:
    name: str  # ours | original | ceiling
    label: str
    env: PythonEnv
    script: Path
    serializer: str
    caps: dict[str, Any] = field(default_factory=dict)

    def supports(self, scenario: Scenario) -> str | None:
        """None if it can run ``scenario``, else why not."""
        if not scenario.frame_mac and self.name != "ours":
            return "frame_mac=False exists in our patio only"
        if self.name == "ceiling":
            return None
        if not self.caps.get("memory"):
            return f"patio not importable: {self.caps.get('memory_error')}"
        if scenario.kind != "memory" and not self.caps.get("tcp"):
            return f"no TCP brokers: {self.caps.get('tcp_error')}"
        return None


def probe(env: PythonEnv) -> dict[str, Any]:
    import subprocess

    proc = subprocess.run(
        [env.python, *(["-E", "-s"] if env.isolated else []), "-c", PROBE],
        env=env.environ(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"memory": False, "memory_error": proc.stderr[-500:], "tcp": False}


def _cfg(sc: Scenario, use_uvloop: bool, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "mode": "flood" if sc.kind == "flood" else "loop",
        "use_uvloop": use_uvloop,
        "concurrency": sc.concurrency,
        "count": sc.count,
        "max_seconds": sc.max_seconds,
        "warmup": sc.warmup,
        "payload": sc.payload,
        "task": sc.task,
        "workers": sc.executor_workers,
        "key": KEY,
        "call_timeout": sc.call_timeout,
        "frame_mac": sc.frame_mac,
    }
    cfg.update(extra)
    return cfg


def _result_timeout(sc: Scenario) -> float:
    return sc.max_seconds + 90.0


def _usage(msg: dict[str, Any]) -> dict[str, float]:
    return dict(msg.get("usage") or {})


def measure(
    system: System, sc: Scenario, use_uvloop: bool, log_dir: Path, run: int
) -> dict[str, Any]:
    """One measurement of ``sc`` on ``system``; never raises for worker failures."""
    tag = f"{sc.name}-{system.name}-r{run}"
    record: dict[str, Any] = {
        "type": "run",
        "system": system.name,
        "scenario": sc.name,
        "run": run,
        "kind": sc.kind,
        "concurrency": sc.concurrency,
        "payload_bytes": sc.payload,
        "loop_policy": "uvloop" if use_uvloop else "asyncio",
        "serializer": system.serializer,
    }
    why_not = system.supports(sc)
    if why_not:
        record.update(ok=False, status="unavailable", error=why_not)
        return record
    t0 = time.monotonic()
    record["loadavg_1m_before"] = round(os.getloadavg()[0], 2)
    try:
        with ProcGroup() as group:
            if sc.kind == "memory":
                body = _run_memory(system, sc, use_uvloop, log_dir, tag, group)
            elif sc.kind == "mesh":
                body = _run_mesh(system, sc, use_uvloop, log_dir, tag, group)
            else:
                body = _run_client_server(system, sc, use_uvloop, log_dir, tag, group)
        record.update(body)
        complete = record.get("completed") == record.get("issued") and not record.get("errors")
        record["all_completed"] = bool(complete)
        record["ok"] = bool(complete)
        record["status"] = "ok" if complete else "incomplete"
    except (WorkerError, OSError) as exc:
        record.update(ok=False, status="error", error=str(exc)[:2000], all_completed=False)
    record["wall_s"] = round(time.monotonic() - t0, 2)
    return record


def _pick(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "issued",
        "completed",
        "errors",
        "first_error",
        "elapsed_s",
        "calls_per_s",
        "p50_us",
        "p99_us",
        "timed_out",
        "loop",
        "patio_version",
        "patio_file",
    )
    return {k: result[k] for k in keys if k in result}


def _run_memory(
    system: System, sc: Scenario, use_uvloop: bool, log_dir: Path, tag: str, group: ProcGroup
) -> dict[str, Any]:
    proc = group.add(
        Proc(
            system.env, system.script, _cfg(sc, use_uvloop, role="memory"), f"{tag}-memory", log_dir
        )
    )
    result = proc.expect("result", _result_timeout(sc))
    usage = _usage(result)
    body = _pick(result)
    body["rss_mb"] = {"process": usage.get("maxrss_mb")}
    body["cpu_us_per_call"] = _per_call(result.get("load_cpu_s"), result.get("completed"))
    return body


def _per_call(cpu_s: float | None, calls: int | None) -> float | None:
    if not cpu_s or not calls:
        return None
    return round(cpu_s / calls * 1e6, 2)


def _run_client_server(
    system: System, sc: Scenario, use_uvloop: bool, log_dir: Path, tag: str, group: ProcGroup
) -> dict[str, Any]:
    ports = [free_port() for _ in range(sc.executors)]
    servers: list[Proc] = []
    for i, port in enumerate(ports):
        servers.append(
            group.add(
                Proc(
                    system.env,
                    system.script,
                    _cfg(sc, use_uvloop, role="server", port=port),
                    f"{tag}-executor{i}",
                    log_dir,
                )
            )
        )
    ready = [srv.expect("ready", 60) for srv in servers]
    client = group.add(
        Proc(
            system.env,
            system.script,
            _cfg(sc, use_uvloop, role="client", peers=ports),
            f"{tag}-caller",
            log_dir,
        )
    )
    result = client.expect("result", _result_timeout(sc) + 20)
    rss: dict[str, Any] = {"caller": _usage(result).get("maxrss_mb")}
    server_cpu = 0.0
    per_executor: list[float] = []
    for i, srv in enumerate(servers):
        hwm = srv.vmhwm_mb()
        srv.send("stop")
        stats = srv.expect("stats", 30)
        usage = _usage(stats)
        rss[f"executor{i}" if sc.executors > 1 else "executor"] = usage.get("maxrss_mb") or hwm
        used = float(usage.get("cpu_s", 0.0)) - float(_usage(ready[i]).get("cpu_s", 0.0))
        per_executor.append(round(used, 3))
        server_cpu += used
    body = _pick(result)
    body["rss_mb"] = rss
    body["executor_cpu_s"] = per_executor  # shows how the work was spread (fanout)
    done = int(result.get("completed") or 0)
    total = done + (sc.warmup if sc.kind != "flood" else 0)
    server_share = server_cpu * (done / total) if total else 0.0
    body["cpu_us_per_call"] = _per_call(float(result.get("load_cpu_s") or 0.0) + server_share, done)
    body["cpu_us_per_call_by_role"] = {
        "caller": _per_call(result.get("load_cpu_s"), done),
        "executors": _per_call(server_share, done),
    }
    if "serializer" in ready[0]:
        body["serializer_seen"] = ready[0]["serializer"]
    return body


def _run_mesh(
    system: System, sc: Scenario, use_uvloop: bool, log_dir: Path, tag: str, group: ProcGroup
) -> dict[str, Any]:
    ports = [free_port() for _ in range(sc.executors)]
    nodes: list[Proc] = []
    for i, port in enumerate(ports):
        peers = [p for p in ports if p != port]
        nodes.append(
            group.add(
                Proc(
                    system.env,
                    system.script,
                    _cfg(
                        sc,
                        use_uvloop,
                        role="mesh",
                        port=port,
                        peers=peers,
                        index=i,
                        nodes=sc.executors,
                        remote_only=sc.remote_only,
                    ),
                    f"{tag}-node{i}",
                    log_dir,
                )
            )
        )
    ready = [n.expect("ready", 60) for n in nodes]
    for n in nodes:
        n.send("go")
    for n in nodes:
        n.expect("connected", 60)
    for n in nodes:
        n.send("start")
    results = [n.expect("result", _result_timeout(sc) + 20) for n in nodes]
    for n in nodes:
        n.send("stop")
    stats = [n.expect("stats", 30) for n in nodes]
    completed = sum(int(r.get("completed") or 0) for r in results)
    issued = sum(int(r.get("issued") or 0) for r in results)
    errors = sum(int(r.get("errors") or 0) for r in results)
    start = min(float(r["wall_start"]) for r in results)
    end = max(float(r["wall_end"]) for r in results)
    span = max(end - start, 1e-9)
    cpu = sum(
        float(_usage(s).get("cpu_s", 0.0)) - float(_usage(r0).get("cpu_s", 0.0))
        for s, r0 in zip(stats, ready, strict=True)
    )
    # Local vs remote execution: a mesh member may run its own calls itself,
    # which measures the executor, not the network. Each node reports the
    # calls it executed for the others over its whole load (warm-up included);
    # a system that cannot tell (no mesh broker: server + client brokers,
    # the ceiling) sends every call to another process.
    remote_counts = [s.get("served_remote") for s in stats]
    executed = issued + sc.warmup * len(nodes)
    if all(isinstance(n, int) for n in remote_counts) and executed:
        remote_share = min(sum(remote_counts) / executed, 1.0)
    else:
        remote_share = 1.0
    calls_per_s = completed / span
    body: dict[str, Any] = {
        "issued": issued,
        "completed": completed,
        "errors": errors,
        "first_error": next((r["first_error"] for r in results if r.get("first_error")), None),
        "elapsed_s": span,
        "calls_per_s": calls_per_s,
        "remote_share": remote_share,
        "remote_calls_per_s": calls_per_s * remote_share,
        "local_calls_per_s": calls_per_s * (1.0 - remote_share),
        "per_node_calls_per_s": [r.get("calls_per_s") for r in results],
        # latency over the mesh: median of the nodes' p50, worst of their p99
        "p50_us": statistics.median(float(r["p50_us"]) for r in results),
        "p99_us": max(float(r["p99_us"]) for r in results),
        "loop": results[0].get("loop"),
        "mesh_arrangement": ready[0].get("mesh"),
        "rss_mb": {f"node{i}": _usage(s).get("maxrss_mb") for i, s in enumerate(stats)},
        "cpu_us_per_call": _per_call(
            cpu * completed / max(completed + 4 * sc.warmup, 1), completed
        ),
    }
    for key in ("patio_version", "patio_file"):
        if key in results[0]:
            body[key] = results[0][key]
    return body


def run_all(
    systems: list[System],
    scenarios: list[Scenario],
    runs: int,
    use_uvloop: bool,
    log_dir: Path,
    sink: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """ABCABC: for each scenario, every run visits the systems in turn."""
    records: list[dict[str, Any]] = []
    for sc in scenarios:
        for run in range(runs):
            for system in systems:
                rec = measure(system, sc, use_uvloop, log_dir, run)
                records.append(rec)
                sink(rec)
    return records
