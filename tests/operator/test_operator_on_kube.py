"""The operator against a real API server (tests/kube): CRD validation,
rendered manifests, and the operator itself running as a subprocess with the
chart's namespaced RBAC (a ServiceAccount token, not admin).

Workers run as local processes through the test node agent (`patio worker`
from this checkout), so Ready/MeshReady and key rotation are checked with
real workers reporting real fingerprints.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_tools import CHART, ROOT
from kubehelpers import (
    REGISTRY,
    Operator,
    apply_obj,
    cluster_obj,
    condition,
    get,
    install_crd,
    running_operator,
    secret_keys,
    wait_condition,
)
from patio_operator import rotation

from tests.kube.controlplane import ControlPlane
from tests.kube.helpers import wait_until
from tests.kube.nodeagent import NodeAgent

pytestmark = pytest.mark.kube


@pytest.fixture
def crd(kube_control_plane: ControlPlane) -> None:
    # Per test: test_first_helm_install_... deletes the CRD and re-creates it
    # through Helm.
    install_crd(kube_control_plane)


@pytest.fixture
def operator(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    crd: None,
    tmp_path: Path,
) -> Iterator[Operator]:
    with running_operator(
        kube_control_plane,
        kube_namespace,
        tmp_path,
        "--rotation-check",
        "metrics",
        "--rotation-settle-seconds",
        "3",
    ) as op:
        yield op


# -- the CRD ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"replicas": -1}, "spec.replicas"),
        ({"executor": "fork"}, "spec.executor"),
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling.minReplicas"),
        ({"registry": "no-colon"}, "spec.registry"),
        ({"port": 70000}, "spec.port"),
        ({"metrics": {"port": 15383}}, "spec.metrics.port"),
        ({"auth": {"existingSecret": "s", "rotation": "x"}}, "spec.auth.rotation"),
        ({"drainTimeoutSeconds": -5}, "spec.drainTimeoutSeconds"),
    ],
)
def test_invalid_clusters_are_refused_naming_the_field(
    kube_control_plane: ControlPlane,
    kube_namespace: str,
    crd: None,
    spec: dict[str, Any],
    field: str,
) -> None:
    res = apply_obj(kube_control_plane, kube_namespace, cluster_obj("bad", **spec))
    assert res.returncode != 0
    assert field in res.stderr, res.stderr


def test_missing_registry_is_refused(
    kube_control_plane: ControlPlane, kube_namespace: str, crd: None
) -> None:
    obj = cluster_obj("bad")
    del obj["spec"]["registry"]
    res = apply_obj(kube_control_plane, kube_namespace, obj)
    assert res.returncode != 0
    assert "spec.registry: Required value" in res.stderr, res.stderr


def test_defaults_are_filled_and_printer_columns_work(
    kube_control_plane: ControlPlane, kube_namespace: str, crd: None
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    obj = cluster_obj("ok")
    obj["spec"] = {"registry": REGISTRY}
    assert apply_obj(plane, ns, obj).returncode == 0
    spec = get(plane, ns, "ptc", "ok")["spec"]
    assert (spec["replicas"], spec["executor"], spec["port"]) == (3, "async", 15383)
    table = plane.kubectl("get", "-n", ns, "ptc", "ok").stdout
    assert table.split()[:6] == ["NAME", "REPLICAS", "READY", "PEERS", "STATUS", "AGE"]


def test_example_yamls_are_accepted(
    kube_control_plane: ControlPlane, kube_namespace: str, crd: None
) -> None:
    for path in sorted((ROOT / "examples" / "k8s").glob("*.yaml")):
        res = kube_control_plane.kubectl(
            "apply", "--dry-run=server", "-n", kube_namespace, "-f", str(path), check=False
        )
        assert res.returncode == 0, f"{path.name}: {res.stderr}"


def test_rendered_manifests_pass_server_dry_run(
    kube_control_plane: ControlPlane, crd: None
) -> None:
    plane = kube_control_plane
    manifests = ROOT / "manifests"
    plane.kubectl("apply", "-f", str(manifests / "namespace.yaml"))
    try:
        for name in ("crd.yaml", "operator.yaml", "example-patiocluster.yaml"):
            res = plane.kubectl(
                "apply", "--dry-run=server", "-f", str(manifests / name), check=False
            )
            assert res.returncode == 0, f"{name}: {res.stderr}"
        res = plane.kubectl("apply", "--dry-run=server", "-k", str(manifests), check=False)
        assert res.returncode == 0, res.stderr
    finally:
        plane.kubectl("delete", "namespace", "patio-system", "--wait=false", check=False)


# -- the operator -------------------------------------------------------------


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == uid and r.get("controller") for r in refs)


def peers_of(plane: ControlPlane, ns: str, name: str) -> list[str]:
    cm = get(plane, ns, "configmap", f"{name}-peers")
    if not cm:
        return []
    text = cm["data"].get("peers", "")
    return sorted(ln for ln in text.splitlines() if ln and not ln.startswith("#"))


def pod_addresses(plane: ControlPlane, ns: str, name: str) -> list[str]:
    pods = get(plane, ns, "pods", "-l", f"patio.dev/cluster={name}")["items"]
    return sorted(
        f"{p['status']['podIP']}:15383"
        for p in pods
        if p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp")
    )


def test_operator_builds_the_mesh_and_keeps_it_current(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    operator: Operator,
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    assert apply_obj(plane, ns, cluster_obj("mesh")).returncode == 0
    uid = get(plane, ns, "ptc", "mesh")["metadata"]["uid"]

    # Every child exists and is owned by the cluster (cascade deletion).
    for kind, name in [
        ("statefulset", "mesh"),
        ("service", "mesh"),
        ("service", "mesh-mesh"),
        ("secret", "mesh-auth"),
        ("configmap", "mesh-peers"),
        ("poddisruptionbudget", "mesh"),
    ]:
        obj = wait_until(
            lambda k=kind, n=name: get(plane, ns, k, n), timeout=30, what=f"{kind}/{name}"
        )
        assert owned_by(obj, uid), f"{kind}/{name} not owned by the cluster"
    keys = secret_keys(plane, ns, "mesh-auth")
    assert keys is not None and len(keys["key"]) >= 40 and "next-key" not in keys

    # The peers file follows the pods, and real workers become ready on it.
    wait_until(lambda: len(pod_addresses(plane, ns, "mesh")) == 2, timeout=60, what="2 pods")
    wait_until(
        lambda: peers_of(plane, ns, "mesh") == pod_addresses(plane, ns, "mesh"),
        timeout=15,
        what="peers published",
    )
    pc = wait_condition(plane, ns, "mesh", "Ready")
    st = pc["status"]
    assert st["readyReplicas"] == 2 and st["replicas"] == 2 and st["peers"] == 2
    assert st["selector"] == "patio.dev/cluster=mesh"
    assert st["observedGeneration"] == pc["metadata"]["generation"]
    assert st["keyGeneration"] == 1
    wait_until(
        lambda: condition(get(plane, ns, "ptc", "mesh"), "MeshReady").get("status") == "True",
        timeout=30,
        what="MeshReady",
    )
    assert condition(pc, "Degraded")["status"] == "False"

    # A real call through the mesh with the generated key.
    key_file = Path(operator.log.parent / "key")
    key_file.write_text(keys["key"])
    peer = peers_of(plane, ns, "mesh")[0]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "patio",
            "call",
            "--peer",
            peer,
            "--key-file",
            str(key_file),
            "--timeout",
            "10",
            "mul",
            "6",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )
    assert res.returncode == 0 and res.stdout.strip() == "42", res.stdout + res.stderr

    # /scale: kubectl scale on the custom resource.
    plane.kubectl("scale", "-n", ns, "patiocluster/mesh", "--replicas=3")
    wait_until(lambda: get(plane, ns, "sts", "mesh")["spec"]["replicas"] == 3, timeout=30)
    wait_until(lambda: len(peers_of(plane, ns, "mesh")) == 3, timeout=60, what="3 peers")
    wait_until(
        lambda: get(plane, ns, "ptc", "mesh")["status"].get("readyReplicas") == 3,
        timeout=90,
        what="3 ready",
    )
    scale = json.loads(
        plane.kubectl(
            "get", "--raw", f"/apis/patio.dev/v1alpha1/namespaces/{ns}/patioclusters/mesh/scale"
        ).stdout
    )
    assert scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == "patio.dev/cluster=mesh"

    # A killed pod is replaced, and its (new) address published within seconds.
    old_uid = get(plane, ns, "pod", "mesh-1")["metadata"]["uid"]
    plane.kubectl("delete", "pod", "-n", ns, "mesh-1", "--wait=false")

    def replaced() -> bool:
        new = get(plane, ns, "pod", "mesh-1")
        return bool(new and new["metadata"]["uid"] != old_uid and new["status"].get("podIP"))

    wait_until(replaced, timeout=60, what="mesh-1 replaced")
    wait_until(
        lambda: (
            peers_of(plane, ns, "mesh") == pod_addresses(plane, ns, "mesh")
            and len(pod_addresses(plane, ns, "mesh")) == 3
        ),
        timeout=15,
        what="replacement published",
    )
    wait_condition(plane, ns, "mesh", "MeshReady")

    # Drift: a hand-edited StatefulSet is restored.
    plane.kubectl(
        "patch", "-n", ns, "sts/mesh", "--type=merge", "-p", json.dumps({"spec": {"replicas": 1}})
    )
    wait_until(
        lambda: get(plane, ns, "sts", "mesh")["spec"]["replicas"] == 3,
        timeout=30,
        what="StatefulSet restored",
    )

    # Drift: a deleted Secret is re-created, with a new key and generation.
    plane.kubectl("delete", "secret", "-n", ns, "mesh-auth")
    new = wait_until(lambda: secret_keys(plane, ns, "mesh-auth"), timeout=30, what="secret back")
    assert new["key"] != keys["key"]
    wait_until(lambda: get(plane, ns, "ptc", "mesh")["status"]["keyGeneration"] == 2, timeout=30)
    events = plane.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    assert "AuthKeyRegenerated" in events

    metrics = operator.metrics()
    assert 'patio_operator_reconcile_total{result="ok"}' in metrics
    assert "patio_operator_clusters_ready" in metrics


def test_key_rotation_without_losing_the_mesh(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    operator: Operator,
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    apply_obj(plane, ns, cluster_obj("rot"))
    wait_until(
        lambda: condition(get(plane, ns, "ptc", "rot"), "Ready").get("status") == "True",
        timeout=90,
        what="Ready=True",
    )
    old = secret_keys(plane, ns, "rot-auth")
    assert old is not None

    seen: list[tuple[str, str | None]] = []
    apply_obj(plane, ns, cluster_obj("rot", auth={"rotation": "first"}))

    def finished() -> bool:
        keys = secret_keys(plane, ns, "rot-auth") or {}
        state = (keys.get("key", ""), keys.get("next-key"))
        if not seen or seen[-1] != state:
            seen.append(state)
        pc = get(plane, ns, "ptc", "rot")
        return bool(
            pc["status"].get("keyGeneration") == 2 and pc["status"]["rotation"]["phase"] == "Idle"
        )

    wait_until(finished, timeout=120, interval=0.2, what="rotation complete")
    a = old["key"]
    b = seen[-1][0]
    assert b != a
    # The contract's three steps, in order (each seen at least briefly).
    assert seen[0][0] == a  # (a, None), or already step 1 by the first look
    assert (a, b) in seen and (b, a) in seen
    assert seen.index((a, b)) < seen.index((b, a)) < seen.index((b, None))
    # Every worker now presents the new key, and the mesh stayed ready.
    pc = get(plane, ns, "ptc", "rot")
    assert condition(pc, "Ready")["status"] == "True"
    events = plane.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    for reason in (
        "RotationStarted",
        "RotationPresenting",
        "RotationRetiring",
        "RotationCompleted",
    ):
        assert reason in events
    fp = rotation.fingerprint(b)
    for pod in get(plane, ns, "pods", "-l", "patio.dev/cluster=rot")["items"]:
        from patio_operator.keyprobe import fetch_report

        assert fetch_report(pod["status"]["podIP"], 9383) == fp


def test_restarted_operator_resumes_without_duplicates(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    operator: Operator,
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    operator.stop()
    apply_obj(plane, ns, cluster_obj("again"))
    operator.start()
    # Kill it as soon as it has started writing (mid-reconcile), then restart.
    wait_until(lambda: get(plane, ns, "secret", "again-auth"), timeout=30, interval=0.05)
    operator.stop(signal.SIGKILL)
    first = {
        k: get(plane, ns, k, n)
        for k, n in [("secret", "again-auth"), ("sts", "again"), ("configmap", "again-peers")]
    }
    operator.start()
    wait_until(
        lambda: condition(get(plane, ns, "ptc", "again"), "Ready").get("status") == "True",
        timeout=90,
        what="Ready after restart",
    )
    assert len(get(plane, ns, "secrets", "-l", "patio.dev/cluster=again")["items"]) == 1
    assert len(get(plane, ns, "sts", "-l", "patio.dev/cluster=again")["items"]) == 1
    assert len(get(plane, ns, "svc", "-l", "patio.dev/cluster=again")["items"]) == 2
    secret = get(plane, ns, "secret", "again-auth")
    assert secret["metadata"]["uid"] == first["secret"]["metadata"]["uid"]
    assert secret["data"]["key"] == first["secret"]["data"]["key"]
    if first["sts"] is not None:
        assert get(plane, ns, "sts", "again")["metadata"]["uid"] == first["sts"]["metadata"]["uid"]
    assert get(plane, ns, "ptc", "again")["status"]["keyGeneration"] == 1


def test_deleting_the_cluster_cascades(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    operator: Operator,
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    apply_obj(plane, ns, cluster_obj("gone", replicas=1))
    wait_until(lambda: get(plane, ns, "sts", "gone"), timeout=30)
    # No finalizer of ours: deletion never waits for the operator.
    assert not get(plane, ns, "ptc", "gone")["metadata"].get("finalizers")
    plane.kubectl("delete", "ptc", "-n", ns, "gone", "--wait=true", "--timeout=30s")
    wait_until(
        lambda: (
            not get(plane, ns, "secrets", "-l", "patio.dev/cluster=gone")["items"]
            and not get(plane, ns, "sts", "-l", "patio.dev/cluster=gone")["items"]
        ),
        timeout=60,
        what="children garbage-collected",
    )


def test_helm_install_runs_the_operator_in_cluster(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str, crd: None
) -> None:
    """The chart as users install it: the operator runs as a pod with its
    in-cluster ServiceAccount and namespaced Role, and reconciles the
    PatioCluster the same release created."""
    plane, ns = kube_control_plane, kube_namespace
    plane.helm(
        "install", "p", str(CHART), "-n", ns,
        "--set", f"watchNamespace={ns}",
        "--set", "crds.install=false",  # the session's CRD is already there
        "--set", "tests.enabled=false",  # the test pod needs cluster DNS; this node has none
        "--set", "operator.rotation.settleSeconds=2",
        "--set", "cluster.enabled=true", "--set", "cluster.name=demo",
        "--set", f"cluster.spec.registry={REGISTRY}", "--set", "cluster.spec.replicas=2",
        "--set", "cluster.spec.drainTimeoutSeconds=2",
        "--wait", "--timeout", "120s",
    )  # fmt: skip
    try:
        pc = wait_condition(plane, ns, "demo", "Ready", timeout=120)
        assert pc["status"]["readyReplicas"] == 2
        wait_condition(plane, ns, "demo", "MeshReady")
        # The release owns the cluster (no hook: the CRD existed at install).
        assert pc["metadata"]["annotations"]["meta.helm.sh/release-name"] == "p"
        # Two replicas; the active one holds the Lease ("<pod name>_<suffix>").
        holder = get(plane, ns, "lease", "p-patio-operator")["spec"]["holderIdentity"]
        op_pods = get(plane, ns, "pods", "-l", "app.kubernetes.io/component=operator")["items"]
        (op_pod,) = [p for p in op_pods if holder.startswith(p["metadata"]["name"] + "_")]
        assert op_pod["spec"]["serviceAccountName"] == "p-patio-operator"
        # Its metrics on the pod's own address (what the Service would serve).
        import urllib.request

        url = f"http://{op_pod['status']['podIP']}:8000/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        assert "patio_operator_clusters_ready 1.0" in text
        assert "patio_operator_leader 1.0" in text
    finally:
        plane.helm("uninstall", "p", "-n", ns, "--wait", "--timeout", "60s", check=False)
        plane.kubectl("delete", "ptc", "--all", "-n", ns, "--wait=false", check=False)


def test_optional_objects_follow_the_spec(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    operator: Operator,
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    full = cluster_obj(
        "opt", replicas=1,
        networkPolicy={"enabled": True, "clientsFrom": [{"podSelector": {}}]},
        metrics={"serviceMonitor": True},
    )  # fmt: skip
    assert apply_obj(plane, ns, full).returncode == 0
    uid = get(plane, ns, "ptc", "opt")["metadata"]["uid"]
    netpol = wait_until(lambda: get(plane, ns, "networkpolicy", "opt"), timeout=30)
    assert owned_by(netpol, uid)
    # No prometheus-operator here: reported, not fatal.
    degraded = wait_condition(plane, ns, "opt", "Degraded")
    assert "monitoring.coreos.com/v1 is not installed" in condition(degraded, "Degraded")["message"]

    assert apply_obj(plane, ns, cluster_obj("opt", replicas=1)).returncode == 0
    wait_until(
        lambda: get(plane, ns, "networkpolicy", "opt") is None, timeout=30, what="netpol gone"
    )
    wait_condition(plane, ns, "opt", "Degraded", status="False", timeout=30)


def test_spec_change_rolls_out_and_scale_down_drains(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    operator: Operator,
    tmp_path: Path,
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    # A drain long enough for the call below; SIGTERM lands mid-call (after
    # the 3 s preStop pause), so only a real drain lets the call finish.
    apply_obj(plane, ns, cluster_obj("roll", drainTimeoutSeconds=15))
    wait_condition(plane, ns, "roll", "Ready")
    before = {
        p["metadata"]["name"]: p["metadata"]["uid"]
        for p in get(plane, ns, "pods", "-l", "patio.dev/cluster=roll")["items"]
    }

    # A template change (executor) replaces every worker through a rolling update.
    apply_obj(plane, ns, cluster_obj("roll", executor="thread", drainTimeoutSeconds=15))

    def rolled() -> bool:
        pods = get(plane, ns, "pods", "-l", "patio.dev/cluster=roll")["items"]
        return len(pods) == 2 and all(
            p["metadata"]["uid"] != before.get(p["metadata"]["name"])
            and {"name": "PATIO_EXECUTOR", "value": "thread"} in p["spec"]["containers"][0]["env"]
            for p in pods
        )

    wait_until(rolled, timeout=120, what="both workers replaced")
    wait_condition(plane, ns, "roll", "Ready")
    # Ready can come a resync before the StatefulSet's status names the new
    # revision current (Progressing is still RollingUpdate then): the roll
    # must settle, not be settled at the first Ready.
    pc = wait_condition(plane, ns, "roll", "Progressing", "False", timeout=60)
    assert condition(pc, "Ready")["status"] == "True"
    assert pc["status"]["observedGeneration"] == pc["metadata"]["generation"]

    # Scale down while the leaving worker runs a call: the call still completes.
    keys = secret_keys(plane, ns, "roll-auth")
    assert keys is not None
    key_file = tmp_path / "key"
    key_file.write_text(keys["key"])
    leaving = get(plane, ns, "pod", "roll-1")["status"]["podIP"]
    call = subprocess.Popen(
        [sys.executable, "-m", "patio", "call", "--peer", f"{leaving}:15383",
         "--key-file", str(key_file), "--timeout", "30", "sleep", "6"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # let the call reach the worker before SIGTERM
        plane.kubectl("scale", "-n", ns, "ptc/roll", "--replicas=1")

        def terminating() -> bool:
            pod = get(plane, ns, "pod", "roll-1")
            return pod is None or bool(pod["metadata"].get("deletionTimestamp"))

        wait_until(terminating, timeout=5, interval=0.1, what="roll-1 terminating")
        assert call.poll() is None  # the call is still running on a terminating worker
        out, err = call.communicate(timeout=40)
    finally:
        if call.poll() is None:
            call.kill()
            call.wait()
    assert call.returncode == 0 and out.strip() in ("6", "6.0"), out + err
    wait_until(
        lambda: (
            peers_of(plane, ns, "roll") == pod_addresses(plane, ns, "roll")
            and len(peers_of(plane, ns, "roll")) == 1
        ),
        timeout=60,
        what="1 peer left",
    )


def test_first_helm_install_creates_crd_and_cluster_then_upgrade_adopts_it(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str
) -> None:
    """On a cluster without the CRD, one `helm install` creates the CRD, the
    operator and the PatioCluster (as a post-install hook, since Helm cannot
    map the kind before its CRD exists); `helm upgrade` then adopts the
    cluster as a release object without re-creating it, and `helm uninstall`
    deletes the cluster but keeps the CRD."""
    plane, ns = kube_control_plane, kube_namespace
    plane.kubectl("delete", "crd", "patioclusters.patio.dev", "--ignore-not-found", "--wait=true")
    values = [
        "--set", f"watchNamespace={ns}", "--set", "tests.enabled=false",
        "--set", "cluster.enabled=true", "--set", "cluster.name=first",
        "--set", f"cluster.spec.registry={REGISTRY}", "--set", "cluster.spec.replicas=1",
        "--set", "cluster.spec.drainTimeoutSeconds=2",
    ]  # fmt: skip
    try:
        plane.helm("install", "p", str(CHART), "-n", ns, *values, "--wait", "--timeout", "120s")
        pc = get(plane, ns, "ptc", "first")
        assert pc["metadata"]["annotations"]["helm.sh/hook"] == "post-install"
        uid = pc["metadata"]["uid"]
        wait_condition(plane, ns, "first", "Ready", timeout=120)

        plane.helm("upgrade", "p", str(CHART), "-n", ns, *values, "--wait", "--timeout", "120s")
        manifest = plane.helm("get", "manifest", "p", "-n", ns).stdout
        assert "kind: PatioCluster" in manifest
        assert get(plane, ns, "ptc", "first")["metadata"]["uid"] == uid  # adopted, not replaced

        plane.helm("uninstall", "p", "-n", ns, "--wait", "--timeout", "60s")
        wait_until(lambda: get(plane, ns, "ptc", "first") is None, timeout=60, what="cluster gone")
        crd = plane.kubectl_json("get", "crd", "patioclusters.patio.dev")
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    finally:
        plane.helm("uninstall", "p", "-n", ns, "--wait", "--timeout", "60s", check=False)
        plane.kubectl("delete", "ptc", "--all", "-n", ns, "--wait=false", check=False)


def test_user_secrets_for_key_and_mutual_tls(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    operator: Operator,
) -> None:
    """auth.existingSecret and tls.existingSecret: the operator mounts the
    user's Secrets, never generates or writes one, and reports them missing."""
    import trustme

    plane, ns = kube_control_plane, kube_namespace
    spec = {"auth": {"existingSecret": "my-key"}, "tls": {"existingSecret": "my-tls"}}
    apply_obj(plane, ns, cluster_obj("tls", **spec))
    degraded = wait_condition(plane, ns, "tls", "Degraded", timeout=30)
    message = condition(degraded, "Degraded")["message"]
    assert "spec.auth.existingSecret 'my-key' not found" in message
    assert "spec.tls.existingSecret 'my-tls' not found" in message

    ca = trustme.CA()
    cert = ca.issue_cert("patio-mesh")
    secrets = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "my-key"},
         "stringData": {"key": "a-key-the-user-manages-0123456789"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "my-tls"},
         "type": "kubernetes.io/tls",
         "stringData": {
             "tls.crt": cert.cert_chain_pems[0].bytes().decode(),
             "tls.key": cert.private_key_pem.bytes().decode(),
             "ca.crt": ca.cert_pem.bytes().decode(),
         }},
    ]  # fmt: skip
    for s in secrets:
        assert apply_obj(plane, ns, s).returncode == 0
    # Not labelled for patio: refused, and no worker mounts them.
    wait_until(
        lambda: (
            "is not labelled for patio"
            in condition(get(plane, ns, "ptc", "tls"), "Degraded").get("message", "")
        ),
        timeout=30,
        what="unlabelled Secrets refused",
    )
    assert get(plane, ns, "statefulset", "tls") is None
    for s in secrets:
        plane.kubectl(
            "label", "secret", "-n", ns, s["metadata"]["name"], "patio.dev/mountable=true"
        )
    pc = wait_condition(plane, ns, "tls", "Ready", timeout=120)
    wait_condition(plane, ns, "tls", "MeshReady")
    wait_condition(plane, ns, "tls", "Degraded", status="False", timeout=30)
    assert pc["status"]["keyGeneration"] == 0  # the user's key: nothing counted
    assert get(plane, ns, "secret", "tls-auth") is None  # nothing generated
    log = kube_node.pod_log(ns, "tls-0", "worker")
    assert "plaintext" not in log, log
    fp = rotation.fingerprint("a-key-the-user-manages-0123456789")
    from patio_operator.keyprobe import fetch_report

    assert fetch_report(get(plane, ns, "pod", "tls-0")["status"]["podIP"], 9383) == fp


