"""Deployments and StatefulSets become real processes on the test node."""

from __future__ import annotations

import ipaddress
import time
import urllib.request
from typing import Any

import pytest

from tests.kube.controlplane import ControlPlane
from tests.kube.helpers import apply, cmdline, is_ready, pid_alive, pods, wait_until
from tests.kube.nodeagent import NodeAgent

pytestmark = pytest.mark.kube


def http_server_deployment(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "web",
                            "image": "python:3.11",
                            "command": ["python", "-m", "http.server"],
                            "args": ["--bind", "$(POD_IP)", "8080"],
                            "env": [
                                {
                                    "name": "POD_IP",
                                    "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                                }
                            ],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {
                                "httpGet": {"path": "/", "port": "http"},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def test_version_is_pinned(kube_control_plane: ControlPlane) -> None:
    version = kube_control_plane.kubectl_json("version")
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"


def test_deployment_runs_processes_with_pod_ips(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    apply(plane, ns, http_server_deployment("web", 2))
    plane.kubectl("rollout", "status", "-n", ns, "deployment/web", "--timeout=90s")

    running = pods(plane, ns, "app=web")
    assert len(running) == 2
    ips = [p["status"]["podIP"] for p in running]
    assert len(set(ips)) == 2
    for p, ip in zip(running, ips, strict=True):
        addr = ipaddress.ip_address(ip)
        assert addr.is_loopback and ip != "127.0.0.1"
        assert p["status"]["phase"] == "Running"
        assert is_ready(p)
        status = p["status"]["containerStatuses"][0]
        assert status["ready"] is True
        assert "running" in status["state"]
        assert status["restartCount"] == 0
        # the process really serves on its own address
        with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as resp:
            assert resp.status == 200

    pids = [kube_node.pids(ns, p["metadata"]["name"])["web"] for p in running]
    for pid in pids:
        assert pid_alive(pid)
        argv = cmdline(pid)
        assert argv[1:] == ["-m", "http.server", "--bind", ips[pids.index(pid)], "8080"]
        assert argv[0].startswith(str(kube_node_venv_bin()))

    plane.kubectl("delete", "-n", ns, "deployment/web", "--cascade=foreground", "--wait=true")
    wait_until(lambda: not pods(plane, ns, "app=web"), timeout=60, what="pods deleted")
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10, what="processes gone")
    # addresses are given back and reused
    assert not set(ips) & set(kube_node.ips.in_use())


def kube_node_venv_bin() -> str:
    from tests.kube.nodeagent import VENV_BIN

    return VENV_BIN


def test_statefulset_pods_run_and_scale_down(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    script = (
        "import os, time; print('hello from', os.environ['POD_NAME'], flush=True); time.sleep(3600)"
    )
    apply(
        plane,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "w"},
            "spec": {"clusterIP": "None", "selector": {"app": "w"}, "ports": [{"port": 7000}]},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "w"},
            "spec": {
                "serviceName": "w",
                "replicas": 2,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": {"app": "w"}},
                "template": {
                    "metadata": {"labels": {"app": "w"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 3,
                        "containers": [
                            {
                                "name": "worker",
                                "image": "patio",
                                "command": ["python", "-c", script],
                                "env": [
                                    {
                                        "name": "POD_NAME",
                                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                    }
                                ],
                            }
                        ],
                    },
                },
            },
        },
    )
    wait_until(
        lambda: plane.kubectl_json("get", "sts", "-n", ns, "w")["status"].get("readyReplicas") == 2,
        timeout=60,
        what="statefulset ready",
    )
    names = sorted(p["metadata"]["name"] for p in pods(plane, ns, "app=w"))
    assert names == ["w-0", "w-1"]
    wait_until(lambda: "hello from w-1" in kube_node.pod_log(ns, "w-1"), timeout=10)
    pid1 = kube_node.pids(ns, "w-1")["worker"]
    # kubectl logs goes API server -> the node's kubelet endpoint
    logs = plane.kubectl("logs", "-n", ns, "w-1").stdout
    assert logs == "hello from w-1\n"

    plane.kubectl("scale", "-n", ns, "sts/w", "--replicas=1")
    wait_until(lambda: [p["metadata"]["name"] for p in pods(plane, ns)] == ["w-0"], timeout=60)
    wait_until(lambda: not pid_alive(pid1), timeout=10, what="w-1 process gone")
    assert kube_node.pids(ns, "w-0")


def test_graceful_deletion_sigterm_then_sigkill(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    """A process that ignores SIGTERM is killed after terminationGracePeriodSeconds,
    then the pod object is removed."""
    plane, ns = kube_control_plane, kube_namespace
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('got SIGTERM', flush=True))\n"
        "print('up', flush=True)\n"
        "while True: time.sleep(0.1)\n"
    )
    apply(
        plane,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "stubborn"},
            "spec": {
                "terminationGracePeriodSeconds": 3,
                "containers": [{"name": "c", "image": "x", "command": ["python", "-c", script]}],
            },
        },
    )
    wait_until(lambda: "up" in kube_node.pod_log(ns, "stubborn", "c"), timeout=30)
    pid = kube_node.pids(ns, "stubborn")["c"]
    started = time.monotonic()
    plane.kubectl("delete", "-n", ns, "pod/stubborn", "--wait=false")
    wait_until(lambda: not pid_alive(pid), timeout=20, what="process killed")
    killed_after = time.monotonic() - started
    wait_until(lambda: not pods(plane, ns), timeout=20, what="pod object removed")
    log = kube_node.pod_log(ns, "stubborn", "c")
    assert "got SIGTERM" in log
    assert 2.0 <= killed_after < 10, killed_after


