"""A node agent for tests: a Node that stays Ready and really runs its pods.

For each pod bound to its node, the agent runs every container's ``command``
and ``args`` as a local process (the image is ignored) with the project's
virtualenv first on ``PATH``, the environment resolved like the kubelet does,
a unique address ``127.0.0.N`` (N from 2 upward, reused after deletion) as
``podIP``, and Secret/ConfigMap/downwardAPI/projected/emptyDir volumes
mounted at the container's ``mountPath`` in a private mount namespace per
container (``unshare -m``), kept in sync with the API objects with an atomic
``..data`` symlink swap. Probes, restarts with back-off, graceful deletion and
the pod status are handled as the kubelet does, in a simplified way.

It runs as a thread in the test process, see :class:`NodeAgent`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import http.client
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import procs
from .kubeletapi import KubeletServer
from .pki import CertPair
from .podspec import ConfigError, Obj, expand, resolve_env, volume_files
from .rest import ApiError, RestClient
from .volumes import VolumeError, write_atomic

log = logging.getLogger("patio.tests.nodeagent")

HOST_IP = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)
_MOUNT_SCRIPT = r"""
while [ "$1" != "--" ]; do
  mount --bind "$1" "$2" || { echo "patio-node: cannot mount $1 at $2" >&2; exit 125; }
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$2" || exit 125; fi
  shift 3
