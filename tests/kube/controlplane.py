"""A real Kubernetes control plane on 127.0.0.1 for the test suite.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built by
``hack/k8s/build.sh``, are started as child processes with free ports, fresh
certificates and a fresh data directory. Each step is a plain function that
fails fast with a :class:`ControlPlaneError` naming the cause and the log file
to read, and stops what it started, so that bad input can be tested directly.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import procs
from .pki import CertPair, Pki

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "k8s" / "versions.env"
BUILD_COMMAND = "hack/k8s/build.sh"
HOST = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"


@dataclass(frozen=True)
class Network:
    """Where the API server listens and which Service addresses it hands out.

    The default serves the node agent: everything on 127.0.0.1. A real node
    (tests/realnode) needs the API server on an address its pods can reach
    (its bridge's), Node authorization, and a client certificate to reach
    kubelets for logs and exec.
    """

    host: str = HOST
    service_cidr: str = SERVICE_CIDR
    kubelet_client: CertPair | None = None

    @property
    def kubernetes_service_ip(self) -> str:
        """The ClusterIP of the ``kubernetes`` Service (the range's first address)."""
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))


class ControlPlaneError(RuntimeError):
    """The control plane could not be started; the message says why and where to look."""


class MissingBinaryError(ControlPlaneError):
    pass


class PortInUseError(ControlPlaneError):
    pass


class ComponentExitedError(ControlPlaneError):
    pass


