"""The operator's autoscaler on the real control plane, with real workers under real load.

A load process keeps calls running through the mesh; the operator reads the
workers' executor gauges, grows the cluster step by step within maxReplicas,
and after the load stops shrinks it back to minReplicas once the (short)
stabilization window has passed. Every call of the load succeeds, and the
status and the Events show each step. Windows are seconds here; the
decisions themselves are pinned by test_autoscale_decisions.py.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chart_tools import ROOT
from kubehelpers import (
    Operator,
    apply_obj,
    cluster_obj,
    get,
    install_crd,
    running_operator,
    secret_keys,
    wait_condition,
)

from tests.kube.controlplane import ControlPlane
from tests.kube.helpers import wait_until
from tests.kube.nodeagent import NodeAgent

pytestmark = [pytest.mark.kube, pytest.mark.slow]

LOAD = """
import asyncio, json, pathlib, sys
from patio.broker import TCPClientBroker
from patio.executor import NullExecutor
from patio.registry import Registry
from patio.worker.runtime import read_key_file

host, port, key_file, stop_file, concurrency = sys.argv[1:6]
stop = pathlib.Path(stop_file)
done, failed = 0, []

async def caller(broker):
    global done
    while not stop.exists():
        try:
            await broker.call("sleep", 0.5, timeout=30)
            done += 1
        except Exception as exc:
            failed.append(repr(exc))

async def main():
    async with NullExecutor(Registry()) as executor:
        async with TCPClientBroker(executor, key=read_key_file(key_file)) as broker:
            await broker.connect(host, int(port))
            await asyncio.gather(*(caller(broker) for _ in range(int(concurrency))))

asyncio.run(main())
print(json.dumps({"done": done, "failed": failed}))
"""


@pytest.fixture
def scaling_operator(
    kube_control_plane: ControlPlane, kube_node: NodeAgent, kube_namespace: str, tmp_path: Path
) -> Iterator[Operator]:
    install_crd(kube_control_plane)
    with running_operator(kube_control_plane, kube_namespace, tmp_path) as op:
        yield op


def events(plane: ControlPlane, ns: str, name: str) -> list[tuple[str, str]]:
    out = get(plane, ns, "events", "--field-selector", f"involvedObject.name={name}")
    items = sorted((out or {}).get("items") or [], key=lambda e: e["metadata"]["creationTimestamp"])
    return [(e["reason"], e["message"]) for e in items]


def test_replicas_follow_demand_up_and_back_down_without_failed_calls(
    kube_control_plane: ControlPlane,
    kube_node: NodeAgent,
    kube_namespace: str,
    scaling_operator: Operator,
    tmp_path: Path,
) -> None:
    plane, ns = kube_control_plane, kube_namespace
    auto = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        # Two slots per worker, half of them busy: one running call per worker.
        "target": {"busyFraction": 0.5},
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 4,
        "maxStep": 1,
    }
    spec = {"replicas": 1, "maxWorkers": 2, "drainTimeoutSeconds": 10, "autoscaling": auto}
    assert apply_obj(plane, ns, cluster_obj("auto", **spec)).returncode == 0
    wait_condition(plane, ns, "auto", "Ready")

    # While the autoscaler owns replicas, /scale outside its bounds is refused by the API server.
    refused = plane.kubectl("scale", "-n", ns, "ptc/auto", "--replicas=9", check=False)
    assert refused.returncode != 0 and "the operator owns replicas" in refused.stderr

    keys = secret_keys(plane, ns, "auto-auth")
    assert keys is not None
    (tmp_path / "key").write_text(keys["key"])
    entry = get(plane, ns, "pod", "auto-0")["status"]["podIP"]
    stop = tmp_path / "stop"
    load = subprocess.Popen(
        [sys.executable, "-c", LOAD, entry, "15383", str(tmp_path / "key"), str(stop), "6"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[int] = []

    def replicas_at(n: int) -> bool:
        pc = get(plane, ns, "ptc", "auto")
        seen.append(int(pc["spec"]["replicas"]))
        ready = int((pc.get("status") or {}).get("readyReplicas") or 0)
        return seen[-1] == n and ready == n

    try:
        wait_until(lambda: replicas_at(3), timeout=90, interval=0.5, what="scaled up to 3")
        time.sleep(3)  # at maxReplicas under load: it stays there
        assert int(get(plane, ns, "ptc", "auto")["spec"]["replicas"]) == 3
    finally:
        stop.touch()
        out, err = load.communicate(timeout=60)
    assert load.returncode == 0, err
    result = json.loads(out)
    assert result["failed"] == [] and result["done"] > 20, result

    wait_until(lambda: replicas_at(1), timeout=120, interval=0.5, what="back to minReplicas")
    assert max(seen) <= 3
    # Each step one replica (maxStep 1), up then down.
    steps = [b - a for a, b in itertools.pairwise(seen) if b != a]
    assert steps == [1, 1, -1, -1], seen

    status = get(plane, ns, "ptc", "auto")["status"]["autoscaling"]
    assert status["desiredReplicas"] == 1
    assert status["lastScaleReason"].startswith("scaled down from 2 to 1")
    assert status["lastScaleTime"]
    reasons = [r for r, _ in events(plane, ns, "auto") if r.startswith("Scaled")]
    assert reasons == ["ScaledUp", "ScaledUp", "ScaledDown", "ScaledDown"], events(
        plane, ns, "auto"
    )
