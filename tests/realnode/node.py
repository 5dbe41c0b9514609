"""A real Kubernetes node for the tests: containerd + runc, CNI, kubelet,
kube-proxy and CoreDNS, all built by ``hack/node/build.sh``.

Addresses: pods get ``198.18.0.0/24`` on the bridge ``patio-br0`` (the
gateway ``198.18.0.1`` is the node's IP and where the API server listens),
Services ``198.18.1.0/24``. 198.18.0.0/15 is reserved for network tests
(RFC 2544) and used nowhere on these machines; :func:`check_range_unused`
refuses to start if it is. A raw-table rule drops whatever a pod sends
anywhere else, so pods only ever reach the bridge, each other and Services.

One real node per machine at a time (kube-proxy's iptables chains and
kubelet's fixed paths are machine-wide): :func:`machine_lock` is held for
the session. :class:`~tests.realnode.hoststate.HostState` records the host
first and undoes every change at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.kube import procs
from tests.kube.controlplane import (
    REPO_ROOT,
    Component,
    ControlPlane,
    ControlPlaneError,
    Network,
    free_port,
    log_tail,
    write_kubeconfig,
)
from tests.kube.pki import CertPair, Pki

BRIDGE = "patio-br0"
POD_CIDR = "198.18.0.0/24"
NODE_IP = "198.18.0.1"
SERVICE_CIDR = "198.18.1.0/24"
GUARDED = "198.18.0.0/23"  # pods may only talk to these
RANGE_PREFIX = "198.18."  # how they start in iptables rules
DNS_IP = "198.18.1.10"
NODE_NAME = "patio-realnode"
GUARD_CHAIN = "PATIO-NODE-GUARD"
LOCK_FILE = "/run/lock/patio-realnode.lock"
BUILD = REPO_ROOT / "hack" / "node" / "build.sh"
PATIO_IMAGE = "docker.io/library/patio:dev"  # what `patio:dev` in a pod spec means


class NodeError(ControlPlaneError):
    """The real node could not start; the message says why and which log to read."""


def network(kubelet_client: CertPair | None = None) -> Network:
    """The API server on the bridge, Services from our range, and how it reaches kubelet."""
    return Network(host=NODE_IP, service_cidr=SERVICE_CIDR, kubelet_client=kubelet_client)


def run(*argv: str, timeout: float = 120, input: str | None = None) -> str:
    res = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if res.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One real node per machine; a second session waits for the first."""
    Path(LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_range_unused() -> None:
    """Refuse to start if any address or route of the machine touches our range."""
    ours = ipaddress.ip_network(GUARDED)
    addrs = json.loads(run("ip", "-j", "addr"))
    for link in addrs:
        for a in link.get("addr_info", []):
            if a.get("family") == "inet" and ipaddress.ip_address(a["local"]) in ours:
                raise NodeError(
                    f"{a['local']} on {link['ifname']} is in {GUARDED}, the real node's range: "
                    f"a previous session left it? (`ip link delete {link['ifname']}`)"
                )
    for route in json.loads(run("ip", "-j", "route")):
        dst = route.get("dst", "default")
        if dst != "default" and ipaddress.ip_network(dst, strict=False).overlaps(ours):
            raise NodeError(f"route {dst} overlaps {GUARDED}, the real node's range")


def bridge_up() -> None:
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    # Service addresses are virtual (kube-proxy DNATs them); a packet for one
    # that has no endpoint goes to the bridge, never out of the machine.
    run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE)
    run("iptables", "-w", "-t", "raw", "-N", GUARD_CHAIN)
    run("iptables", "-w", "-t", "raw", "-A", GUARD_CHAIN, "-d", GUARDED, "-j", "RETURN")
    run("iptables", "-w", "-t", "raw", "-A", GUARD_CHAIN, "-j", "DROP")
    run("iptables", "-w", "-t", "raw", "-I", "PREROUTING", "-i", BRIDGE, "-j", GUARD_CHAIN)


