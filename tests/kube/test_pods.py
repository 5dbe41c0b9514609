"""What one pod sees and how its failures show: env, volumes that follow
their Secret/ConfigMap, a missing command, restarts and probes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.kube.controlplane import ControlPlane
from tests.kube.helpers import apply, is_ready, pid_alive, pod, wait_until
from tests.kube.nodeagent import NodeAgent

pytestmark = pytest.mark.kube

WATCHER = """
import json, os, pathlib, sys, time
root = pathlib.Path(sys.argv[1])
env = {k: v for k, v in os.environ.items() if k.startswith(("T_", "CFG_"))}
print("ENV " + json.dumps(env, sort_keys=True), flush=True)
last = None
while True:
    now = {p.name: p.read_text() for p in sorted(root.iterdir()) if not p.name.startswith("..")}
    if now != last:
        print("FILES " + json.dumps(now, sort_keys=True), flush=True)
        last = now
    time.sleep(0.2)
"""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def file_states(log: str) -> list[dict[str, str]]:
    return [json.loads(line[6:]) for line in log.splitlines() if line.startswith("FILES ")]


def test_env_and_secret_volume_follow_updates(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    mount = "/etc/patio-kube-test"  # created on the host if missing, left empty
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "auth"},
        "data": {"key": b64("k1"), "peers": b64("a:1")},
    }
    apply(
        plane,
        ns,
        secret,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg"},
            "data": {"mode": "fast", "level": "3"},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "watcher", "labels": {"role": "probe"}},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [
                    {
                        "name": "main",
                        "image": "x",
                        "command": ["python", "-c", WATCHER, mount],
                        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                        "env": [
                            {"name": "T_PLAIN", "value": "v-$(CFG_mode)"},
                            {
                                "name": "T_KEY",
                                "valueFrom": {"secretKeyRef": {"name": "auth", "key": "key"}},
                            },
                            {
                                "name": "T_LEVEL",
                                "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "level"}},
                            },
                            *[
                                {"name": f"T_{n}", "valueFrom": {"fieldRef": {"fieldPath": f}}}
                                for n, f in [
                                    ("IP", "status.podIP"),
                                    ("HOST", "status.hostIP"),
                                    ("NAME", "metadata.name"),
                                    ("NS", "metadata.namespace"),
                                    ("NODE", "spec.nodeName"),
                                    ("ROLE", "metadata.labels['role']"),
                                ]
                            ],
                        ],
                        "volumeMounts": [{"name": "auth", "mountPath": mount}],
                    }
                ],
                "volumes": [{"name": "auth", "secret": {"secretName": "auth"}}],
            },
        },
    )
    wait_until(lambda: file_states(kube_node.pod_log(ns, "watcher")), timeout=30)
    log = kube_node.pod_log(ns, "watcher")
    env = json.loads(next(li for li in log.splitlines() if li.startswith("ENV "))[4:])
    ip = pod(plane, ns, "watcher")["status"]["podIP"]
    assert env == {
        "CFG_mode": "fast",
        "CFG_level": "3",
        "T_PLAIN": "v-fast",
        "T_KEY": "k1",
        "T_LEVEL": "3",
        "T_IP": ip,
        "T_HOST": "127.0.0.1",
        "T_NAME": "watcher",
        "T_NS": ns,
        "T_NODE": kube_node.node_name,
        "T_ROLE": "probe",
    }
    assert file_states(log)[0] == {"key": "k1", "peers": "a:1"}
    # The mount is private to the pod: the host sees an empty mount point.
    assert list(Path(mount).iterdir()) == []

    # Update the Secret: the running process sees the new files, no restart.
    secret["data"] = {"key": b64("k2"), "peers": b64("a:1,b:2")}
    apply(plane, ns, secret)
    wait_until(
        lambda: {"key": "k2", "peers": "a:1,b:2"} in file_states(kube_node.pod_log(ns, "watcher")),
        timeout=15,
        what="secret update visible in the pod",
    )
    states = file_states(kube_node.pod_log(ns, "watcher"))
    # never a mix of old and new
    assert all(
        s in ({"key": "k1", "peers": "a:1"}, {"key": "k2", "peers": "a:1,b:2"}) for s in states
    )
    status = pod(plane, ns, "watcher")["status"]["containerStatuses"][0]
    assert status["restartCount"] == 0


def test_missing_command_is_reported_like_a_kubelet(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    plane, ns = kube_control_plane, kube_namespace

    def spec(name: str, policy: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": policy,
                "containers": [{"name": "c", "image": "x", "command": ["no-such-command-xyz"]}],
            },
        }

    apply(plane, ns, spec("never", "Never"), spec("always", "Always"))

    never = wait_until(
        lambda: (p := pod(plane, ns, "never"))["status"].get("phase") == "Failed" and p,
        timeout=30,
        what="pod Failed",
    )
    term = never["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "StartError"
    assert term["exitCode"] == 128
    assert "no-such-command-xyz" in term["message"]
    assert "executable file not found" in term["message"]

    def crash_looping() -> dict[str, Any] | None:
        cs = pod(plane, ns, "always")["status"].get("containerStatuses", [{}])[0]
        return cs if cs.get("restartCount", 0) >= 2 else None

    cs = wait_until(crash_looping, timeout=30, what="restarts of a missing command")
    assert cs["lastState"]["terminated"]["reason"] == "StartError"
    assert cs["ready"] is False
    assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"


def test_restart_policy_liveness_and_exit_codes(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    apply(
        plane,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "crasher"},
            "spec": {
                "restartPolicy": "OnFailure",
                "containers": [
                    {"name": "c", "image": "x", "command": ["sh", "-c", "echo attempt; exit 3"]}
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "done"},
            "spec": {
                "restartPolicy": "OnFailure",
                "containers": [{"name": "c", "image": "x", "command": ["true"]}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "unhealthy"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "c",
                        "image": "x",
                        "command": ["sleep", "3600"],
                        "livenessProbe": {
                            "exec": {"command": ["false"]},
                            "periodSeconds": 1,
                            "failureThreshold": 2,
                        },
                    }
                ],
            },
        },
    )

    def restarted(name: str, n: int) -> dict[str, Any] | None:
        cs = pod(plane, ns, name)["status"].get("containerStatuses", [{}])[0]
        return cs if cs.get("restartCount", 0) >= n else None

    cs = wait_until(lambda: restarted("crasher", 2), timeout=40, what="crasher restarts")
    assert cs["lastState"]["terminated"]["exitCode"] == 3
    assert cs["lastState"]["terminated"]["reason"] == "Error"
    assert kube_node.pod_log(ns, "crasher").count("attempt") >= 2

    done = wait_until(
        lambda: (p := pod(plane, ns, "done"))["status"].get("phase") == "Succeeded" and p,
        timeout=30,
    )
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")

    def running_container() -> tuple[int, int] | None:
        run = kube_node.pod(ns, "unhealthy")
        c = run.containers[0] if run else None
        return (c.proc.pid, c.restart_count) if c and c.proc and c.running else None

    first_pid, restarts = wait_until(running_container, timeout=30)
    cs = wait_until(
        lambda: restarted("unhealthy", restarts + 1), timeout=40, what="liveness restart"
    )
    assert not pid_alive(first_pid)
    assert cs["lastState"]["terminated"]["exitCode"] == 143  # SIGTERM
    assert "liveness probe failed" in kube_node.pod_log(ns, "unhealthy")


READY_FLIP = """
import pathlib, time
flag = pathlib.Path("/var/lib/patio-kube-test/ready")
print("init said:", pathlib.Path("/var/lib/patio-kube-test/from-init").read_text(), flush=True)
time.sleep(1.5)
flag.write_text("yes")
print("ready on", flush=True)
time.sleep(4)
flag.unlink()
print("ready off", flush=True)
time.sleep(3600)
"""


def test_init_container_emptydir_and_exec_readiness(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    """An init container fills an emptyDir the main container reads; an exec
    readiness probe runs inside the pod's mount namespace (it sees the
    emptyDir at its mountPath) and Ready follows it both ways."""
    plane, ns = kube_control_plane, kube_namespace
    mount = {"name": "scratch", "mountPath": "/var/lib/patio-kube-test"}
    apply(
        plane,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "flip"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "initContainers": [
                    {
                        "name": "prepare",
                        "image": "x",
                        "command": ["sh", "-c", "echo hi > /var/lib/patio-kube-test/from-init"],
                        "volumeMounts": [mount],
                    }
                ],
                "containers": [
                    {
                        "name": "main",
                        "image": "x",
                        "command": ["python", "-c", READY_FLIP],
                        "volumeMounts": [mount],
                        "readinessProbe": {
                            "exec": {"command": ["test", "-f", "/var/lib/patio-kube-test/ready"]},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                        },
                    }
                ],
                "volumes": [{"name": "scratch", "emptyDir": {}}],
            },
        },
    )
    seen: list[bool] = []

    def ready_went_off() -> bool:
        p = pod(plane, ns, "flip")
        if p["status"].get("phase") == "Running":
            ready = is_ready(p)
            if not seen or seen[-1] != ready:
                seen.append(ready)
        return seen[-2:] == [True, False]

    wait_until(ready_went_off, timeout=40, interval=0.2, what="Ready True then False")
    p = pod(plane, ns, "flip")
    init = p["status"]["initContainerStatuses"][0]["state"]["terminated"]
    assert (init["exitCode"], init["reason"]) == (0, "Completed")
    assert p["status"]["containerStatuses"][0]["restartCount"] == 0
    assert "init said: hi" in kube_node.pod_log(ns, "flip", "main")
    # the host does not see the pod's emptyDir content at the mount point
    assert not Path("/var/lib/patio-kube-test/ready").exists()
    assert not Path("/var/lib/patio-kube-test/from-init").exists()
