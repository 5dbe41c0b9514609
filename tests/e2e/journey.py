"""The user's journey, shared by tests/e2e (the test node agent) and
tests/realnode (containers of the built image): the world the steps build on,
the steps both take, and their helpers (the load process, the file syncer,
Prometheus, worker metrics and process checks)."""

from __future__ import annotations

import base64
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.controlplane import ControlPlane, free_port
from tests.kube.nodeagent import NodeAgent
from tests.kube.rest import ApiError, RestClient

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("/usr/bin/prometheus")
CLUSTER_LABEL = "patio.dev/cluster"
CHART = REPO_ROOT / "charts" / "patio"
RELEASE = "patio"
OPERATOR = "patio-operator"  # the chart's full name for release "patio"
OPERATOR_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
CLUSTER = "journey"
MESH_PORT = 15383
LAST_STEP = "test_8"  # the journeys' last step: uninstall and check nothing is left


@dataclass
class Journey:
    """What the steps share: failures so far, timings, load outcome counts."""

    tag: str = "e2e"
    failed: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    loads: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def report(self) -> str:
        lines = ["", f"=== patio journey ({self.tag}) ==="]
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

    def in_order(self, request: pytest.FixtureRequest) -> Iterator[None]:
        """For an autouse fixture: a step after a failed one is not attempted
        (it builds on it), except the last one, which cleans up."""
        if self.failed and not request.node.name.startswith(LAST_STEP):
            pytest.fail(f"an earlier step failed ({self.failed[0]}); not attempted")
        failed_before = request.session.testsfailed
        yield
        if request.session.testsfailed > failed_before:
            self.failed.append(request.node.name)

    def record(self, step: str, started: float) -> None:
        self.timings[step] = time.monotonic() - started
        print(f"\n[{self.tag}] {step}: {self.timings[step]:.1f} s")

    def record_load(self, w: World, phase: str) -> dict[str, dict[str, int]]:
        counts = w.load.phase_counts(phase)
        self.loads[phase] = counts
        print(f"[{self.tag}] load phase {phase}: {json.dumps(counts, sort_keys=True)}")
        return counts

    def assert_no_failures(self, w: World, phase: str) -> None:
        counts = self.record_load(w, phase)
        failures = {
            kind: {k: v for k, v in outcomes.items() if k != "ok"}
            for kind, outcomes in counts.items()
        }
        assert all(not f for f in failures.values()), (
            f"calls failed in phase {phase}: {failures}; errors: {w.load.errors(phase)[:10]}"
        )
        assert sum(o.get("ok", 0) for o in counts.values()) > 0, f"no call at all in phase {phase}"
        assert w.load.stats().get("wrong_results") == 0

    def end_phase(self, w: World, phase: str) -> None:
        """Let the phase's last calls finish, then check that none failed."""
        w.load.set_phase("between")
        time.sleep(0.5)
        self.assert_no_failures(w, phase)


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