class ComponentNotReadyError(ControlPlaneError):
    pass


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def default_bin_dir() -> Path:
    """Where ``hack/k8s/build.sh`` puts the binaries (``PATIO_K8S_BIN_DIR`` overrides)."""
    override = os.environ.get("PATIO_K8S_BIN_DIR")
    if override:
        return Path(override)
    cache = os.environ.get("PATIO_CACHE_DIR") or str(Path.home() / ".cache" / "patio")
    return Path(cache) / "k8s" / read_versions()["K8S_VERSION"] / "bin"


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    helm: Path

    @classmethod
    def find(cls, bin_dir: Path | None = None) -> Binaries:
        """The built binaries in ``bin_dir``; :class:`MissingBinaryError` names the
        build command if any is missing."""
        directory = bin_dir or default_bin_dir()
        names = {
            "etcd": "etcd",
            "kube_apiserver": "kube-apiserver",
            "kube_controller_manager": "kube-controller-manager",
            "kube_scheduler": "kube-scheduler",
            "kubectl": "kubectl",
            "helm": "helm",
        }
        paths = {attr: directory / exe for attr, exe in names.items()}
        missing = [str(p) for p in paths.values() if not (p.is_file() and os.access(p, os.X_OK))]
        if missing:
            raise MissingBinaryError(
                f"Kubernetes test binaries not built: missing {', '.join(missing)}. "
                f"Run `{BUILD_COMMAND}` (or hack/k8s/ensure.sh) from the repository root "
                f"to build them into {directory}."
            )
        return cls(**paths)


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(port: int, component: str, host: str = HOST) -> None:
    """Fail fast with :class:`PortInUseError` if something listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"{component}: port {host}:{port} is already in use ({exc.strerror}); "
                "pick another port or stop what listens there"
            ) from exc


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text[-lines:])


@dataclass
class Component:
    """One running control-plane process."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    url: str

    def stop(self, grace: float = 10.0) -> None:
        procs.stop(self.process, grace)

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def _ssl_context(ca: Path | None, client: CertPair | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def wait_ready(
    component: Component,
    path: str,
    *,
    timeout: float,
    ca: Path | None = None,
    client: CertPair | None = None,
) -> None:
    """Poll ``component.url + path`` until it answers 200 ``ok``.

    Fails fast with :class:`ComponentExitedError` if the process exits, or with
    :class:`ComponentNotReadyError` after ``timeout`` seconds; either way the
    process is stopped and the message names its log file.
    """
    ctx = _ssl_context(ca, client) if component.url.startswith("https") else None
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        code = component.process.poll()
        if code is not None:
            procs.forget(component.process)
            raise ComponentExitedError(
                f"{component.name} exited with code {code} before it was ready; "
                f"read its log {component.log}:\n{log_tail(component.log)}"
            )
        try:
            with urllib.request.urlopen(component.url + path, timeout=2, context=ctx) as resp:
                body = resp.read().decode(errors="replace")
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}: {body[:300]}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}"
        except (OSError, ssl.SSLError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            component.stop(grace=3)
            raise ComponentNotReadyError(
                f"{component.name} did not become ready at {component.url}{path} within "
                f"{timeout:.0f}s (last answer: {last}); read its log {component.log}:\n"
                f"{log_tail(component.log)}"
            )
        time.sleep(0.2)


def start_component(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    url: str,
    ports: Sequence[int],
    *,
    check_ports: bool = True,
) -> Component:
    """Check ``ports`` are free, then start ``argv`` logging to ``log_dir/<name>.log``.

    (A port taken between the check and the bind shows as the process exiting,
    see :func:`wait_ready`; ``check_ports=False`` tests that path.)
    """
    for port in ports if check_ports else ():
        check_port_free(port, name)
    exe = Path(argv[0])
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise MissingBinaryError(f"{name}: no executable at {exe}; run `{BUILD_COMMAND}`")
    log = log_dir / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        f.write(f"# {' '.join(argv)}\n".encode())
    proc = procs.spawn(argv, log=log)
    return Component(name=name, process=proc, log=log, url=url)


def start_etcd(
    binary: Path,
    data_dir: Path,
    log_dir: Path,
    *,
    client_port: int,
    peer_port: int,
    timeout: float = 60,
    check_ports: bool = True,
) -> Component:
    url = f"http://{HOST}:{client_port}"
    peer = f"http://{HOST}:{peer_port}"
    argv = [
        str(binary),
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync=true",
        "--quota-backend-bytes=2147483648",
        "--log-level=warn",
    ]
    comp = start_component(
        "etcd", argv, log_dir, url, (client_port, peer_port), check_ports=check_ports
    )
    wait_ready(comp, "/health", timeout=timeout)
    return comp


def start_apiserver(
    binary: Path,
    pki: Pki,
    log_dir: Path,
    cert_dir: Path,
    *,
    etcd_url: str,
    port: int,
    timeout: float = 120,
    extra_args: Sequence[str] = (),
    network: Network = Network(),
) -> Component:
    host = network.host
    url = f"https://{host}:{port}"
    if network.kubelet_client is None:
        kubelet = ["--authorization-mode=RBAC"]
    else:
        kubelet = [
            "--authorization-mode=Node,RBAC",
            f"--kubelet-client-certificate={network.kubelet_client.cert}",
            f"--kubelet-client-key={network.kubelet_client.key}",
        ]
    # 127.0.0.1 may not be written into Endpoints, so keep the reconciler of
    # the `kubernetes` Service off there; any other address is its endpoint.
    reconciler = "none" if ipaddress.ip_address(host).is_loopback else "lease"
    argv = [
        str(binary),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={host}",
        f"--advertise-address={host}",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki.serving.cert}",
        f"--tls-private-key-file={pki.serving.key}",
        f"--client-ca-file={pki.ca.cert}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={pki.sa_public}",
        f"--service-account-signing-key-file={pki.sa_private}",
        f"--service-cluster-ip-range={network.service_cidr}",
        *kubelet,
        "--allow-privileged=true",
        f"--endpoint-reconciler-type={reconciler}",
        # The test node's only reachable address (for `kubectl logs`).
        "--kubelet-preferred-address-types=InternalIP",
        "--v=1",
        *extra_args,
    ]
    comp = start_component("kube-apiserver", argv, log_dir, url, (port,))
    wait_ready(comp, "/readyz", timeout=timeout, ca=pki.ca.cert, client=pki.admin)
    return comp


def kubeconfig_dict(server: str, ca: Path, client: CertPair, user: str = "admin") -> dict[str, Any]:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "patio-test",
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert),
                    "client-key-data": b64(client.key),
                },
            }
        ],
        "contexts": [{"name": "patio-test", "context": {"cluster": "patio-test", "user": user}}],
        "current-context": "patio-test",
    }


