"""The user's whole journey on the real test control plane, under load (issue #8).

One module, steps in order, sharing module-scoped state:

1. ``helm install`` charts/patio; the operator runs as the chart's
   Deployment, two replicas (run by the test node agent) of which the
   holder of the chart's leader Lease works, each under the chart's own
   ServiceAccount and RBAC, with the in-cluster token the API server
   issues for its pod -- not as admin.
2. ``kubectl apply`` examples/k8s/journey-cluster.yaml: the workers form a
   full mesh, the status shows Ready and the peer count, and ``patio call``
   with the key from the Secret returns correct results.
3. Under a steady call load: ``kubectl scale`` to 5, then back to 2.
4. Under load: a spec change (``maxWorkers``) rolls every pod.
5. Under load: a key rotation (``spec.auth.rotation``); then the old key is
   refused.
6. Under load: SIGKILL of a worker process; the container is restarted and
   rejoins; retryable calls all succeed, others fail only with
   ``PeerConnectionError``.
7. A real Prometheus scrapes the workers and both operator replicas; a
   PromQL query returns exactly the number of calls the load made; only the
   leader reports itself leading and counts the clusters.
8. ``helm uninstall`` and deleting the PatioCluster leave no object (the
   leader Lease included) and no process behind.

Timings and load outcome counts are printed (``pytest -s``) and recorded in
docs/e2e.md.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests import observability
from tests.e2e.journey import (
    CHART,
    CLUSTER,
    MESH_PORT,
    OPERATOR,
    OPERATOR_SELECTOR,
    RELEASE,
    REPO_ROOT,
    Journey,
    Prometheus,
    Syncer,
    World,
    hosts_up,
    is_ready,
    kill_a_worker_under_load,
    patio_call,
    pid_alive,
    processes_with_env,
    rest_client,
    rotate_key_under_load,
    scale_under_load,
    wait_until,
)
from tests.kube.controlplane import ControlPlane
from tests.kube.nodeagent import NodeAgent

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

CLUSTER_YAML = REPO_ROOT / "examples" / "k8s" / "journey-cluster.yaml"
SETTLE_SECONDS = 5

JOURNEY = Journey()


@pytest.fixture(scope="module")
def world(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
) -> Iterator[World]:
    plane = kube_control_plane
    ns = f"e2e-journey-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", ns)
    rest = rest_client(plane)
    wait_until(
        lambda: rest.get_or_none(f"/api/v1/namespaces/{ns}/serviceaccounts/default"),
        30,
        "the default ServiceAccount",
    )
    rest.close()
    # In the plane's work folder: kept with its logs after a failing session.
    workdir = plane.workdir / f"e2e-{ns}"
    workdir.mkdir()
    w = World(plane, kube_node, ns, workdir, JOURNEY)
    try:
        yield w
    finally:
        w.close()
        # Whatever a failed step left: the release, the cluster, the namespace.
        plane.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "60s", check=False)
        plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        rest = rest_client(plane)
        try:
            wait_until(
                lambda: not rest.get(f"/api/v1/namespaces/{ns}/pods").get("items"),
                90,
                f"the pods of {ns} to be gone",
            )
        finally:
            rest.close()
            plane.kubectl("delete", "crd", "patioclusters.patio.dev", "--wait=false", check=False)
        print(JOURNEY.report())


@pytest.fixture(autouse=True)
def _in_order(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from JOURNEY.in_order(request)


# --- 1 ------------------------------------------------------------------------


def test_1_helm_install_operator_with_its_own_service_account(world: World) -> None:
    w = world
    started = time.monotonic()
    w.plane.helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        w.ns,
        "--set",
        f"metrics.port={w.metrics_port}",
        "--set",
        f"health.port={w.health_port}",
        "--set",
        f"operator.rotation.settleSeconds={SETTLE_SECONDS}",
        "--set",
        "operator.resyncSeconds=10",
        "--wait",
        "--timeout",
        "120s",
    )
    selector = OPERATOR_SELECTOR
    deployment = w.plane.kubectl_json("get", "deployment", "-n", w.ns, OPERATOR)
    replicas = deployment["spec"]["replicas"]
    assert replicas == 2  # the chart's default: one leader, one standby
    pods = wait_until(
        lambda: (
            (ready := [p for p in w.operator_pods() if is_ready(p)])
            and len(ready) == replicas
            and ready
        ),
        60,
        f"{replicas} Ready operator pods",
    )
    names = sorted(p["metadata"]["name"] for p in pods)
    leader = wait_until(w.leader, 30, "an operator replica to hold the leader Lease")
    JOURNEY.record("1 helm install, operator pods Ready, one leads", started)
    assert leader in names, (leader, names)
    JOURNEY.notes["operator leader"] = f"{leader} of {names}"
    sa = f"system:serviceaccount:{w.ns}:{OPERATOR}"
    # (/var/run is a symlink to /run: resolve it on this side.)
    mount = Path("/var/run/secrets/kubernetes.io/serviceaccount").resolve()
    for pod in pods:
        name = pod["metadata"]["name"]
        assert pod["spec"]["serviceAccountName"] == OPERATOR
        # Each operator process is its pod's container, run by the node agent;
        # it authenticates with the token projected into the pod (no kubeconfig).
        pid = w.node.pids(w.ns, name)["operator"]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [e for e in environ if e.startswith(b"KUBECONFIG=")], name
        assert b"KUBERNETES_SERVICE_HOST=127.0.0.1" in environ, name
        # The token it sees (through its own mount namespace) is the pod's
        # ServiceAccount token, bound to this pod.
        token = Path(f"/proc/{pid}/root{mount}/token")
        payload = token.read_text().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["sub"] == sa, claims
        assert claims["kubernetes.io"]["pod"]["name"] == name, claims
    # The Lease is the chart's; the operator may renew that one Lease only.
    lease_rights = {
        verb: w.kubectl("auth", "can-i", verb, res, "--as", sa, check=False).stdout.strip()
        for verb, res in (
            ("update", f"leases.coordination.k8s.io/{OPERATOR}"),
            ("create", "leases.coordination.k8s.io"),
            ("delete", f"leases.coordination.k8s.io/{OPERATOR}"),
        )
    }
    assert lease_rights == {"update": "yes", "create": "no", "delete": "no"}, lease_rights
    can = {
        (verb, res): w.plane.kubectl(
            "auth", "can-i", verb, res, "--as", sa, check=False
        ).stdout.strip()
        for verb, res in (
            ("watch", "patioclusters.patio.dev"),
            ("create", "statefulsets.apps"),
            ("delete", "patioclusters.patio.dev"),
            ("create", "pods"),
            ("delete", "namespaces"),
            ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        )
    }
    assert can == {
        ("watch", "patioclusters.patio.dev"): "yes",
        ("create", "statefulsets.apps"): "yes",
        ("delete", "patioclusters.patio.dev"): "no",
        ("create", "pods"): "no",
        ("delete", "namespaces"): "no",
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"): "no",
    }, can
    w.syncer = Syncer(w.plane, w.ns, CLUSTER, w.load.dir, w.sd_dir, selector, w.metrics_port)
    w.syncer.start()


# --- 2 ------------------------------------------------------------------------


def test_2_cluster_from_example_forms_a_mesh_and_answers(world: World) -> None:
    w = world
    started = time.monotonic()
    w.kubectl("apply", "-f", str(CLUSTER_YAML))
    w.wait_settled(2, timeout=120)
    JOURNEY.record("2 apply PatioCluster -> Ready full mesh of 2", started)
    st = w.status()
    assert st["peers"] == 2 and st["readyReplicas"] == 2
    printed = w.kubectl("get", "ptc", CLUSTER).stdout  # the CRD's short name
    print(printed)
    assert "AllWorkersReady" in printed

    key_file = w.workdir / "key-from-secret"
    key_file.write_text(w.secret()["key"])
    for pod in w.pods():
        peer = f"{pod['status']['podIP']}:{MESH_PORT}"
        mul = patio_call(peer, key_file, "mul", "6", "7")
        assert (mul.returncode, mul.stdout.strip()) == (0, "42"), mul.stderr
        slept = patio_call(peer, key_file, "sleep", "0.1")
        assert (slept.returncode, slept.stdout.strip()) == (0, "0.1"), slept.stderr
    missing = patio_call(peer, key_file, "no-such-task")
    assert missing.returncode == 1 and "NoRouteError" in missing.stderr, missing.stderr


# --- 3 ------------------------------------------------------------------------


def test_3_scale_up_and_down_under_load(world: World) -> None:
    scale_under_load(
        world,
        [
            (5, "3a scale 2 -> 5 (status, peers, full mesh)", "3a"),
            (2, "3b scale 5 -> 2 (status, peers, full mesh)", "3b"),
        ],
    )


# --- 4 ------------------------------------------------------------------------


def test_4_spec_change_rolls_pods_under_load(world: World) -> None:
    w = world
    w.load.set_phase("roll")
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in w.pods()}
    started = time.monotonic()
    w.kubectl("patch", "patiocluster", CLUSTER, "--type=merge", "-p", '{"spec":{"maxWorkers":48}}')

    def rolled() -> bool:
        pods = w.pods()
        env_ok = all(
            {"name": "PATIO_MAX_WORKERS", "value": "48"} in p["spec"]["containers"][0]["env"]
            for p in pods
        )
        new = all(before.get(p["metadata"]["name"]) != p["metadata"]["uid"] for p in pods)
        return env_ok and new and len(pods) == 2

    wait_until(rolled, 120, "every pod replaced with maxWorkers=48")
    w.wait_settled(2)
    JOURNEY.record("4 maxWorkers change rolls 2 pods", started)
    sts = w.plane.kubectl_json("get", "statefulset", "-n", w.ns, CLUSTER)
    assert sts["status"]["currentRevision"] == sts["status"]["updateRevision"]
    w.load.wait_calls("roll", w.load.ok_count("roll") + 200)
    JOURNEY.end_phase(w, "roll")


# --- 5 ------------------------------------------------------------------------


def test_5_key_rotation_under_load_then_old_key_refused(world: World) -> None:
    w = world
    rotation = rotate_key_under_load(
        w, "e2e-1", "5 key rotation (3 steps, settle 5 s)", timeout=150, refused_within=30
    )
    assert not rotation.secret.get("next-key")
    new_file = w.workdir / "new-key"
    new_file.write_text(rotation.secret["key"])
    ok = patio_call(rotation.peer, new_file, "mul", "2", "3")
    assert (ok.returncode, ok.stdout.strip()) == (0, "6"), ok.stderr
    JOURNEY.end_phase(w, "rotate")


# --- 6 ------------------------------------------------------------------------


def test_6_sigkill_a_worker_under_load(world: World) -> None:
    w = world

    def worker_pid(pod: str) -> int:
        pid = w.node.pids(w.ns, pod)["worker"]
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"worker" in cmd, cmd
        return pid

    kill = kill_a_worker_under_load(
        w, "6 SIGKILL worker -> restarted, mesh full again", worker_pid, restarted_within=60
    )
    assert w.node.pids(w.ns, kill.victim)["worker"] != kill.pid
    # Only plain calls fail, and only with the documented connection error:
    # "connection to <node> lost" when the caller's own link to the killed
    # worker dropped, or the bare reason (e.g. "closed by peer") when the
    # call had been forwarded by the other worker (see docs/e2e.md).
    for e in kill.errors:
        assert e["kind"] == "plain" and e["error"].startswith("PeerConnectionError: "), e
    messages = sorted({e["error"] for e in kill.errors})
    failed = kill.plain_failures.get("PeerConnectionError", 0)
    JOURNEY.notes["SIGKILL"] = (
        f"{kill.retried} retryable calls re-sent (all succeeded), {failed} plain calls failed: "
        f"{messages}"
    )
    assert kill.retried + failed > 0, "the killed worker held no call: the kill proved nothing"


# --- 7 ------------------------------------------------------------------------


def test_7_prometheus_counts_the_calls(world: World) -> None:
    w = world
    started = time.monotonic()
    w.prometheus = prom = Prometheus(w.workdir / "prometheus", w.sd_dir)
    prom.start()
    expected_targets = {p["status"]["podIP"] for p in w.pods()}
    expected_operators = {p["status"]["podIP"] for p in w.operator_pods()}
    assert len(expected_operators) == 2

    def all_up() -> bool:
        up = hosts_up(prom)
        return (
            up.get("patio-workers") == expected_targets
            and up.get("patio-operator") == expected_operators
        )

    wait_until(all_up, 60, "Prometheus scraping 2 workers and both operator replicas")
    JOURNEY.record("7a Prometheus up, all targets healthy", started)

    # A call from outside the mesh may be forwarded one hop: the member that
    # forwards it counts it under side="forwarder", the one that runs it
    # under side="executor", so the executor side counts every call once.
    query = 'sum(patio_calls_finished_total{side="executor"})'
    forwarded = 'sum(patio_calls_finished_total{side="forwarder"}) or vector(0)'
    per_pod = 'sum by (pod) (patio_calls_finished_total{side="executor"})'

    def scraped_since(moment: float) -> bool:
        """Every target scraped successfully after ``moment``."""
        targets = prom.targets()
        for t in targets:
            last = t.get("lastScrape", "")
            if t.get("health") != "up" or not last or last.startswith("0001"):
                return False
            if datetime.fromisoformat(last.replace("Z", "+00:00")).timestamp() < moment + 0.05:
                return False
        return len(targets) == 4  # 2 workers, 2 operator replicas

    def values() -> tuple[float | None, float | None, dict[str, str]]:
        pods = {r["metric"]["pod"]: r["value"][1] for r in prom.query(per_pod)}
        return prom.scalar(query), prom.scalar(forwarded), pods

    w.load.pause()
    paused_at = time.time()
    wait_until(lambda: scraped_since(paused_at), 30, "a scrape of every target after the pause")
    baseline, forwarded_before, pods_before = values()
    assert baseline is not None and forwarded_before is not None

    # The calls made between the steps' observation windows did not fail either.
    JOURNEY.assert_no_failures(w, "between")
    w.load.set_phase("prom")
    w.load.wait_calls("prom", 500)
    stats = w.load.pause()
    paused_at = time.time()
    made = sum(sum(outcomes.values()) for outcomes in stats["phases"]["prom"].values())
    ok = sum(o.get("ok", 0) for o in stats["phases"]["prom"].values())
    assert made == ok, stats["phases"]["prom"]
    JOURNEY.record_load(w, "prom")
    started = time.monotonic()
    seen: list[tuple[float | None, float | None, dict[str, str]]] = []

    def counted() -> bool:
        if not scraped_since(paused_at):
            return False
        seen.append(values())
        del seen[:-1]
        return seen[-1][0] == baseline + made

    try:
        wait_until(counted, 15, f"{query} to grow by the {made} calls made (from {baseline})")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; before: {pods_before}; last: {seen[-1] if seen else None}; "
            f"targets: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in prom.targets()]}"
        ) from None
    JOURNEY.record("7b PromQL sees every call of the load", started)
    forwarded_now = seen[-1][1]
    assert forwarded_now is not None
    JOURNEY.notes["PromQL"] = (
        f"{query}: {baseline:.0f} -> {baseline + made:.0f} (+{made} = the calls made; "
        f"{forwarded_now - forwarded_before:.0f} of them forwarded by the member dialled)"
    )
    print(f"[e2e] calls executed by pod: before {pods_before}, after {seen[-1][2]}")
    assert len(seen[-1][2]) == 2
    reconciles = prom.scalar('sum(patio_operator_reconcile_total{result="ok"})')
    assert reconciles is not None and reconciles > 0
    assert prom.scalar('sum(up{job="patio-workers"})') == 2
    # One replica leads, the one holding the Lease; only it counts the clusters.
    leader = w.leader()
    leading = {r["metric"]["pod"]: r["value"][1] for r in prom.query("patio_operator_leader")}
    assert leading == {p["metadata"]["name"]: "1" if p["metadata"]["name"] == leader else "0"
                       for p in w.operator_pods()}, (leader, leading)  # fmt: skip
    assert prom.scalar(f'patio_operator_clusters_ready{{pod="{leader}"}}') == 1
    # Neither replica hit its RBAC's limits on the way.
    for pod in w.operator_pods():
        operator_log = w.node.pod_log(w.ns, pod["metadata"]["name"])
        assert "Forbidden" not in operator_log and " 403" not in operator_log, (
            pod["metadata"]["name"],
            operator_log[-3000:],
        )
    # A full mesh: every worker is connected to the other one (the load's
    # client connection, when up, counts as a peer too).
    connected = {r["metric"]["pod"]: r["value"][1] for r in prom.query("patio_peers_connected")}
    print(f"[e2e] patio_peers_connected by pod: {connected}")
    least = prom.scalar("min(patio_peers_connected)")
    assert least is not None and least >= 1, connected
    # 7c: the chart's operator dashboard and operator alerts read series the
    # real operator exports (the worker ones: tests/operator/test_observability.py).
    started = time.monotonic()
    queries = [q for q in observability.all_queries(w.plane.binaries.helm) if q.operator]
    variables = {"namespace": w.ns, "__rate_interval": "1m"}
    found = observability.problems(prom.query, queries, variables)
    assert not found, "\n".join(found)
    JOURNEY.record("7c operator dashboard queries and alerts return data", started)
    print(f"[e2e] {len(queries)} operator queries checked")


# --- 8 ------------------------------------------------------------------------


def test_8_uninstall_and_delete_leave_nothing(world: World) -> None:
    w = world
    started = time.monotonic()
    tracked = [p.proc.pid for p in (w.load, w.prometheus) if p is not None and p.proc is not None]
    w.load.stop()
    if "kill" in JOURNEY.loads:
        JOURNEY.loads["total"] = {
            kind: {
                "ok": sum(ph.get(kind, {}).get("ok", 0) for ph in w.load.stats()["phases"].values())
            }
            for kind in ("plain", "retryable")
        }
    if w.prometheus is not None:
        w.prometheus.stop()
    if w.syncer is not None:
        w.syncer.stop()
        w.syncer = None

    w.plane.helm("uninstall", RELEASE, "-n", w.ns, "--wait", "--timeout", "120s")
    w.kubectl(
        "delete", "patiocluster", CLUSTER, "--ignore-not-found", "--wait=true", "--timeout=120s"
    )

    kinds = [
        k
        for k in w.plane.kubectl(
            "api-resources", "--namespaced=true", "--verbs=list", "-o", "name"
        ).stdout.split()
        if k not in ("events", "events.events.k8s.io")
    ]
    allowed = {"configmap/kube-root-ca.crt", "serviceaccount/default"}

    def leftovers() -> list[str]:
        out = w.kubectl("get", ",".join(kinds), "-o", "name").stdout.split()
        return sorted(set(out) - allowed)

    last: list[list[str]] = []

    def nothing_left() -> bool:
        last[:] = [leftovers()]
        return not last[0]

    try:
        wait_until(nothing_left, 120, "every object of the journey to be gone")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left: {last[0] if last else None}") from None
    for kind, name in (
        ("clusterrole", OPERATOR),
        ("clusterrolebinding", OPERATOR),
    ):
        got = w.plane.kubectl("get", kind, name, check=False)
        assert got.returncode != 0 and "NotFound" in got.stderr, (kind, name, got.stdout)
    # The CRD stays on purpose (helm.sh/resource-policy: keep): uninstalling a
    # release must not delete every PatioCluster of the cluster.
    crd = w.plane.kubectl("get", "crd", "patioclusters.patio.dev", check=False)
    assert crd.returncode == 0
    assert w.plane.kubectl_json("get", "patioclusters", "-A")["items"] == []

    wait_until(
        lambda: not processes_with_env(f"POD_NAMESPACE={w.ns}"),
        60,
        "every pod process of the namespace to exit",
    )
    assert not [run for run in list(w.node.pods.values()) if run.namespace == w.ns]
    assert not [pid for pid in tracked if pid_alive(pid)]
    assert w.rest.get_or_none(f"/apis/apps/v1/namespaces/{w.ns}/statefulsets/{CLUSTER}") is None
    JOURNEY.record("8 helm uninstall + delete PatioCluster -> nothing left", started)
