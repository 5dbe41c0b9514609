"""The user's journey on the real node: the built image in containers (issue 17).

Steps in order, sharing one module-scoped world (that of tests/e2e, whose
shared steps are in tests/e2e/journey.py; but nothing here runs as a
process of this checkout: the operator, the workers, the ``helm test`` pod
and the client pod are containers of the image built from ./Dockerfile):

1. ``helm install`` with ``image: patio:dev``; the operator container runs
   as uid 10001.
2. A PatioCluster of 3 forms its full mesh (peers from the operator's peers
   file and from the headless Service's DNS records, which CoreDNS serves);
   calls through the client Service's ClusterIP from the host and, by DNS
   name, from a client pod.
3. ``helm test`` passes (its pod reaches the operator's Service by name).
4. Under load: scale 3 -> 5 -> 2, no failed call.
5. Under load: SIGKILL of a worker container's process; the container
   restarts; retryable calls all succeed.
6. Under load: key rotation, no failed call; the old key is refused.
7. A real Prometheus scrapes the pods' addresses and counts every call.
8. ``helm uninstall`` and deleting the PatioCluster leave no object, pod
   sandbox or container.

Step timings are printed (``pytest -s``) and recorded in docs/e2e.md.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.journey import (
    CHART,
    CLUSTER,
    MESH_PORT,
    OPERATOR_SELECTOR,
    RELEASE,
    Journey,
    Prometheus,
    Syncer,
    World,
    hosts_up,
    is_ready,
    kill_a_worker_under_load,
    patio_call,
    rotate_key_under_load,
    scale_under_load,
    wait_until,
)

from .node import client_pod
from .plugin import RealCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JOURNEY = Journey(tag="realnode journey")


class RealWorld(World):
    """The e2e World on the real node (no node agent: containers instead)."""

    def __init__(self, cluster: RealCluster, ns: str, workdir: Path) -> None:
        super().__init__(cluster.plane, None, ns, workdir, JOURNEY)
        self.real = cluster
        self.metrics_port = 8000  # the chart's defaults: each pod has its own address
        self.health_port = 8080
        self.key_file = workdir / "key"

    def container_pid(self, pod: str, container: str) -> int:
        """Host pid of a running container's process (crictl inspect)."""
        ids = self.real.node.crictl(
            "ps",
            "-q",
            "--state",
            "running",
            "--namespace",
            self.ns,
            "--pod",
            self.pod_id(pod),
            "--name",
            f"^{container}$",
        ).split()
        assert len(ids) == 1, (pod, container, ids)
        info: dict[str, Any] = json.loads(self.real.node.crictl("inspect", ids[0]))
        return int(info["info"]["pid"])

    def pod_id(self, pod: str) -> str:
        ids = self.real.node.crictl(
            "pods", "-q", "--namespace", self.ns, "--name", f"^{pod}$", "--state", "ready"
        ).split()
        assert len(ids) == 1, (pod, ids)
        return str(ids[0])


@pytest.fixture(scope="module")
def world(real_node: RealCluster) -> Iterator[RealWorld]:
    plane = real_node.plane
    ns = f"journey-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", ns)
    wait_until(
        lambda: plane.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
        30,
        "the default ServiceAccount",
    )
    workdir = real_node.node.work / f"journey-{ns}"
    workdir.mkdir()
    w = RealWorld(real_node, ns, workdir)
    try:
        yield w
    finally:
        w.close()
        plane.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "60s", check=False)
        plane.kubectl("delete", "patiocluster", CLUSTER, "-n", ns, "--wait=false", check=False)
        plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        wait_until(
            lambda: not plane.kubectl_json("get", "pods", "-n", ns)["items"], 120, "pods gone"
        )
        plane.kubectl("delete", "crd", "patioclusters.patio.dev", "--wait=false", check=False)
        print(JOURNEY.report())