def write_kubeconfig(
    path: Path, server: str, ca: Path, client: CertPair, user: str = "admin"
) -> Path:
    path.write_text(yaml.safe_dump(kubeconfig_dict(server, ca, client, user)))
    path.chmod(0o600)
    return path


def start_controller_manager(
    binary: Path,
    pki: Pki,
    kubeconfig: Path,
    log_dir: Path,
    cert_dir: Path,
    *,
    port: int,
    timeout: float = 90,
    service_cidr: str = SERVICE_CIDR,
) -> Component:
    url = f"https://{HOST}:{port}"
    argv = [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={HOST}",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        "--controllers=*",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.sa_private}",
        f"--root-ca-file={pki.ca.cert}",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        f"--service-cluster-ip-range={service_cidr}",
        # Fast reactions for tests.
        "--node-monitor-grace-period=40s",
        "--concurrent-deployment-syncs=5",
        "--v=1",
    ]
    comp = start_component("kube-controller-manager", argv, log_dir, url, (port,))
    wait_ready(comp, "/healthz", timeout=timeout)
    return comp


def start_scheduler(
    binary: Path, kubeconfig: Path, log_dir: Path, cert_dir: Path, *, port: int, timeout: float = 90
) -> Component:
    url = f"https://{HOST}:{port}"
    argv = [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={HOST}",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        "--v=1",
    ]
    comp = start_component("kube-scheduler", argv, log_dir, url, (port,))
    wait_ready(comp, "/healthz", timeout=timeout)
    return comp


@dataclass
class Ports:
    etcd_client: int = 0
    etcd_peer: int = 0
    apiserver: int = 0
    controller_manager: int = 0
    scheduler: int = 0

    def fill(self) -> Ports:
        for name in ("etcd_client", "etcd_peer", "apiserver", "controller_manager", "scheduler"):
            if not getattr(self, name):
                setattr(self, name, free_port())
        return self