DRAINER = """
import pathlib, signal, sys, time
flag = pathlib.Path("/var/lib/patio-kube-drain/drained")
def on_term(*_):
    print("SIGTERM, drained before:", flag.exists(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("serving", flush=True)
while True:
    time.sleep(0.05)
"""


def test_pre_stop_hook_runs_before_sigterm(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    """A preStop exec hook (in the pod's mount namespace) finishes before the
    container gets SIGTERM, as the kubelet does it: how workers drain."""
    plane, ns = kube_control_plane, kube_namespace
    mount = {"name": "state", "mountPath": "/var/lib/patio-kube-drain"}
    apply(
        plane,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "drainer"},
            "spec": {
                "terminationGracePeriodSeconds": 10,
                "containers": [
                    {
                        "name": "c",
                        "image": "x",
                        "command": ["python", "-c", DRAINER],
                        "volumeMounts": [mount],
                        "lifecycle": {
                            "preStop": {
                                "exec": {
                                    "command": [
                                        "sh",
                                        "-c",
                                        "sleep 1; touch /var/lib/patio-kube-drain/drained",
                                    ]
                                }
                            }
                        },
                    }
                ],
                "volumes": [{"name": "state", "emptyDir": {}}],
            },
        },
    )
    wait_until(lambda: "serving" in kube_node.pod_log(ns, "drainer"), timeout=30)
    pid = kube_node.pids(ns, "drainer")["c"]
    plane.kubectl("delete", "-n", ns, "pod/drainer", "--wait=true", "--timeout=30s")
    assert not pid_alive(pid)
    log = kube_node.pod_log(ns, "drainer")
    assert "preStop hook of c: ok" in log
    assert "SIGTERM, drained before: True" in log
    assert "exited with code 0" in log


def test_job_runs_to_completion(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    """A Job's pod exits 0: phase Succeeded, the Job completes (its pod
    finalizer is handled by the real job controller), the logs stay readable."""
    plane, ns = kube_control_plane, kube_namespace
    apply(
        plane,
        ns,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {"name": "c", "image": "x", "command": ["python", "-c", "print(6 * 7)"]}
                        ],
                    }
                },
            },
        },
    )
    plane.kubectl("wait", "-n", ns, "--for=condition=Complete", "job/once", "--timeout=60s")
    (job_pod,) = pods(plane, ns, "job-name=once")
    assert job_pod["status"]["phase"] == "Succeeded"
    assert "42" in kube_node.pod_log(ns, job_pod["metadata"]["name"]).splitlines()
    assert plane.kubectl("logs", "-n", ns, job_pod["metadata"]["name"]).stdout == "42\n"