@pytest.fixture(autouse=True)
def _in_order(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from JOURNEY.in_order(request)


def test_1_helm_install_runs_the_operator_container(world: RealWorld) -> None:
    w = world
    started = time.monotonic()
    w.plane.helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        w.ns,
        "--set",
        "image.repository=patio",
        "--set",
        "image.tag=dev",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "operator.rotation.settleSeconds=5",
        "--set",
        "operator.resyncSeconds=10",
        "--wait",
        "--timeout",
        "180s",
    )
    pods = wait_until(
        lambda: [p for p in w.pods(OPERATOR_SELECTOR) if is_ready(p)], 60, "a Ready operator"
    )
    JOURNEY.record("1 helm install, operator container Ready", started)
    name = pods[0]["metadata"]["name"]
    assert pods[0]["spec"]["containers"][0]["image"] == "patio:dev"
    uid = w.plane.kubectl(
        "exec", "-n", w.ns, name, "--", "python", "-c", "import os; print(os.getuid())"
    )
    assert uid.stdout.strip() == "10001"
    w.syncer = Syncer(w.plane, w.ns, CLUSTER, w.load.dir, w.sd_dir, OPERATOR_SELECTOR, 8000)
    w.syncer.start()


def test_2_cluster_of_3_forms_its_mesh_and_answers_through_its_service(world: RealWorld) -> None:
    w = world
    started = time.monotonic()
    cluster = {
        "apiVersion": "patio.dev/v1alpha1",
        "kind": "PatioCluster",
        "metadata": {"name": CLUSTER},
        "spec": {"registry": "tasks:rpc", "replicas": 3, "drainTimeoutSeconds": 10},
    }
    w.kubectl("apply", "-f", "-", input=yaml.safe_dump(cluster))
    w.wait_settled(3, timeout=240)
    JOURNEY.record("2a PatioCluster of 3 Ready, full mesh", started)
    ips = sorted(p["status"]["podIP"] for p in w.pods())
    # DNS: the headless Service lists every worker (what PATIO_PEERS_DNS reads).
    lookup = (
        "import socket, sys; print(sorted({a[4][0] for a in "
        f"socket.getaddrinfo('{CLUSTER}-mesh', {MESH_PORT}, proto=socket.IPPROTO_TCP)}}))"
    )
    first = w.pods()[0]["metadata"]["name"]
    seen = w.plane.kubectl(
        "exec", "-n", w.ns, first, "-c", "worker", "--", "python", "-c", lookup
    ).stdout
    assert seen.strip() == str(ips), (seen, ips)

    w.key_file.write_text(w.secret()["key"])
    svc = w.plane.kubectl_json("get", "service", CLUSTER, "-n", w.ns)
    cluster_ip = svc["spec"]["clusterIP"]

    def service_programmed() -> bool:
        # kube-proxy writes the ClusterIP's rules after the endpoints turn
        # ready, asynchronously: until then the address refuses connections.
        res = patio_call(f"{cluster_ip}:{MESH_PORT}", w.key_file, "mul", "6", "7")
        return "ConnectionRefusedError" not in res.stderr

    wait_until(service_programmed, 60, "kube-proxy to program the Service's ClusterIP")
    for _ in range(5):  # several connections: kube-proxy spreads them
        res = patio_call(f"{cluster_ip}:{MESH_PORT}", w.key_file, "mul", "6", "7")
        assert (res.returncode, res.stdout.strip()) == (0, "42"), res.stderr
    started = time.monotonic()
    peer, secret = f"{CLUSTER}:{MESH_PORT}", f"{CLUSTER}-auth"
    client = client_pod(peer, "--key-file", "/auth/key", secret=secret)
    w.kubectl("apply", "-f", "-", input=yaml.safe_dump(client))
    wait_until(
        lambda: (
            w.plane.kubectl_json("get", "pod", "client", "-n", w.ns)["status"].get("phase")
            in ("Succeeded", "Failed")
        ),
        120,
        "the client pod to finish",
    )
    out = w.kubectl("logs", "client").stdout.strip()
    phase = w.plane.kubectl_json("get", "pod", "client", "-n", w.ns)["status"]["phase"]
    assert (phase, out) == ("Succeeded", "42")
    w.kubectl("delete", "pod", "client", "--wait=false")
    JOURNEY.record("2b client pod calls the Service by name", started)


def test_3_helm_test_passes(world: RealWorld) -> None:
    w = world
    started = time.monotonic()
    res = w.plane.helm("test", RELEASE, "-n", w.ns, "--timeout", "120s", check=False)
    assert res.returncode == 0, f"{res.stdout[-3000:]}{res.stderr[-2000:]}"
    JOURNEY.record("3 helm test", started)