done
shift
exec "$@"
"""


AGENT_ENV = "PATIO_TEST_NODE_AGENT"
_NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
# Lines the agent itself writes into a container's log file start with this.
MARK = "[patio-node]"


def sweep_orphans() -> list[int]:
    """SIGKILL pod processes left by a node agent whose test process died hard.

    Every pod process (and whatever it forks, unless it clears its
    environment) carries ``PATIO_TEST_NODE_AGENT=<pid of the test process>``;
    the control plane and direct children die with the test process through
    ``PR_SET_PDEATHSIG``, grandchildren are found here by that marker.
    """
    killed = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(AGENT_ENV.encode() + b"="):
                owner = int(var.split(b"=", 1)[1] or 0)
                if owner != me and not Path(f"/proc/{owner}").exists():
                    with contextlib.suppress(OSError):
                        os.kill(int(entry.name), signal.SIGKILL)
                        killed.append(int(entry.name))
                break
    return killed


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class IpPool:
    """Addresses 127.0.0.N, N = 2..254, lowest free first.

    Each address in use is held with an exclusive ``flock`` on a file in a
    folder shared by all test sessions of this machine, so that two sessions
    running at once never hand out the same address.
    """

    def __init__(self, lock_dir: Path | None = None) -> None:
        self.lock_dir = lock_dir or Path(tempfile.gettempdir()) / "patio-pod-ips"
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, IO[bytes]] = {}
        self._lock = threading.Lock()

    def allocate(self) -> str:
        with self._lock:
            for n in range(2, 255):
                ip = f"127.0.0.{n}"
                if ip in self._held:
                    continue
                f = (self.lock_dir / ip).open("ab")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.close()
                    continue
                self._held[ip] = f
                return ip
        raise RuntimeError("no free pod address left in 127.0.0.2-127.0.0.254")

    def release(self, ip: str) -> None:
        with self._lock:
            f = self._held.pop(ip, None)
        if f is not None:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    def in_use(self) -> list[str]:
        with self._lock:
            return sorted(self._held)


@dataclass
class Probe:
    """The state of one probe of one container."""

    spec: Obj
    next_at: float
    successes: int = 0
    failures: int = 0

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds", 1))

    @property
    def success_threshold(self) -> int:
        return int(self.spec.get("successThreshold", 1))

    @property
    def failure_threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))


@dataclass
class Container:
    spec: Obj
    log_path: Path
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    restart_count: int = 0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    ready: bool = False
    started: bool = False  # startupProbe passed (or none)
    next_start: float = 0.0
    crashes: int = 0
    done: bool = False  # exited and will not be restarted
    kill_at: float | None = None  # SIGKILL deadline after a SIGTERM
    liveness_kill: bool = False
    readiness: Probe | None = None
    liveness: Probe | None = None
    startup: Probe | None = None
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> Obj:
        out: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.running and self.started,
            "state": self.state,
        }
        if self.started_at is not None:
            out["containerID"] = f"patio://{self.name}-{self.restart_count}"
        if self.last_state:
            out["lastState"] = self.last_state
        return out


@dataclass
class PodRun:
    """What the agent knows about one pod it runs."""

    uid: str
    namespace: str
    name: str
    ip: str
    directory: Path
    pod: Obj
    init_containers: list[Container]
    containers: list[Container]
    start_time: str = field(default_factory=now_iso)
    terminating: bool = False
    last_status: Obj | None = None
    conditions: dict[str, Obj] = field(default_factory=dict)
    volume_errors: str | None = None
    created_mountpoints: list[Path] = field(default_factory=list)
    tokens: dict[str, tuple[bytes, float]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy", "Always"))

    def all_containers(self) -> list[Container]:
        return [*self.init_containers, *self.containers]

    @property
    def initialized(self) -> bool:
        return all(c.done and c.exit_code == 0 for c in self.init_containers)


class NodeAgent:
    """Registers a Node and runs the pods bound to it, in a thread.

    ``agent = NodeAgent(server, ca, client_cert, workdir, log_dir); agent.start()``
    ... ``agent.stop()``. The fixture ``kube_node`` does this for a session.
    """

    def __init__(
        self,
        server: str,
        ca: Path,
        client_cert: Any,
        workdir: Path,
        log_dir: Path,
        *,
        node_name: str = "patio-node",
        api_port: int | None = None,
        sync_period: float = 0.5,
        volume_sync_period: float = 1.0,
        heartbeat_period: float = 10.0,
        backoff_base: float = 1.0,
        backoff_max: float = 10.0,
        ip_pool: IpPool | None = None,
        allocatable: dict[str, str] | None = None,
        serving_cert: CertPair | None = None,
    ) -> None:
        self.server = server
        self.rest = RestClient(server, str(ca), client_cert)
        self.workdir = workdir
        self.log_dir = log_dir
        self.pod_log_dir = log_dir / "pods"
        self.node_name = node_name
        self.api_port = api_port or int(server.rsplit(":", 1)[1])
        self.sync_period = sync_period
        self.volume_sync_period = volume_sync_period
        self.heartbeat_period = heartbeat_period
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.ips = ip_pool or IpPool()
        self.allocatable = allocatable or {
            "cpu": "64",
            "memory": "128Gi",
            "pods": "250",
            "ephemeral-storage": "100Gi",
        }
        self.pods: dict[str, PodRun] = {}
        # Serves /containerLogs so that `kubectl logs` works (needs a cert).
        self.kubelet_api = KubeletServer(serving_cert, self._resolve_log) if serving_cert else None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0
        self._last_volume_sync = 0.0
        self.errors: list[str] = []
        self._unshare = shutil.which("unshare") or "/usr/bin/unshare"
        self._nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"

    # --- public helpers ------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        swept = sweep_orphans()
        if swept:
            log.warning("killed %d pod processes left by a dead test process", len(swept))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pod_log_dir.mkdir(parents=True, exist_ok=True)
        if self.kubelet_api is not None:
            self.kubelet_api.start()
        self._register()
        self._thread = threading.Thread(target=self._run, name="patio-node-agent", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.rest.get(f"/api/v1/nodes/{self.node_name}")
            ready = [
                c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"
            ]
            taints = [
                t for t in node["spec"].get("taints") or [] if t.get("key") in _NOT_READY_TAINTS
            ]
            if ready and ready[0]["status"] == "True" and not taints:
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {self.node_name} did not become Ready without taints")

    def stop(self, grace: float = 5.0) -> None:
        """Stop the loop, then every pod process (SIGTERM, SIGKILL after ``grace``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            runs = list(self.pods.values())
            for run in runs:
                for c in run.all_containers():
                    if c.running and c.proc is not None:
                        procs.signal_group(c.proc, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for run in runs:
                for c in run.all_containers():
                    if c.proc is not None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                        procs.stop(c.proc, grace=0)
                self._cleanup(run)
            self.pods.clear()
        if self.kubelet_api is not None:
            self.kubelet_api.stop()
        self.rest.close()

    def log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        """The file with the stdout+stderr of ``container`` of ``namespace/pod``
        (all its restarts, appended). With no container, the pod's first."""
        if container is None:
            run = self.pod(namespace, pod)
            if run is None:
                matches = sorted(self.pod_log_dir.glob(f"{namespace}_{pod}_*.log"))
                if not matches:
                    raise FileNotFoundError(f"no log for pod {namespace}/{pod}")
                return matches[0]
            container = run.containers[0].name
        return self.pod_log_dir / f"{namespace}_{pod}_{container}.log"

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        """The log of a container so far ("" if it has written nothing yet)."""
        try:
            return self.log_path(namespace, pod, container).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _resolve_log(
        self, namespace: str, pod: str, container: str
    ) -> tuple[Path, Callable[[], bool]] | None:
        path = self.pod_log_dir / f"{namespace}_{pod}_{container}.log"
        run = self.pod(namespace, pod)
        if run is None or container not in {c.name for c in run.all_containers()}:
            return (path, lambda: False) if path.exists() else None

        def alive() -> bool:
            with self._lock:
                return run.uid in self.pods and not self._stop.is_set()

        return path, alive

    def pod(self, namespace: str, name: str) -> PodRun | None:
        with self._lock:
            for run in self.pods.values():
                if run.namespace == namespace and run.name == name:
                    return run
        return None

    def pids(self, namespace: str, name: str) -> dict[str, int]:
        """Host PIDs of the running containers of a pod (container name -> pid)."""
        run = self.pod(namespace, name)
        if run is None:
            return {}
        with self._lock:
            return {c.name: c.proc.pid for c in run.all_containers() if c.running and c.proc}

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")

    # --- node ----------------------------------------------------------------

    def _node_status(self) -> Obj:
        ts = now_iso()

        def cond(type_: str, status: str, reason: str, message: str) -> Obj:
            return {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": ts,
                "lastTransitionTime": self._started_iso,
            }

        return {
            "capacity": self.allocatable,
            "allocatable": self.allocatable,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                cond("Ready", "True", "KubeletReady", "patio test node agent is posting ready"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": HOST_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {
                "kubeletEndpoint": {"Port": self.kubelet_api.port if self.kubelet_api else 0}
            },
            "nodeInfo": {
                "machineID": "patio",
                "systemUUID": "patio",
                "bootID": "patio",
                "kernelVersion": platform.release(),
                "osImage": "patio test node",
                "containerRuntimeVersion": "patio-process://1",
                "kubeletVersion": "v1.36.3",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _register(self) -> None:
        self._started_iso = now_iso()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "patio.dev/test-node": "true",
                },
            },
            "spec": {},
        }
        try:
            self.rest.post("/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
        self._heartbeat(force=True)

    def _heartbeat(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_heartbeat < self.heartbeat_period:
            return
        self._last_heartbeat = time.monotonic()
        self.rest.merge_patch(
            f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()}
        )
        # The node controller may have tainted a node created before its status.
        node = self.rest.get(f"/api/v1/nodes/{self.node_name}")
        taints = node["spec"].get("taints") or []
        keep = [t for t in taints if t.get("key") not in _NOT_READY_TAINTS]
        if len(keep) != len(taints):
            self.rest.merge_patch(
                f"/api/v1/nodes/{self.node_name}", {"spec": {"taints": keep or None}}
            )
        lease_path = (
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        )
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node_name,
                "leaseDurationSeconds": 40,
                "renewTime": now_micro(),
            },
        }
        try:
            self.rest.merge_patch(lease_path, {"spec": lease["spec"]})
        except ApiError as exc:
            if exc.status != 404:
                raise
            self.rest.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)

    # --- main loop -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._heartbeat()
                self.sync()
            except Exception as exc:  # keep the node alive; the error is kept for tests
                log.exception("node agent sync failed")
                self.errors.append(repr(exc))
            del self.errors[:-50]
            self._wake.wait(self.sync_period)
            self._wake.clear()

    def sync(self) -> None:
        """One pass: start new pods, manage processes, write status."""
        listing = self.rest.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.node_name}")
        seen: set[str] = set()
        refresh_volumes = time.monotonic() - self._last_volume_sync >= self.volume_sync_period
        if refresh_volumes:
            self._last_volume_sync = time.monotonic()
        cache: dict[tuple[str, str, str], Obj | None] = {}
        for pod in listing.get("items", []):
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            with self._lock:
                run = self.pods.get(uid)
            if run is None:
                if pod["metadata"].get("deletionTimestamp"):
                    self._delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)
                    continue
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue
                run = self._admit(pod)
            run.pod["metadata"] = pod["metadata"]
            run.pod["spec"] = pod["spec"]
            run.pod["status"] = pod.get("status", {})
            try:
                self._sync_pod(run, pod, cache, refresh_volumes)
            except Exception as exc:  # one broken pod must not stop the others
                log.exception("sync of pod %s failed", run.key)
                self.errors.append(f"{run.key}: {exc!r}")
        with self._lock:
            gone = [run for uid, run in self.pods.items() if uid not in seen]
        for run in gone:  # deleted from the API without us (force delete)
            for c in run.all_containers():
                if c.proc is not None:
                    procs.stop(c.proc, grace=2)
            self._cleanup(run)

    def _lookup(self, cache: dict[tuple[str, str, str], Obj | None]) -> Callable[..., Obj | None]:
        def lookup(kind: str, namespace: str, name: str) -> Obj | None:
            key = (kind, namespace, name)
            if key not in cache:
                plural = "secrets" if kind == "Secret" else "configmaps"
                cache[key] = self.rest.get_or_none(
                    f"/api/v1/namespaces/{namespace}/{plural}/{name}"
                )
            return cache[key]

        return lookup

    def _admit(self, pod: Obj) -> PodRun:
        meta, spec = pod["metadata"], pod["spec"]
        ip = HOST_IP if spec.get("hostNetwork") else self.ips.allocate()
        directory = self.workdir / "pods" / meta["uid"]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cwd").mkdir(exist_ok=True)

        def mk(c: Obj, init: bool) -> Container:
            path = self.pod_log_dir / f"{meta['namespace']}_{meta['name']}_{c['name']}.log"
            return Container(spec=c, log_path=path, init=init)

        run = PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            ip=ip,
            directory=directory,
            pod={"metadata": meta, "spec": spec},
            init_containers=[mk(c, True) for c in spec.get("initContainers", []) or []],
            containers=[mk(c, False) for c in spec.get("containers", [])],
        )
        with self._lock:
            self.pods[run.uid] = run
        log.info("admitted pod %s with ip %s", run.key, ip)
        return run

    def _pod_view(self, run: PodRun) -> Obj:
        """The pod as the downward API sees it (with the status we give it)."""
        return {
            "metadata": run.pod["metadata"],
            "spec": run.pod["spec"],
            "status": {
                "podIP": run.ip,
                "podIPs": [{"ip": run.ip}],
                "hostIP": HOST_IP,
                "hostIPs": [{"ip": HOST_IP}],
            },
        }

    def _token(self, run: PodRun, src: Obj) -> bytes:
        audience = tuple((src.get("audience") and [src["audience"]]) or [])
        key = f"{src.get('path')}|{audience}|{src.get('expirationSeconds')}"
        cached = run.tokens.get(key)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        ttl = int(src.get("expirationSeconds", 3607))
        sa = run.pod["spec"].get("serviceAccountName", "default")
        body: Obj = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": ttl,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": run.name,
                    "uid": run.uid,
                },
            },
        }
        if audience:
            body["spec"]["audiences"] = list(audience)
        resp = self.rest.post(
            f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{sa}/token", body
        )
        token = str(resp["status"]["token"]).encode()
        run.tokens[key] = (token, time.monotonic() + 0.8 * ttl)
        return token

    def _sync_volumes(self, run: PodRun, lookup: Callable[..., Obj | None]) -> None:
        """Write every volume's files into the pod's folder (atomic swap on change)."""
        view = self._pod_view(run)
        errors = []
        for vol in run.pod["spec"].get("volumes", []) or []:
            target = run.directory / "volumes" / vol["name"]
            try:
                files = volume_files(view, vol, lookup, lambda src: self._token(run, src))
            except (ConfigError, ApiError, VolumeError, KeyError) as exc:
                errors.append(f"volume {vol['name']}: {exc}")
                continue
            if files is None:
                target.mkdir(parents=True, exist_ok=True)
            else:
                write_atomic(target, files)
        run.volume_errors = "; ".join(errors) or None

    def _mount_args(self, run: PodRun, c: Container) -> list[str]:
        """Triples ``src dst ro|rw`` for the mount script, outermost first."""
        volumes = {v["name"]: v for v in run.pod["spec"].get("volumes", []) or []}
        out: list[tuple[str, str, str]] = []
        for m in c.spec.get("volumeMounts", []) or []:
            vol = volumes.get(m["name"])
            if vol is None:
                raise ConfigError(f"volume {m['name']!r} not found in pod spec")
            if "hostPath" in vol:
                src = Path(vol["hostPath"]["path"])
            else:
                src = run.directory / "volumes" / m["name"]
            if m.get("subPath"):
                src = src / m["subPath"]
            if not src.exists():
                raise ConfigError(f"volume {m['name']!r} has no {src.name} yet")
            dst = Path(m["mountPath"])
            hidden = next((p for p in self._host_paths() if p.is_relative_to(dst)), None)
            if hidden is not None:
                # Pods share this machine's filesystem: a volume over, say,
                # /tmp would hide the virtualenv or checkout the pod runs from
                # (CI may clone under /tmp). The pod sees the host folder instead.
                with c.log_path.open("ab") as f:
                    f.write(
                        f"{MARK} {now_iso()} volume {m['name']!r} not mounted at {dst}: "
                        f"it would hide {hidden}\n".encode()
                    )
                continue
            self._ensure_mountpoint(run, dst, src.is_dir())
            read_only = bool(m.get("readOnly")) or any(
                k in vol for k in ("secret", "configMap", "downwardAPI", "projected")
            )
            out.append((str(src), str(dst), "ro" if read_only else "rw"))
        out.sort(key=lambda t: len(Path(t[1]).parts))
        return [x for triple in out for x in triple]

    def _host_paths(self) -> list[Path]:
        """Folders every pod process needs from the host: no volume may cover them."""
        return [
            Path(sys.prefix).resolve(),
            Path(sys.base_prefix).resolve(),
            REPO_ROOT,
            self.workdir.resolve(),
        ]

    def _ensure_mountpoint(self, run: PodRun, dst: Path, is_dir: bool) -> None:
        """Create a missing mount point on the host.

        It is left in place (empty) afterwards: removing a mount point
        detaches the mounts on it in every other mount namespace, which would
        break the pods of another test session using the same path.
        """
        if dst.exists():
            return
        if is_dir:
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.touch()

    def _process_env(
        self, run: PodRun, c: Container, lookup: Callable[..., Obj | None]
    ) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": "/root",
            "HOSTNAME": str(run.pod["spec"].get("hostname") or run.name),
            "KUBERNETES_SERVICE_HOST": HOST_IP,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            "PYTHONUNBUFFERED": "1",
            AGENT_ENV: str(os.getpid()),
            # The "image" of every pod is this checkout with the project's virtualenv.
            "PYTHONPATH": str(REPO_ROOT),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
        env.update(resolve_env(self._pod_view(run), c.spec, lookup, self.allocatable))
        return env

    def _start_container(
        self, run: PodRun, c: Container, lookup: Callable[..., Obj | None]
    ) -> None:
        try:
            if run.volume_errors:
                raise ConfigError(run.volume_errors)
            env = self._process_env(run, c, lookup)
            mounts = self._mount_args(run, c)
        except ConfigError as exc:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.next_start = time.monotonic() + 1.0
            return
        argv = [
            expand(str(a), env)
            for a in [*(c.spec.get("command") or []), *(c.spec.get("args") or [])]
        ]
        if not c.spec.get("command"):
            argv = []  # no image entrypoint to fall back on
        exe = shutil.which(argv[0], path=env["PATH"]) if argv else None
        cwd = c.spec.get("workingDir") or str(run.directory / "cwd")
        if exe is None or not Path(cwd).is_dir():
            if not argv:
                message = "no command given (the test node has no image entrypoint to run)"
            elif exe is None:
                message = f'exec: "{argv[0]}": executable file not found in $PATH'
            else:
                message = f"chdir {cwd}: no such file or directory"
            self._exited(
                run,
                c,
                exit_code=128,
                reason="StartError",
                message=f"failed to create containerd task: {message}",
                started_at=now_iso(),
            )
            return
        full = [exe, *argv[1:]]
        if mounts:
            full = [
                self._unshare, "-m", "--propagation", "private", "--",
                "/bin/sh", "-c", _MOUNT_SCRIPT, "patio-pod", *mounts, "--", *full,
            ]  # fmt: skip
        with c.log_path.open("ab") as f:
            f.write(
                f"{MARK} {now_iso()} start {c.name} (restart {c.restart_count}): {argv}\n".encode()
            )
        c.proc = procs.spawn(full, log=c.log_path, env=env, cwd=cwd)
        c.started_at = now_iso()
        c.started_mono = time.monotonic()
        c.state = {"running": {"startedAt": c.started_at}}
        c.kill_at = None
        c.liveness_kill = False
        c.exit_code = None
        mono = time.monotonic()
        c.ready = False
        c.startup = self._probe(c.spec.get("startupProbe"), mono)
        c.started = c.startup is None
        c.readiness = self._probe(c.spec.get("readinessProbe"), mono)
        c.liveness = self._probe(c.spec.get("livenessProbe"), mono)
        if c.readiness is None and not c.init:
            c.ready = c.started
        log.info("started %s/%s pid %s", run.key, c.name, c.proc.pid)

    @staticmethod
    def _probe(spec: Obj | None, mono: float) -> Probe | None:
        if not spec:
            return None
        return Probe(spec=spec, next_at=mono + float(spec.get("initialDelaySeconds", 0)))

    def _exited(
        self,
        run: PodRun,
        c: Container,
        *,
        exit_code: int,
        reason: str,
        message: str | None = None,
        started_at: str | None = None,
        signal_num: int | None = None,
    ) -> None:
        term: Obj = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": started_at or c.started_at or now_iso(),
            "finishedAt": now_iso(),
        }
        if message:
            term["message"] = message
        if signal_num:
            term["signal"] = signal_num
        c.proc = None
        c.ready = False
        c.exit_code = exit_code
        policy = run.restart_policy
        if c.init and policy == "Always":
            policy = "OnFailure"
        restart = not run.terminating and (
            policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        )
        if c.init and exit_code == 0:
            restart = False
        if not restart:
            c.done = True
            c.state = {"terminated": term}
            return
        ran = time.monotonic() - c.started_mono if c.started_mono else 0.0
        if ran > 2 * self.backoff_max:
            c.crashes = 0
        delay = min(self.backoff_base * (2**c.crashes), self.backoff_max)
        c.crashes += 1
        c.restart_count += 1
        c.last_state = {"terminated": term}
        c.next_start = time.monotonic() + delay
        c.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay:.0f}s restarting failed container={c.name} "
                f"pod={run.name}_{run.namespace}({run.uid})",
            }
        }

    def _check_exit(self, run: PodRun, c: Container) -> None:
        if c.proc is None:
            return
        code = c.proc.poll()
        if code is None:
            return
        procs.stop(c.proc, grace=0)  # reap, kill what is left of its group
        sig = -code if code < 0 else None
        exit_code = 128 + sig if sig else code
        reason = "Completed" if exit_code == 0 else "Error"
        with c.log_path.open("ab") as f:
            f.write(f"{MARK} {now_iso()} {c.name} exited with code {exit_code}\n".encode())
        self._exited(run, c, exit_code=exit_code, reason=reason, signal_num=sig)

    def _run_probe(self, run: PodRun, c: Container, probe: Probe) -> bool:
        spec = probe.spec
        ports = {p.get("name"): p.get("containerPort") for p in c.spec.get("ports", []) or []}

        def port_of(value: Any) -> int:
            if isinstance(value, str) and not value.isdigit():
                return int(ports[value])
            return int(value)

        try:
            if "sleep" in spec:  # lifecycle hooks only
                time.sleep(min(float(spec["sleep"]["seconds"]), probe.timeout))
                return True
            if "httpGet" in spec:
                g = spec["httpGet"]
                host = g.get("host") or run.ip
                conn_cls = (
                    http.client.HTTPSConnection
                    if g.get("scheme", "HTTP").upper() == "HTTPS"
                    else http.client.HTTPConnection
                )
                kwargs: dict[str, Any] = {"timeout": probe.timeout}
                if conn_cls is http.client.HTTPSConnection:
                    import ssl

                    kwargs["context"] = ssl._create_unverified_context()
                conn = conn_cls(host, port_of(g["port"]), **kwargs)
                try:
                    headers = {h["name"]: h["value"] for h in g.get("httpHeaders", []) or []}
                    conn.request("GET", g.get("path", "/"), headers=headers)
                    status = conn.getresponse().status
                finally:
                    conn.close()
                return 200 <= status < 400
            if "tcpSocket" in spec:
                t = spec["tcpSocket"]
                with socket.create_connection(
                    (t.get("host") or run.ip, port_of(t["port"])), timeout=probe.timeout
                ):
                    return True
            if "exec" in spec:
                cmd = list(spec["exec"].get("command", []))
                if c.proc is None:
                    return False
                argv = [self._nsenter, "-t", str(c.proc.pid), "-m", "--", *cmd]
                env = self._process_env(run, c, self._lookup({}))
                result = subprocess.run(
                    argv,
                    env=env,
                    cwd=c.spec.get("workingDir") or str(run.directory / "cwd"),
                    capture_output=True,
                    timeout=probe.timeout,
                    check=False,
                )
                return result.returncode == 0
        except (
            OSError,
            subprocess.TimeoutExpired,
            http.client.HTTPException,
            KeyError,
            ValueError,
        ):
            return False
        except ConfigError:
            return False
        return False  # grpc and unknown probes are not supported: they fail

    def _probe_step(self, run: PodRun, c: Container, probe: Probe | None) -> bool | None:
        """Run ``probe`` if due; return True/False when its verdict flips, else None."""
        if probe is None or time.monotonic() < probe.next_at:
            return None
        probe.next_at = time.monotonic() + probe.period
        if self._run_probe(run, c, probe):
            probe.failures = 0
            probe.successes += 1
            if probe.successes >= probe.success_threshold:
                return True
        else:
            probe.successes = 0
            probe.failures += 1
            if probe.failures >= probe.failure_threshold:
                return False
        return None

    def _probes(self, run: PodRun, c: Container) -> None:
        if not c.running or c.kill_at is not None or run.terminating:
            return
        if not c.started:
            verdict = self._probe_step(run, c, c.startup)
            if verdict is True:
                c.started = True
                if c.readiness is None:
                    c.ready = True
            elif verdict is False:
                self._kill_for_restart(run, c, "startup probe failed")
            return
        verdict = self._probe_step(run, c, c.liveness)
        if verdict is False:
            self._kill_for_restart(run, c, "liveness probe failed")
            return
        verdict = self._probe_step(run, c, c.readiness)
        if verdict is not None:
            c.ready = verdict

    def _kill_for_restart(self, run: PodRun, c: Container, why: str) -> None:
        assert c.proc is not None
        with c.log_path.open("ab") as f:
            f.write(f"{MARK} {now_iso()} {why}: stopping {c.name}\n".encode())
        c.liveness_kill = True
        c.ready = False
        procs.signal_group(c.proc, signal.SIGTERM)
        grace = float(run.pod["spec"].get("terminationGracePeriodSeconds", 30))
        c.kill_at = time.monotonic() + grace

    def _sync_pod(
        self,
        run: PodRun,
        pod: Obj,
        cache: dict[tuple[str, str, str], Obj | None],
        refresh_volumes: bool,
    ) -> None:
        lookup = self._lookup(cache)
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and not run.terminating:
            self._begin_termination(run, pod)
        for c in run.all_containers():
            self._check_exit(run, c)
            if c.proc is not None and c.kill_at is not None and time.monotonic() >= c.kill_at:
                procs.signal_group(c.proc, signal.SIGKILL)
        if run.terminating:
            if not any(c.running for c in run.all_containers()):
                for c in run.all_containers():
                    if c.proc is not None:
                        procs.stop(c.proc, grace=0)
                self._delete_pod(run.namespace, run.name, run.uid)
                self._cleanup(run)
            return
        if refresh_volumes or not (run.directory / "volumes").exists():
            try:
                self._sync_volumes(run, lookup)
            except ApiError as exc:
                run.volume_errors = str(exc)
        # init containers one after the other, then all containers
        pending_init = next((c for c in run.init_containers if not c.done), None)
        if pending_init is not None:
            failed = any(c.done and c.exit_code != 0 for c in run.init_containers)
            if (
                not failed
                and not pending_init.running
                and time.monotonic() >= pending_init.next_start
            ):
                self._start_container(run, pending_init, lookup)
        elif run.initialized:
            for c in run.containers:
                if not c.running and not c.done and time.monotonic() >= c.next_start:
                    self._start_container(run, c, lookup)
                self._probes(run, c)
        self._write_status(run)

    def _begin_termination(self, run: PodRun, pod: Obj) -> None:
        run.terminating = True
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        deadline = time.monotonic() + float(grace)
        for c in run.all_containers():
            c.ready = False
            if c.running and c.proc is not None:
                c.kill_at = deadline
                hook = (c.spec.get("lifecycle") or {}).get("preStop")
                if hook:
                    # Like the kubelet: the preStop hook first (within the grace
                    # period), then SIGTERM; SIGKILL at the deadline regardless.
                    threading.Thread(
                        target=self._pre_stop_then_term,
                        args=(run, c, c.proc, hook, deadline),
                        name=f"prestop-{run.name}-{c.name}",
                        daemon=True,
                    ).start()
                else:
                    procs.signal_group(c.proc, signal.SIGTERM)
        log.info("terminating pod %s (grace %ss)", run.key, grace)

    def _pre_stop_then_term(
        self,
        run: PodRun,
        c: Container,
        proc: subprocess.Popen[bytes],
        hook: Obj,
        deadline: float,
    ) -> None:
        remaining = max(0.1, deadline - time.monotonic())
        ok = self._run_probe(run, c, Probe(spec={**hook, "timeoutSeconds": remaining}, next_at=0))
        verdict = "ok" if ok else "failed"
        with c.log_path.open("ab") as f:
            f.write(f"{MARK} {now_iso()} preStop hook of {c.name}: {verdict}\n".encode())
        if proc.poll() is None:
            procs.signal_group(proc, signal.SIGTERM)

    def _delete_pod(self, namespace: str, name: str, uid: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        try:
            self.rest.delete(f"/api/v1/namespaces/{namespace}/pods/{name}", body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    def _cleanup(self, run: PodRun) -> None:
        with self._lock:
            self.pods.pop(run.uid, None)
        if run.ip != HOST_IP:
            self.ips.release(run.ip)
        shutil.rmtree(run.directory, ignore_errors=True)
        log.info("cleaned up pod %s", run.key)

    # --- status --------------------------------------------------------------

    def _condition(self, run: PodRun, type_: str, ok: bool, reason: str = "") -> Obj:
        status = "True" if ok else "False"
        prev = run.conditions.get(type_)
        if prev is None or prev["status"] != status:
            prev = {"type": type_, "status": status, "lastTransitionTime": now_iso()}
            if reason and not ok:
                prev["reason"] = reason
            run.conditions[type_] = prev
        return {**prev, "lastProbeTime": None}

    def _phase(self, run: PodRun) -> str:
        if any(c.done and c.exit_code != 0 for c in run.init_containers):
            return "Failed"
        if not run.initialized:
            return "Pending"
        if run.containers and all(c.done for c in run.containers):
            return "Succeeded" if all(c.exit_code == 0 for c in run.containers) else "Failed"
        if any(c.running or c.restart_count > 0 or c.done for c in run.containers):
            return "Running"
        return "Pending"

    def _write_status(self, run: PodRun) -> None:
        containers_ready = bool(run.containers) and all(c.ready for c in run.containers)
        gates = [g["conditionType"] for g in run.pod["spec"].get("readinessGates", []) or []]
        current = {c["type"]: c["status"] for c in run.pod.get("status", {}).get("conditions", [])}
        gates_ok = all(current.get(g) == "True" for g in gates)
        conditions = [
            self._condition(run, "PodReadyToStartContainers", True),
            self._condition(run, "Initialized", run.initialized, "ContainersNotInitialized"),
            self._condition(run, "Ready", containers_ready and gates_ok, "ContainersNotReady"),
            self._condition(run, "ContainersReady", containers_ready, "ContainersNotReady"),
            self._condition(run, "PodScheduled", True),
        ]
        status: Obj = {
            "phase": self._phase(run),
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.start_time,
            "qosClass": run.pod.get("status", {}).get("qosClass", "BestEffort"),
            "conditions": conditions,
            "containerStatuses": [c.status() for c in run.containers],
        }
        if run.init_containers:
            status["initContainerStatuses"] = [c.status() for c in run.init_containers]
        if status == run.last_status:
            return
        try:
            resp = self.rest.merge_patch(
                f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status}
            )
        except ApiError as exc:
            if exc.status in (404, 409):
                return
            raise
        run.last_status = status
        run.pod["status"] = resp.get("status", {})