def test_privileged_template_is_refused_naming_the_field(
    kube_control_plane: ControlPlane, kube_namespace: str, operator: Operator
) -> None:
    """Issue 16 item 9: a hostPath volume became a StatefulSet as written. The
    operator (with the chart's RBAC) now refuses it with a condition naming
    the field and writes no StatefulSet until the spec is fixed."""
    plane, ns = kube_control_plane, kube_namespace
    spec = {"podTemplate": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}
    apply_obj(plane, ns, cluster_obj("priv", **spec))
    degraded = wait_condition(plane, ns, "priv", "Degraded", timeout=30)
    assert "spec.podTemplate.volumes[0].hostPath" in condition(degraded, "Degraded")["message"]
    assert get(plane, ns, "statefulset", "priv") is None
    assert get(plane, ns, "service", "priv") is not None  # the harmless children are there
    plane.kubectl("patch", "ptc", "priv", "-n", ns, "--type=json",
                  "-p", '[{"op": "remove", "path": "/spec/podTemplate"}]')  # fmt: skip
    wait_until(lambda: get(plane, ns, "statefulset", "priv"), timeout=30, what="StatefulSet")


def test_rotation_resumes_after_an_operator_crash(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    operator: Operator,
) -> None:
    """SIGKILL the operator in the middle of a rotation: the restarted one
    finishes the same rotation with the same new key (the state is in the
    Secret, not in the dead process)."""
    plane, ns = kube_control_plane, kube_namespace
    apply_obj(plane, ns, cluster_obj("crash"))
    wait_condition(plane, ns, "crash", "Ready")
    old = secret_keys(plane, ns, "crash-auth")
    assert old is not None
    apply_obj(plane, ns, cluster_obj("crash", auth={"rotation": "r1"}))

    def step_one() -> dict[str, str] | None:
        keys = secret_keys(plane, ns, "crash-auth")
        return keys if keys and "next-key" in keys else None

    step1 = wait_until(step_one, timeout=30, interval=0.1, what="step 1 written")
    operator.stop(signal.SIGKILL)
    new_key = step1["next-key"] if step1["key"] == old["key"] else step1["key"]
    time.sleep(4)  # past the settle time: the dead operator would have moved on
    assert secret_keys(plane, ns, "crash-auth") == step1  # nobody advanced it
    operator.start()

    def done() -> dict[str, Any] | None:
        pc = get(plane, ns, "ptc", "crash")
        st = pc["status"]
        return pc if st.get("keyGeneration") == 2 and st["rotation"]["phase"] == "Idle" else None

    wait_until(done, timeout=90, what="rotation finished after restart")
    assert secret_keys(plane, ns, "crash-auth") == {"key": new_key}
    wait_condition(plane, ns, "crash", "Ready")