class World:
    """Everything the steps build on, torn down at the end of the module."""

    def __init__(
        self,
        plane: ControlPlane,
        node: NodeAgent | None,
        namespace: str,
        workdir: Path,
        journey: Journey,
    ) -> None:
        self.plane = plane
        self.node = node
        self.ns = namespace
        self.workdir = workdir
        self.journey = journey
        self.rest = rest_client(plane)
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.load = LoadProcess(workdir / "load")
        self.sd_dir = workdir / "sd"
        self.sd_dir.mkdir(parents=True, exist_ok=True)
        self.syncer: Syncer | None = None
        self.prometheus: Prometheus | None = None

    # -- API views ------------------------------------------------------------

    def cluster(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.rest.get(
            f"/apis/patio.dev/v1alpha1/namespaces/{self.ns}/patioclusters/{CLUSTER}"
        )
        return obj

    def status(self) -> dict[str, Any]:
        return dict(self.cluster().get("status") or {})

    def condition(self, ctype: str) -> str:
        for c in self.status().get("conditions") or []:
            if c["type"] == ctype:
                return str(c["status"])
        return ""

    def pods(self, selector: str = f"{CLUSTER_LABEL}={CLUSTER}") -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.rest.get(
            f"/api/v1/namespaces/{self.ns}/pods", labelSelector=selector
        ).get("items", [])
        return items

    def secret(self) -> dict[str, str]:
        obj = self.rest.get(f"/api/v1/namespaces/{self.ns}/secrets/{CLUSTER}-auth")
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}

    def peers_file(self) -> list[str]:
        cm = self.rest.get(f"/api/v1/namespaces/{self.ns}/configmaps/{CLUSTER}-peers")
        text = (cm.get("data") or {}).get("peers", "")
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    def operator_pods(self) -> list[dict[str, Any]]:
        return [
            p for p in self.pods(OPERATOR_SELECTOR) if not p["metadata"].get("deletionTimestamp")
        ]

    def leader(self) -> str:
        """The pod whose operator holds the leader Lease ("" while nobody does)."""
        lease = self.rest.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{self.ns}/leases/{OPERATOR}"
        )
        holder = str((lease.get("spec") or {}).get("holderIdentity") or "")
        # The identity is "<pod name>_<random per process>" (operator cli.py).
        return holder.rsplit("_", 1)[0] if holder else ""

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, "-n", self.ns, **kwargs)

    # -- waiting for a settled mesh ---------------------------------------------

    def settled(self, replicas: int) -> str | bool:
        """True when the cluster is Ready with ``replicas`` workers, each
        connected to all the others; else a description of what is missing."""
        st = self.status()
        if st.get("observedGeneration") != self.cluster()["metadata"]["generation"]:
            return "status not observed yet"
        if (st.get("readyReplicas"), st.get("replicas"), st.get("peers")) != (
            replicas,
            replicas,
            replicas,
        ):
            counts = [st.get(k) for k in ("readyReplicas", "replicas", "peers")]
            return f"status readyReplicas/replicas/peers {counts}"
        if self.condition("Ready") != "True" or self.condition("MeshReady") != "True":
            return f"conditions {[(c['type'], c['status']) for c in st.get('conditions', [])]}"
        pods = self.pods()
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if len(pods) != replicas or not all(is_ready(p) for p in live):
            return f"{len(pods)} pods, ready {[is_ready(p) for p in live]}"
        ips = sorted(p["status"]["podIP"] for p in live)
        if sorted(self.peers_file()) != sorted(f"{ip}:{MESH_PORT}" for ip in ips):
            return f"peers file {self.peers_file()} vs pods {ips}"
        # Every peer a worker knows is connected, and it knows at least the
        # other workers (callers such as the load count as peers too).
        mesh = {ip: mesh_peers(ip) for ip in ips}
        if any(m is None or m[0] != m[1] or m[1] < replicas - 1 for m in mesh.values()):
            return f"(known, connected) peers per worker {mesh}"
        return True

    def wait_settled(self, replicas: int, timeout: float = 90, step: str = "") -> float:
        """Wait for :meth:`settled`; with ``step``, record when the status
        first showed the new replica, peer and ready counts."""
        start = time.monotonic()
        last: list[str | bool] = []
        firsts: dict[str, float] = {}

        def check() -> bool:
            st = self.status()
            for counted in ("replicas", "peers", "readyReplicas"):
                if counted not in firsts and st.get(counted) == replicas:
                    firsts[counted] = time.monotonic() - start
            last.append(self.settled(replicas))
            del last[:-1]
            return last[-1] is True

        try:
            wait_until(check, timeout, f"{replicas} settled workers")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last: {last[-1] if last else None}") from None
        if step:
            self.journey.notes[f"{step}: status reached"] = ", ".join(
                f"{k}={replicas} after {v:.1f} s" for k, v in firsts.items()
            )
            # The status follows the pods within seconds, not a resync period.
            slow = {k: v for k, v in firsts.items() if v > 20}
            assert not slow, f"status followed slowly: {firsts}"
        return time.monotonic() - start

    def close(self) -> None:
        self.load.stop()
        if self.syncer is not None:
            self.syncer.stop()
        if self.prometheus is not None:
            self.prometheus.stop()
        self.rest.close()


# -- steps both journeys take (tests/e2e with the node agent, tests/realnode
# with containers), each under the load, no call of it may fail -----------


def scale_under_load(w: World, steps: Sequence[tuple[int, str, str]], timeout: float = 90) -> None:
    """Start the load, then scale to each ``(replicas, record label, note step)``
    in turn, waiting for a settled mesh each time."""
    w.load.set_phase("scale")
    w.load.start()
    w.load.wait_calls("scale", 200)
    for replicas, label, step in steps:
        started = time.monotonic()
        w.kubectl("scale", f"patiocluster/{CLUSTER}", f"--replicas={replicas}")
        w.wait_settled(replicas, timeout=timeout, step=step)
        w.journey.record(label, started)
        w.load.wait_calls("scale", w.load.ok_count("scale") + 200)
    w.journey.end_phase(w, "scale")


@dataclass
class Rotation:
    """What a key rotation step leaves for the checks its journey adds."""

    old: str
    secret: dict[str, str]
    peer: str
    refused: subprocess.CompletedProcess[str]


