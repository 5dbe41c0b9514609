"""Helpers of the end-to-end journey: the load process, the file syncer,
Prometheus, worker metrics and process checks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.controlplane import ControlPlane, free_port
from tests.kube.rest import ApiError, RestClient

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("/usr/bin/prometheus")
CLUSTER_LABEL = "patio.dev/cluster"


@dataclass
class Journey:
    """What the steps share: failures so far, timings, load outcome counts."""

    failed: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    loads: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def report(self) -> str:
        lines = ["", "=== patio end-to-end journey ==="]
        for step, seconds in self.timings.items():
            lines.append(f"  {step:<44} {seconds:7.1f} s")
        for phase, kinds in self.loads.items():
            parts = []
            for kind in ("plain", "retryable"):
                outcomes = kinds.get(kind, {})
                text = ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) or "none"
                parts.append(f"{kind}: {text}")
            lines.append(f"  load {phase:<14} {'; '.join(parts)}")
        for key, value in self.notes.items():
            lines.append(f"  {key}: {value}")
        return "\n".join(lines)


def rest_client(plane: ControlPlane) -> RestClient:
    return RestClient(plane.server, str(plane.pki.ca.cert), plane.pki.admin)


def wait_until(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def write_if_changed(path: Path, text: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions", []) or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


class Syncer(threading.Thread):
    """Keeps the load's peers and key files and Prometheus' targets current.

    Every 0.2 s: the cluster's pods that have an address and are not being
    deleted become the load's ``peers`` file and the workers' scrape
    targets; the auth Secret's ``key``/``next-key`` become the load's key
    files; the operator's pod becomes the operator's scrape target.
    """

    def __init__(
        self,
        plane: ControlPlane,
        namespace: str,
        cluster: str,
        load_dir: Path,
        sd_dir: Path,
        operator_selector: str,
        operator_metrics_port: int,
    ) -> None:
        super().__init__(name="e2e-syncer", daemon=True)
        self.rest = rest_client(plane)
        self.ns = namespace
        self.cluster = cluster
        self.load_dir = load_dir
        self.sd_dir = sd_dir
        self.operator_selector = operator_selector
        self.operator_metrics_port = operator_metrics_port
        self.port = 15383
        self.metrics_port = 9383
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.workers: list[tuple[str, str]] = []  # (pod, ip)

    def once(self) -> None:
        base = f"/api/v1/namespaces/{self.ns}"
        items = self.rest.get(f"{base}/pods", labelSelector=f"{CLUSTER_LABEL}={self.cluster}")
        live = sorted(
            (p["metadata"]["name"], p["status"]["podIP"])
            for p in items.get("items", [])
            if (p.get("status") or {}).get("podIP") and not p["metadata"].get("deletionTimestamp")
        )
        self.workers = live
        write_if_changed(self.load_dir / "peers", "".join(f"{ip}:{self.port}\n" for _, ip in live))
        workers_sd = [
            # the labels the chart's monitors give worker targets
            {
                "targets": [f"{ip}:{self.metrics_port}"],
                "labels": {"pod": name, "namespace": self.ns, "patio_cluster": self.cluster},
            }
            for name, ip in live
        ]
        write_if_changed(self.sd_dir / "workers.json", json.dumps(workers_sd))
        ops = self.rest.get(f"{base}/pods", labelSelector=self.operator_selector)
        ops_sd = [
            {
                "targets": [f"{p['status']['podIP']}:{self.operator_metrics_port}"],
                "labels": {"pod": p["metadata"]["name"], "namespace": self.ns},
            }
            for p in ops.get("items", [])
            if (p.get("status") or {}).get("podIP") and not p["metadata"].get("deletionTimestamp")
        ]
        write_if_changed(self.sd_dir / "operator.json", json.dumps(ops_sd))
        secret = self.rest.get_or_none(f"{base}/secrets/{self.cluster}-auth")
        if secret is not None:
            import base64

            data = secret.get("data") or {}
            key = base64.b64decode(data.get("key", "")).decode()
            nxt = base64.b64decode(data.get("next-key", "")).decode()
            if key:
                # next-key first: the load re-reads both when `key` changes.
                write_if_changed(self.load_dir / "next-key", nxt)
                write_if_changed(self.load_dir / "key", key)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.once()
            except (ApiError, OSError, ValueError, KeyError) as exc:
                self.errors.append(repr(exc))
                del self.errors[:-20]
            self.stop_event.wait(0.2)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        self.rest.close()


class LoadProcess:
    """The ``tests.e2e.loadgen`` process and its stats file."""

    def __init__(self, directory: Path, concurrency: int = 6) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "loadgen.log"

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.e2e.loadgen",
                    str(self.dir),
                    "--concurrency",
                    str(self.concurrency),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def set_phase(self, phase: str) -> None:
        write_if_changed(self.dir / "phase", phase + "\n")

    def stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.dir / "stats.json").read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the load process exited with {self.proc.returncode}:\n"
                f"{self.log.read_text()[-3000:]}"
            )

    def phase_counts(self, phase: str) -> dict[str, dict[str, int]]:
        return dict(self.stats().get("phases", {}).get(phase, {}))

    def ok_count(self, phase: str) -> int:
        kinds = self.phase_counts(phase)
        return sum(kinds.get(k, {}).get("ok", 0) for k in ("plain", "retryable"))

    def wait_calls(self, phase: str, at_least: int, timeout: float = 60) -> None:
        def enough() -> bool:
            self.check_alive()
            return self.ok_count(phase) >= at_least

        wait_until(enough, timeout, f"{at_least} successful calls in load phase {phase}")

    def pause(self, timeout: float = 30) -> dict[str, Any]:
        """Stop new calls and wait until none is in flight; return the stats."""
        self.set_phase("pause")

        def quiet() -> dict[str, Any] | None:
            self.check_alive()
            stats = self.stats()
            if stats.get("phase") == "pause" and stats.get("in_flight") == 0:
                time.sleep(0.3)  # one more stats write after the last call
                return self.stats()
            return None

        result: dict[str, Any] = wait_until(quiet, timeout, "the load to pause")
        return result

    def errors(self, phase: str) -> list[dict[str, Any]]:
        return [e for e in self.stats().get("errors", []) if e.get("phase") == phase]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class Prometheus:
    """A real Prometheus scraping the targets the syncer writes."""

    def __init__(
        self, workdir: Path, sd_dir: Path, interval: str = "1s", rule_files: tuple[Path, ...] = ()
    ) -> None:
        self.workdir = workdir
        self.sd_dir = sd_dir
        self.interval = interval
        self.rule_files = rule_files
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        if not (PROMETHEUS.is_file() and os.access(PROMETHEUS, os.X_OK)):
            pytest.fail(
                f"Prometheus is not installed at {PROMETHEUS}: install Debian's package "
                "(`apt-get install -y prometheus`) to run the end-to-end journey",
                pytrace=False,
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": self.interval,
                "scrape_timeout": "900ms",
                "evaluation_interval": self.interval,
            },
            "scrape_configs": [
                {
                    "job_name": job,
                    "file_sd_configs": [
                        {"files": [str(self.sd_dir / f"{name}.json")], "refresh_interval": "1s"}
                    ],
                }
                for job, name in (("patio-workers", "workers"), ("patio-operator", "operator"))
            ],
            "rule_files": [str(path) for path in self.rule_files],
        }
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {self.proc.returncode}:\n"
                    f"{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_until(ready, timeout, "Prometheus to be ready")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
                body = json.loads(resp.read())
        except OSError as exc:
            code = self.proc.poll() if self.proc is not None else None
            if code is None:
                raise
            # e.g. -15: something sent it SIGTERM (`pkill -x prometheus`...)
            raise AssertionError(
                f"Prometheus (pid {self.proc.pid if self.proc else '?'}) exited with {code} "
                f"while the test used it ({exc}); its log:\n{self.log.read_text()[-2000:]}"
            ) from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("/api/v1/query", query=promql)["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        if not result:
            return None
        return float(result[0]["value"][1])

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rules, each with its health and last evaluation."""
        groups = self.api("/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("/api/v1/targets", state="active")["activeTargets"]
        return active

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def scrape(ip: str, port: int = 9383) -> dict[str, float]:
    """A worker's /metrics as {sample line name with labels: value}."""
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=3) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def mesh_peers(ip: str) -> tuple[int, int] | None:
    """A worker's (known, connected) peers from its /metrics; None if unreachable."""
    try:
        samples = scrape(ip)
    except OSError:
        return None
    known = int(samples.get("patio_peers_known", -1))
    return known, int(samples.get("patio_peers_connected", -1))


def processes_with_env(needle: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment has ``needle``."""
    found = []
    wanted = needle.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            continue
        if wanted in environ.split(b"\0"):
            found.append((int(entry), cmd.strip()))
    return found


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def patio_call(
    peer: str, key_file: Path, *args: str, call_timeout: float = 10
) -> subprocess.CompletedProcess[str]:
    """``patio call`` from the project's virtualenv, as a user would run it."""
    exe = Path(sys.executable).parent / "patio"
    argv = [str(exe), "call", "--peer", peer, "--key-file", str(key_file)]
    return subprocess.run(
        [*argv, "--timeout", str(call_timeout), *args],
        capture_output=True,
        text=True,
        timeout=call_timeout + 20,
        check=False,
        cwd=REPO_ROOT,
    )
