"""Helm against the real API server, and RBAC that really refuses."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.kube.controlplane import ControlPlane
from tests.kube.helpers import apply, is_ready, pods, wait_until
from tests.kube.nodeagent import NodeAgent

pytestmark = pytest.mark.kube

CHART = Path(__file__).parent / "charts" / "minimal"


def test_helm_install_and_uninstall(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    plane.helm(
        "install", "demo", str(CHART), "-n", ns, "--set", "replicas=2", "--wait", "--timeout", "90s"
    )
    releases = json.loads(plane.helm("list", "-n", ns, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]

    cm = plane.kubectl_json("get", "configmap", "-n", ns, "demo-config")
    # helm read the server's version from /version
    assert cm["data"] == {"greeting": "hello", "kubeVersion": "v1.36.3"}
    web = pods(plane, ns, "app.kubernetes.io/instance=demo")
    assert len(web) == 2 and all(is_ready(p) for p in web)
    with urllib.request.urlopen(f"http://{web[0]['status']['podIP']}:8080/", timeout=5) as r:
        assert r.status == 200

    plane.helm("uninstall", "demo", "-n", ns, "--wait", "--timeout", "60s")
    assert json.loads(plane.helm("list", "-n", ns, "-o", "json").stdout) == []
    assert plane.kubectl("get", "configmap", "-n", ns, "demo-config", check=False).returncode != 0
    wait_until(lambda: not pods(plane, ns), timeout=60, what="chart pods gone")


def reader_role(ns: str, subject: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader", "namespace": ns},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "pod-reader", "namespace": ns},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [subject],
        },
    ]


def test_rbac_client_certificate_user(
    kube_control_plane: ControlPlane, kube_namespace: str
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    plane, ns = kube_control_plane, kube_namespace
    kubeconfig = plane.user_kubeconfig("alice", groups=["patio-testers"])
    api = client.CoreV1Api(plane.new_api_client(kubeconfig))

    with pytest.raises(ApiException) as denied:
        api.list_namespaced_pod(ns)
    assert denied.value.status == 403
    message = json.loads(denied.value.body or "{}")["message"]
    assert 'User "alice" cannot list resource "pods"' in message

    apply(
        plane,
        ns,
        *reader_role(
            ns, {"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}
        ),
    )
    wait_until(lambda: _can_list(api, ns), timeout=10, what="RoleBinding effective")
    # still refused outside what the Role grants
    with pytest.raises(ApiException) as still:
        api.list_namespaced_secret(ns)
    assert still.value.status == 403
    with pytest.raises(ApiException) as other_ns:
        api.list_namespaced_pod("default")
    assert other_ns.value.status == 403


def _can_list(api: Any, ns: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        api.list_namespaced_pod(ns)
    except ApiException as exc:
        if exc.status == 403:
            return False
        raise
    return True


def test_rbac_service_account_token(kube_control_plane: ControlPlane, kube_namespace: str) -> None:
    plane, ns = kube_control_plane, kube_namespace
    plane.kubectl("create", "serviceaccount", "-n", ns, "robot")
    token = plane.kubectl("create", "token", "-n", ns, "robot", "--duration=10m").stdout.strip()
    kubeconfig = plane.token_kubeconfig(token, f"robot-{ns}")

    denied = plane.kubectl("get", "pods", "-n", ns, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f"system:serviceaccount:{ns}:robot" in denied.stderr

    apply(plane, ns, *reader_role(ns, {"kind": "ServiceAccount", "name": "robot", "namespace": ns}))
    wait_until(
        lambda: (
            plane.kubectl("get", "pods", "-n", ns, kubeconfig=kubeconfig, check=False).returncode
            == 0
        ),
        timeout=10,
    )
    whoami = plane.kubectl_json("auth", "whoami")  # admin
    assert "system:masters" in whoami["status"]["userInfo"]["groups"]


IN_CLUSTER = """
from kubernetes import client, config
config.load_incluster_config()
ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
names = [p.metadata.name for p in client.CoreV1Api().list_namespaced_pod(ns).items]
print("PODS", sorted(names), flush=True)
try:
    client.CoreV1Api().list_namespaced_secret(ns)
except client.exceptions.ApiException as exc:
    print("SECRETS", exc.status, flush=True)
"""


def test_pod_uses_its_service_account_in_cluster(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    """A pod gets its ServiceAccount's token, the CA and its namespace at the
    usual path and KUBERNETES_SERVICE_HOST/PORT: in-cluster config works, with
    exactly the rights its Role grants (the way the operator will run)."""
    plane, ns = kube_control_plane, kube_namespace
    plane.kubectl("create", "serviceaccount", "-n", ns, "robot")
    apply(plane, ns, *reader_role(ns, {"kind": "ServiceAccount", "name": "robot", "namespace": ns}))
    apply(
        plane,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "incluster"},
            "spec": {
                "serviceAccountName": "robot",
                "restartPolicy": "Never",
                "containers": [
                    {"name": "c", "image": "x", "command": ["python", "-c", IN_CLUSTER]}
                ],
            },
        },
    )
    done = wait_until(
        lambda: (
            (p := plane.kubectl_json("get", "pod", "-n", ns, "incluster"))["status"].get("phase")
            in ("Succeeded", "Failed")
            and p
        ),
        timeout=60,
        what="in-cluster pod finished",
    )
    log = kube_node.pod_log(ns, "incluster")
    assert done["status"]["phase"] == "Succeeded", log
    assert "PODS ['incluster']" in log
    assert "SECRETS 403" in log