def rotate_key_under_load(
    w: World, token: str, label: str, timeout: float, refused_within: float
) -> Rotation:
    """Rotate the key through ``spec.auth.rotation``; the load follows the new
    key, and a worker refuses the old one (within ``refused_within`` seconds:
    the workers re-read their mounted key within the node's volume sync).
    The caller ends the "rotate" phase after its own checks."""
    w.load.set_phase("rotate")
    old = w.secret()["key"]
    generation = w.status()["keyGeneration"]
    started = time.monotonic()
    rotation = json.dumps({"spec": {"auth": {"rotation": token}}})
    w.kubectl("patch", "patiocluster", CLUSTER, "--type=merge", "-p", rotation)
    phases: list[str] = []

    def rotated() -> bool:
        st = w.status()
        phase = (st.get("rotation") or {}).get("phase", "")
        if not phases or phases[-1] != phase:
            phases.append(phase)
        return (
            phase == "Idle"
            and (st.get("rotation") or {}).get("token") == token
            and st.get("keyGeneration") == generation + 1
        )

    wait_until(rotated, timeout, "the key rotation to complete")
    w.journey.record(label, started)
    w.journey.notes["rotation phases seen"] = " -> ".join(phases)
    secret = w.secret()
    assert secret["key"] != old
    # The load follows the Secret as the workers do (through the syncer).
    wait_until(lambda: (w.load.dir / "key").read_text() == secret["key"], 10, "the load's new key")
    w.load.wait_calls("rotate", w.load.ok_count("rotate") + 200)
    old_file = w.workdir / "old-key"
    old_file.write_text(old)
    peer = f"{w.pods()[0]['status']['podIP']}:{MESH_PORT}"
    refused = wait_until(
        lambda: (r := patio_call(peer, old_file, "mul", "2", "3", call_timeout=3)).returncode and r,
        refused_within,
        "the old key to be refused",
    )
    print(f"[{w.journey.tag}] old key: {refused.stderr.strip()}")
    assert "authenticat" in refused.stderr.lower(), refused.stderr
    return Rotation(old, secret, peer, refused)


@dataclass
class Kill:
    """What a SIGKILL step leaves for the checks its journey adds."""

    victim: str
    pid: int
    retried: int
    errors: list[dict[str, Any]]
    plain_failures: dict[str, int]


def kill_a_worker_under_load(
    w: World,
    label: str,
    worker_pid: Callable[[str], int],
    restarted_within: float,
    settled_within: float = 90,
) -> Kill:
    """SIGKILL the worker process of the first pod (``worker_pid`` finds it by
    pod name) while it holds calls; its container restarts and the mesh is
    full again. Retryable calls all succeed; plain ones fail only with
    PeerConnectionError."""
    w.load.set_phase("kill")
    w.load.wait_calls("kill", 100)
    # Long `sleep` calls, so that the killed worker surely holds some.
    write_if_changed(w.load.dir / "sleep", "1.5\n")
    time.sleep(2.5)
    retried_before = w.load.stats()["retried"]
    victim = sorted(p["metadata"]["name"] for p in w.pods())[0]
    pod = next(p for p in w.pods() if p["metadata"]["name"] == victim)
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    pid = worker_pid(victim)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 10, f"pid {pid} to die")

    def restarted() -> bool:
        p = next((p for p in w.pods() if p["metadata"]["name"] == victim), None)
        return bool(
            p
            and p["status"]["containerStatuses"][0]["restartCount"] == restarts + 1
            and is_ready(p)
        )

    wait_until(restarted, restarted_within, f"{victim}'s worker restarted and Ready")
    write_if_changed(w.load.dir / "sleep", "0.05\n")
    w.wait_settled(2, timeout=settled_within)
    w.journey.record(label, started)
    w.load.wait_calls("kill", w.load.ok_count("kill") + 200)
    w.load.set_phase("between")
    time.sleep(0.5)
    counts = w.journey.record_load(w, "kill")
    retry_failures = {k: v for k, v in counts.get("retryable", {}).items() if k != "ok"}
    plain_failures = {k: v for k, v in counts.get("plain", {}).items() if k != "ok"}
    errors = w.load.errors("kill")
    assert not retry_failures, f"retryable calls failed: {retry_failures}; {errors[:10]}"
    assert set(plain_failures) <= {"PeerConnectionError"}, f"{plain_failures}; {errors[:10]}"
    assert w.load.stats().get("wrong_results") == 0
    retried = w.load.stats()["retried"] - retried_before
    return Kill(victim, pid, retried, errors, plain_failures)


def hosts_up(prom: Prometheus) -> dict[str, set[str]]:
    """The addresses Prometheus scrapes successfully, by job."""
    up: dict[str, set[str]] = {}
    for t in prom.targets():
        if t["health"] == "up":
            up.setdefault(t["labels"]["job"], set()).add(
                t["scrapeUrl"].split("//")[1].split(":")[0]
            )
    return up
