"""The real node runs the project's image: pods in containers, Services, DNS, logs, exec."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import yaml

from tests.kube.helpers import wait_until

from . import node as rn
from .plugin import RealCluster

pytestmark = pytest.mark.slow

# Workers refuse weak keys on a non-loopback address: 32 random bytes.
KEY = secrets.token_urlsafe(32)
T = TypeVar("T")


def apply(cluster: RealCluster, ns: str, *objects: dict[str, Any]) -> None:
    cluster.plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(objects))


def wait_for(
    cluster: RealCluster, ns: str, obj: str, fn: Callable[[], T | None], timeout: float, what: str
) -> T:
    """``wait_until``; on timeout the error carries ``kubectl describe`` of ``obj``."""
    try:
        return wait_until(fn, timeout=timeout, interval=0.5, what=what)
    except TimeoutError as exc:
        res = cluster.plane.kubectl("describe", "-n", ns, obj, check=False)
        logs = cluster.plane.kubectl("logs", "-n", ns, obj, "--previous", check=False)
        raise AssertionError(
            f"{exc}\n{res.stdout[-3000:]}{res.stderr[-500:]}\nlogs of the last run:\n"
            f"{logs.stdout[-3000:]}{logs.stderr[-500:]}"
        ) from exc


def worker_objects() -> list[dict[str, Any]]:
    labels = {"app": "worker"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "key"},
            "stringData": {"key": KEY},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "worker", "labels": labels},
            "spec": {
                "containers": [
                    {
                        "name": "worker",
                        "image": "patio:dev",
                        "imagePullPolicy": "Never",
                        "args": ["worker", "tasks:rpc"],
                        "env": [
                            {
                                "name": "POD_IP",
                                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                            },
                            {
                                "name": "PATIO_KEY",
                                "valueFrom": {"secretKeyRef": {"name": "key", "key": "key"}},
                            },
                        ],
                        "ports": [{"containerPort": 15383, "name": "mesh"}],
                        "readinessProbe": {"tcpSocket": {"port": "mesh"}, "periodSeconds": 1},
                        "securityContext": {
                            "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "worker"},
            "spec": {"selector": labels, "ports": [{"port": 15383, "targetPort": "mesh"}]},
        },
    ]


def test_node_is_ready_with_the_built_versions(real_node: RealCluster) -> None:
    print(f"real node start-up steps (s): {real_node.node.timings}")
    node = real_node.plane.kubectl_json("get", "node", rn.NODE_NAME)
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3"
    assert info["kubeProxyVersion"] in ("", "v1.36.3")
    assert info["containerRuntimeVersion"].startswith("containerd://2.")
    assert {"type": "InternalIP", "address": rn.NODE_IP} in node["status"]["addresses"]


def test_worker_pod_serves_calls_through_its_service(
    real_node: RealCluster, real_namespace: str
) -> None:
    plane, ns = real_node.plane, real_namespace
    apply(real_node, ns, *worker_objects())

    def ready() -> dict[str, Any] | None:
        pod: dict[str, Any] = plane.kubectl_json("get", "pod", "-n", ns, "worker")
        conds = pod["status"].get("conditions", [])
        ok = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
        return pod if ok else None

    pod = wait_for(real_node, ns, "pod/worker", ready, 120, "the worker pod to be Ready")
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(rn.POD_CIDR)
    assert pod["status"]["hostIP"] == rn.NODE_IP

    # In the container: the image's user, a read-only root (kubectl exec via kubelet).
    probe = (
        "import os, pathlib\nprint(os.getuid(), os.getgid())\n"
        "try:\n    pathlib.Path('/app/x').write_text('x')\n"
        "except OSError as e:\n    print(e.strerror)\n"
    )
    out = plane.kubectl("exec", "-n", ns, "worker", "--", "python", "-c", probe).stdout
    assert out.splitlines() == ["10001 10001", "Read-only file system"]

    # From the host through the ClusterIP (kube-proxy's iptables rules).
    svc = plane.kubectl_json("get", "service", "-n", ns, "worker")
    cluster_ip = svc["spec"]["clusterIP"]
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network(rn.SERVICE_CIDR)
    call = [
        sys.executable,
        "-m",
        "patio",
        "call",
        "--peer",
        f"{cluster_ip}:15383",
        "--key",
        KEY,
        "--timeout",
        "5",
        "mul",
        "6",
        "7",
    ]

    def host_call() -> str | None:
        res = subprocess.run(call, capture_output=True, text=True, timeout=30, check=False)
        return res.stdout.strip() if res.returncode == 0 else None

    assert wait_until(host_call, timeout=60, interval=1, what="a call via the ClusterIP") == "42"

    # From a pod, by the Service's DNS name (CoreDNS via the kube-dns ClusterIP).
    apply(real_node, ns, rn.client_pod(f"worker.{ns}.svc.cluster.local:15383", "--key", KEY))

    def client_done() -> str | None:
        phase = plane.kubectl_json("get", "pod", "-n", ns, "client")["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(real_node, ns, "pod/client", client_done, 120, "the client pod to finish")
    logs = plane.kubectl("logs", "-n", ns, "client").stdout
    assert (phase, logs.strip()) == ("Succeeded", "42")
    worker_log = plane.kubectl("logs", "-n", ns, "worker").stdout
    assert worker_log, "kubectl logs of the worker is empty"