@dataclass(frozen=True)
class NodeBinaries:
    root: Path

    @classmethod
    def find(cls) -> NodeBinaries:
        out = run("bash", str(BUILD), "--print-dir").strip()
        found = cls(Path(out))
        missing = [str(p) for p in found.required() if not p.exists()]
        if missing:
            raise NodeError(
                f"real node parts not built: missing {', '.join(missing)}; "
                f"run `bash hack/node/build.sh` (scripts/test.sh does)"
            )
        return found

    def bin(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def cni_dir(self) -> Path:
        return self.root / "bin" / "cni"

    def image(self, name: str) -> Path:
        return self.root / "images" / f"{name}.tar"

    def required(self) -> list[Path]:
        names = ("containerd", "containerd-shim-runc-v2", "ctr", "crictl", "kubelet", "kube-proxy")
        return [
            *(self.bin(n) for n in names),
            *(self.cni_dir / p for p in ("bridge", "loopback", "host-local", "portmap")),
            self.image("pause"),
            self.image("coredns"),
        ]

    def pause_image(self) -> str:
        versions = (REPO_ROOT / "hack" / "node" / "versions.env").read_text()
        tag = next(
            ln.split("=", 1)[1] for ln in versions.splitlines() if ln.startswith("PAUSE_VERSION=")
        )
        return f"localhost/patio/pause:{tag}"

    def coredns_image(self) -> str:
        versions = (REPO_ROOT / "hack" / "node" / "versions.env").read_text()
        tag = next(
            ln.split("=", 1)[1] for ln in versions.splitlines() if ln.startswith("COREDNS_VERSION=")
        )
        return f"localhost/patio/coredns:{tag}"


def containerd_config(work: Path, bins: NodeBinaries) -> str:
    d = work / "containerd"
    return f"""
version = 3
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{bins.pause_image()}"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # No CAP_SYS_RESOURCE here: an OOM score below the runtime's own is refused.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{bins.cni_dir}"]
    conf_dir = "{work}/cni/net.d"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def cni_config(work: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "patio",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    # No default route: pods reach the bridge (on-link) and Services.
                    "routes": [{"dst": SERVICE_CIDR}],
                    "dataDir": str(work / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(
    work: Path, pki: Pki, serving: CertPair, ports: dict[str, int]
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet_healthz"],
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki.ca.cert)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(serving.cert),
        "tlsPrivateKeyFile": str(serving.key),
        "cgroupDriver": "cgroupfs",
        # The machine has cgroup v1 (hybrid); kubelet 1.35+ refuses it unless told.
        "failCgroupV1": False,
        "failSwapOn": False,
        # No kubepods hierarchy: each container's cgroup goes away with it.
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "containerRuntimeEndpoint": f"unix://{work}/containerd/containerd.sock",
        "clusterDNS": [DNS_IP],
        "clusterDomain": "cluster.local",
        "resolvConf": "",  # pods see the cluster's DNS only, none of the machine's
        "podLogsDir": str(work / "pod-logs"),
        "volumePluginDir": str(work / "volume-plugins"),
        "staticPodPath": "",
        "rotateCertificates": False,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "nodeStatusUpdateFrequency": "5s",
        "oomScoreAdj": 0,
        "maxPods": 60,
    }


def kube_proxy_config(kubeconfig: Path, ports: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": NODE_NAME,
        "healthzBindAddress": f"127.0.0.1:{ports['proxy_healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['proxy_metrics']}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # Pods on one bridge answer each other directly; masquerading every
        # Service connection sends the answers back through the host, where
        # the DNAT is undone.
        "iptables": {"masqueradeAll": True, "syncPeriod": "5s", "minSyncPeriod": "0s"},
        # 0: leave the machine's conntrack settings alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "oomScoreAdj": 0,
    }


def coredns_objects(image: str) -> list[dict[str, Any]]:
    labels = {"k8s-app": "kube-dns"}
    corefile = (
        ".:1053 {\n    errors\n    ready :8181\n    health :8080\n"
        "    kubernetes cluster.local in-addr.arpa {\n        pods insecure\n"
        "        fallthrough in-addr.arpa\n    }\n    cache 5\n}\n"
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "patio:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "patio:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "patio:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 65534,
                            "runAsGroup": 65534,
                        },
                        "containers": [
                            {
                                "name": "coredns",
                                "image": image,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"containerPort": 1053, "protocol": "UDP", "name": "dns"},
                                    {"containerPort": 1053, "protocol": "TCP", "name": "dns-tcp"},
                                ],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 1,
                                },
                                "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}},
                                "securityContext": {
                                    "readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "clusterIP": DNS_IP,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"},
                ],
            },
        },
    ]


def client_pod(peer: str, *key: str, secret: str | None = None) -> dict[str, Any]:
    """A pod "client" of the image that runs ``patio call --peer PEER mul 6 7``
    once (it prints 42); ``key`` is the call's key option, and ``secret`` a
    Secret mounted at /auth (for ``--key-file /auth/key``)."""
    container: dict[str, Any] = {
        "name": "client",
        "image": "patio:dev",
        "imagePullPolicy": "Never",
        "args": ["call", "--peer", peer, *key, "--timeout", "20", "mul", "6", "7"],
    }
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if secret is not None:
        container["volumeMounts"] = [{"name": "auth", "mountPath": "/auth", "readOnly": True}]
        spec["volumes"] = [{"name": "auth", "secret": {"secretName": secret}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"}, "spec": spec}


@dataclass
class RealNode:
    """containerd, kubelet, kube-proxy and CoreDNS for ``plane``; see the module doc."""

    plane: ControlPlane
    work: Path
    bins: NodeBinaries
    log_dir: Path
    components: dict[str, Component] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.work / "containerd" / "containerd.sock"

    def ctr(self, *args: str, timeout: float = 300) -> str:
        return run(
            str(self.bins.bin("ctr")),
            "--address",
            str(self.socket),
            "-n",
            "k8s.io",
            *args,
            timeout=timeout,
        )

    def crictl(self, *args: str, timeout: float = 60) -> str:
        return run(
            str(self.bins.bin("crictl")),
            "--runtime-endpoint",
            f"unix://{self.socket}",
            "--image-endpoint",
            f"unix://{self.socket}",
            "--timeout",
            "30s",
            *args,
            timeout=timeout,
        )

    def _start(self, name: str, argv: Sequence[str]) -> Component:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as f:
            f.write(f"# {' '.join(argv)}\n".encode())
        comp = Component(name, procs.spawn(argv, log=log), log, "")
        self.components[name] = comp
        return comp

    def _wait(self, what: str, check: Any, comp: Component | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if comp is not None and not comp.running:
                raise NodeError(
                    f"{comp.name} exited with {comp.process.returncode} before "
                    f"{what}; read {comp.log}:\n{log_tail(comp.log)}"
                )
            with contextlib.suppress(Exception):
                if check():
                    return
            if time.monotonic() > deadline:
                tail = f"; read {comp.log}:\n{log_tail(comp.log)}" if comp else ""
                raise NodeError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
            time.sleep(0.25)

    def _step(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 1)

    def start(self, patio_image: Path) -> None:
        w = self.work
        pki = self.plane.pki
        for sub in ("containerd", "cni/net.d", "kubelet", "pod-logs", "volume-plugins"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        (w / "cni" / "net.d" / "10-patio.conflist").write_text(json.dumps(cni_config(w)))
        (w / "containerd" / "config.toml").write_text(containerd_config(w, self.bins))

        t0 = time.monotonic()
        ctrd = self._start(
            "containerd",
            [
                str(self.bins.bin("containerd")),
                "--config",
                str(w / "containerd" / "config.toml"),
                "--log-level",
                "warn",
            ],
        )
        self._wait("containerd's socket", lambda: self.ctr("version", timeout=10), ctrd, 60)
        self._step("containerd", t0)

        t0 = time.monotonic()
        for archive in (self.bins.image("pause"), self.bins.image("coredns"), patio_image):
            self.ctr("images", "import", "--local", str(archive))
        # The archive names the image `patio:dev`, as `docker build -t patio:dev`
        # would; a pod's `image: patio:dev` means docker.io/library/patio:dev.
        self.ctr("images", "tag", "--force", "patio:dev", PATIO_IMAGE)
        self._step("import images", t0)

        ports = {
            n: free_port() for n in ("kubelet", "kubelet_healthz", "proxy_healthz", "proxy_metrics")
        }
        serving = pki.issue(NODE_NAME, server_sans=[_ip(NODE_IP)], name="kubelet-serving")
        node_client = pki.issue(
            f"system:node:{NODE_NAME}", ("system:nodes",), name="kubelet-client"
        )
        kubelet_kc = write_kubeconfig(
            w / "kubelet.kubeconfig",
            self.plane.server,
            pki.ca.cert,
            node_client,
            f"system:node:{NODE_NAME}",
        )
        (w / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(w, pki, serving, ports)))
        t0 = time.monotonic()
        kubelet = self._start(
            "kubelet",
            [
                str(self.bins.bin("kubelet")),
                f"--config={w / 'kubelet.yaml'}",
                f"--kubeconfig={kubelet_kc}",
                f"--root-dir={w / 'kubelet'}",
                f"--cert-dir={w / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        self._wait("the node to be Ready", self._node_ready, kubelet, 120)
        self._step("kubelet (node Ready)", t0)

        t0 = time.monotonic()
        proxy_client = pki.issue("system:kube-proxy", name="kube-proxy")
        proxy_kc = write_kubeconfig(
            w / "kube-proxy.kubeconfig",
            self.plane.server,
            pki.ca.cert,
            proxy_client,
            "system:kube-proxy",
        )
        (w / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config(proxy_kc, ports)))
        proxy = self._start(
            "kube-proxy",
            [
                str(self.bins.bin("kube-proxy")),
                f"--config={w / 'kube-proxy.yaml'}",
                "--v=1",
            ],
        )
        self._wait(
            "kube-proxy's /healthz",
            lambda: _http_ok(f"http://127.0.0.1:{ports['proxy_healthz']}/healthz"),
            proxy,
            60,
        )
        self._step("kube-proxy", t0)

        t0 = time.monotonic()
        self.plane.kubectl(
            "apply", "-f", "-", input=yaml.safe_dump_all(coredns_objects(self.bins.coredns_image()))
        )
        self._wait("CoreDNS to be ready", self._coredns_ready, kubelet, 120)
        self._step("CoreDNS ready", t0)

    def _node_ready(self) -> bool:
        node = self.plane.kubectl_json("get", "node", NODE_NAME)
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"]
        )

    def _coredns_ready(self) -> bool:
        dep = self.plane.kubectl_json("get", "deployment", "-n", "kube-system", "coredns")
        return int(dep.get("status", {}).get("readyReplicas", 0)) >= 1

    def check_running(self) -> None:
        for comp in self.components.values():
            if not comp.running:
                raise NodeError(
                    f"{comp.name} exited with {comp.process.returncode}; "
                    f"read {comp.log}:\n{log_tail(comp.log)}"
                )

    def stop(self) -> list[str]:
        """Stop everything and remove every pod; return what could not be stopped."""
        problems: list[str] = []
        for name in ("kube-proxy", "kubelet"):
            comp = self.components.pop(name, None)
            if comp is not None:
                comp.stop()
        if "containerd" in self.components:
            # Sandboxes first: CNI DEL removes their veths, addresses and port maps.
            for attempt in range(3):
                try:
                    self.crictl("rmp", "--all", "--force", timeout=120)
                    break
                except (NodeError, subprocess.TimeoutExpired) as exc:
                    if attempt == 2:
                        problems.append(f"crictl rmp: {exc}")
            self.components.pop("containerd").stop()
        problems += self._kill_shims()
        return problems

    def _kill_shims(self) -> list[str]:
        """Shims outlive containerd by design; stop ours (and their containers)."""
        shim = str(self.bins.bin("containerd-shim-runc-v2"))
        left = []
        for _ in range(20):
            left = [pid for pid in _pids() if _exe(pid) == shim]
            if not left:
                return []
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(
                        pid, signal.SIGKILL
                    )
            time.sleep(0.25)
        return [f"shim pid {p}" for p in left]


def _ip(addr: str) -> Any:
    from cryptography import x509

    return x509.IPAddress(ipaddress.ip_address(addr))


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