def test_4_scale_3_5_2_under_load(world: RealWorld) -> None:
    scale_under_load(world, [(5, "4a scale 3 -> 5", ""), (2, "4b scale 5 -> 2", "")], timeout=180)


def test_5_kill_a_worker_container_under_load(world: RealWorld) -> None:
    w = world
    kill_a_worker_under_load(
        w,
        "5 SIGKILL a worker container -> restarted, mesh full",
        lambda pod: w.container_pid(pod, "worker"),
        restarted_within=90,
        settled_within=120,
    )


def test_6_key_rotation_under_load(world: RealWorld) -> None:
    rotate_key_under_load(world, "realnode-1", "6 key rotation", timeout=240, refused_within=90)
    JOURNEY.end_phase(world, "rotate")


def test_7_prometheus_scrapes_the_pods(world: RealWorld) -> None:
    w = world
    started = time.monotonic()
    w.prometheus = prom = Prometheus(w.workdir / "prometheus", w.sd_dir)
    prom.start()
    expected = {p["status"]["podIP"] for p in w.pods()}
    # The chart runs two operator replicas (one holds the lease); both export metrics.
    operators = {p["status"]["podIP"] for p in w.pods(OPERATOR_SELECTOR)}

    def all_up() -> bool:
        up = hosts_up(prom)
        return up.get("patio-workers") == expected and up.get("patio-operator") == operators

    try:
        wait_until(all_up, 60, "Prometheus scraping the workers' and operator's pod addresses")
    except AssertionError as exc:
        seen = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in prom.targets()]
        raise AssertionError(
            f"{exc}; expected workers {expected}, operators {operators}; targets {seen}"
        ) from None
    JOURNEY.record("7a Prometheus scrapes every pod IP", started)
    query = 'sum(patio_calls_finished_total{side="executor"})'
    stats = w.load.pause()
    time.sleep(2.5)
    baseline = prom.scalar(query)
    assert baseline is not None and baseline > 0
    w.load.set_phase("prom")
    w.load.wait_calls("prom", 300)
    stats = w.load.pause()
    made = sum(sum(o.values()) for o in stats["phases"]["prom"].values())
    ok = sum(o.get("ok", 0) for o in stats["phases"]["prom"].values())
    assert made == ok, stats["phases"]["prom"]
    started = time.monotonic()
    wait_until(lambda: prom.scalar(query) == baseline + made, 20, f"{query} to grow by {made}")
    JOURNEY.record("7b PromQL counts every call", started)
    JOURNEY.notes["PromQL"] = (
        f"{query}: {baseline:.0f} -> {baseline + made:.0f} (+{made} calls made)"
    )


def test_8_uninstall_leaves_no_container(world: RealWorld) -> None:
    w = world
    started = time.monotonic()
    w.load.stop()
    if w.prometheus is not None:
        w.prometheus.stop()
    if w.syncer is not None:
        w.syncer.stop()
        w.syncer = None
    w.kubectl(
        "delete", "patiocluster", CLUSTER, "--ignore-not-found", "--wait=true", "--timeout=120s"
    )
    w.plane.helm("uninstall", RELEASE, "-n", w.ns, "--wait", "--timeout", "120s")
    wait_until(lambda: not w.pods(""), 120, "every pod of the namespace to be gone")
    node = w.real.node

    def no_sandbox() -> bool:
        return not node.crictl("pods", "-q", "--namespace", w.ns).split()

    wait_until(no_sandbox, 60, "every pod sandbox of the namespace to be removed")
    assert not node.crictl(
        "ps", "-a", "-q", "--label", f"io.kubernetes.pod.namespace={w.ns}"
    ).split()
    # No mount of a pod that is gone is left under kubelet's folder.
    live = {p["metadata"]["uid"] for p in w.plane.kubectl_json("get", "pods", "-A")["items"]}
    pods_dir = f"{node.work}/kubelet/pods/"
    mounts = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    leaked = [
        m for m in mounts if m.startswith(pods_dir) and m[len(pods_dir) :].split("/")[0] not in live
    ]
    assert not leaked, leaked
    JOURNEY.record("8 uninstall -> no object, sandbox or container left", started)