@dataclass
class ControlPlane:
    """A running control plane. Build one with :meth:`start`; stop it with :meth:`stop`."""

    workdir: Path
    binaries: Binaries
    ports: Ports
    pki: Pki
    kubeconfig: Path
    log_dir: Path
    network: Network = Network()
    components: dict[str, Component] = field(default_factory=dict)
    _api_client: Any = None

    @property
    def server(self) -> str:
        return f"https://{self.network.host}:{self.ports.apiserver}"

    @property
    def bin_dir(self) -> Path:
        return self.binaries.kubectl.parent

    @classmethod
    def start(
        cls,
        workdir: Path,
        binaries: Binaries | None = None,
        ports: Ports | None = None,
        *,
        ready_timeout: float = 120,
        network: Network = Network(),
        pki: Pki | None = None,
    ) -> ControlPlane:
        """Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler.

        On any failure, everything started so far is stopped before the
        :class:`ControlPlaneError` propagates. ``pki`` (made for
        ``network``'s addresses) is created when not given.
        """
        binaries = binaries or Binaries.find()
        workdir.mkdir(parents=True, exist_ok=True)
        log_dir = workdir / "logs"
        log_dir.mkdir(exist_ok=True)
        if pki is None:
            pki = Pki.create(workdir / "pki", (network.host, network.kubernetes_service_ip))
        plane = cls(
            workdir=workdir,
            binaries=binaries,
            ports=(ports or Ports()).fill(),
            pki=pki,
            kubeconfig=workdir / "kubeconfig",
            log_dir=log_dir,
            network=network,
        )
        try:
            plane._start_all(ready_timeout)
        except BaseException:
            plane.stop()
            raise
        return plane

    def _start_all(self, timeout: float) -> None:
        b, p = self.binaries, self.ports
        etcd = start_etcd(
            b.etcd,
            self.workdir / "etcd-data",
            self.log_dir,
            client_port=p.etcd_client,
            peer_port=p.etcd_peer,
            timeout=timeout,
        )
        self.components["etcd"] = etcd
        self.components["kube-apiserver"] = start_apiserver(
            b.kube_apiserver,
            self.pki,
            self.log_dir,
            self.workdir / "apiserver-certs",
            etcd_url=etcd.url,
            port=p.apiserver,
            timeout=timeout,
            network=self.network,
        )
        write_kubeconfig(self.kubeconfig, self.server, self.pki.ca.cert, self.pki.admin)
        self.components["kube-controller-manager"] = start_controller_manager(
            b.kube_controller_manager,
            self.pki,
            self.kubeconfig,
            self.log_dir,
            self.workdir / "controller-manager-certs",
            port=p.controller_manager,
            timeout=timeout,
            service_cidr=self.network.service_cidr,
        )
        self.components["kube-scheduler"] = start_scheduler(
            b.kube_scheduler,
            self.kubeconfig,
            self.log_dir,
            self.workdir / "scheduler-certs",
            port=p.scheduler,
            timeout=timeout,
        )

    def stop(self) -> None:
        """Stop every component (reverse start order) and drop etcd's data."""
        for name in reversed(list(self.components)):
            self.components.pop(name).stop()
        if self._api_client is not None:
            with contextlib.suppress(Exception):
                self._api_client.close()
            self._api_client = None
        shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)

    def check_running(self) -> None:
        """Raise :class:`ComponentExitedError` if any component died."""
        for comp in self.components.values():
            if not comp.running:
                raise ComponentExitedError(
                    f"{comp.name} exited with code {comp.process.returncode}; "
                    f"read its log {comp.log}:\n{log_tail(comp.log)}"
                )

    # --- clients -----------------------------------------------------------

    @property
    def api_client(self) -> Any:
        """The admin ``kubernetes.client.ApiClient`` (system:masters)."""
        if self._api_client is None:
            self._api_client = self.new_api_client()
        return self._api_client

    def new_api_client(self, kubeconfig: Path | None = None) -> Any:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig or self.kubeconfig), client_configuration=cfg
        )
        return client.ApiClient(cfg)

    def user_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for a client certificate of ``user`` in ``groups`` (for RBAC tests)."""
        pair = self.pki.issue(user, tuple(groups), name=f"user-{user}")
        path = self.workdir / f"kubeconfig-{user}"
        return write_kubeconfig(path, self.server, self.pki.ca.cert, pair, user)

    def token_kubeconfig(self, token: str, name: str) -> Path:
        """A kubeconfig that authenticates with a bearer ``token`` (e.g. a ServiceAccount's)."""
        cfg = kubeconfig_dict(self.server, self.pki.ca.cert, self.pki.admin, name)
        cfg["users"][0]["user"] = {"token": token}
        path = self.workdir / f"kubeconfig-{name}"
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """Environment for a child process that talks to this control plane."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        helm_home = self.workdir / "helm"
        env["HELM_CACHE_HOME"] = str(helm_home / "cache")
        env["HELM_CONFIG_HOME"] = str(helm_home / "config")
        env["HELM_DATA_HOME"] = str(helm_home / "data")
        return env

    def _run(
        self,
        exe: Path,
        args: Sequence[str],
        *,
        check: bool,
        input: str | None,
        timeout: float,
        kubeconfig: Path | None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(exe), *args]
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=self.env(kubeconfig),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, argv, output=result.stdout, stderr=result.stderr
            )
        return result

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built ``kubectl`` with this plane's kubeconfig (admin unless given)."""
        return self._run(
            self.binaries.kubectl,
            args,
            check=check,
            input=input,
            timeout=timeout,
            kubeconfig=kubeconfig,
        )

    def helm(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 300,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built ``helm`` with this plane's kubeconfig (admin unless given)."""
        return self._run(
            self.binaries.helm,
            args,
            check=check,
            input=input,
            timeout=timeout,
            kubeconfig=kubeconfig,
        )

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    @contextlib.contextmanager
    def running(self) -> Iterator[ControlPlane]:
        try:
            yield self
        finally:
            self.stop()
