"""The observability pack: dashboards, alert rules and monitors of charts/patio.

The rules pass `promtool check rules` and the unit tests in
prometheus-rules-test.yaml; every dashboard query and alert expression that
reads worker metrics runs against a real Prometheus scraping real workers
under load (the operator's run in the end-to-end journey, where the real
operator is).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_tools import find, helm_binary, template

from tests import observability
from tests.e2e.journey import Prometheus
from tests.worker.helpers import Spawner, free_port, http_get
from tests.worker.test_worker_cluster import caller

PROMTOOL = Path("/usr/bin/promtool")
RULES_TEST = Path(__file__).with_name("prometheus-rules-test.yaml")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.exists():
        pytest.fail(f"{PROMTOOL} is missing: it comes with Debian's prometheus package")
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def write_rules(directory: Path, *values: str) -> Path:
    path = directory / "patio-rules.yaml"
    path.write_text(yaml.safe_dump(observability.render_rules(helm_binary(), *values)))
    return path


def test_rules_pass_promtool_check_and_unit_tests(tmp_path: Path) -> None:
    write_rules(tmp_path)
    checked = promtool("check", "rules", "patio-rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout, checked.stdout
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    tested = promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_rule_thresholds_and_labels_come_from_values(tmp_path: Path) -> None:
    rules = observability.render_rules(
        helm_binary(),
        "--set", "metrics.prometheusRule.errorRatio=0.2",  # a string to helm: accepted
        "--set", "metrics.prometheusRule.rotationStuckFor=1h",
        "--set", "metrics.prometheusRule.alertLabels.team=platform",
        "--set", "metrics.prometheusRule.alertLabels.severity=page",
    )  # fmt: skip
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert by_name["PatioCallErrorRatioHigh"]["expr"].rstrip().endswith("> 0.2")
    assert by_name["PatioKeyRotationStuck"]["for"] == "1h"
    assert all(r["labels"] == {"team": "platform", "severity": "page"} for r in by_name.values())
    values = ("--set", "metrics.prometheusRule.enabled=true")
    doc = find(
        template(*values, "--set", "metrics.prometheusRule.labels.release=kps"), "PrometheusRule"
    )
    assert doc["metadata"]["labels"]["release"] == "kps"


def test_dashboards_are_grafana_json_and_ship_as_a_configmap() -> None:
    files = {p.name: p.read_text() for p in observability.DASHBOARDS}
    assert sorted(files) == ["patio-cluster.json", "patio-operator.json"]
    for name, text in files.items():
        board = json.loads(text)
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "namespace"}
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
                assert panel["targets"], (name, panel["title"])
    assert not any(
        d["kind"] == "ConfigMap" for d in template()
    ), "dashboards are off by default"  # fmt: skip
    cm = find(
        template("--set", "metrics.dashboards.enabled=true",
                 "--set", "metrics.dashboards.namespace=monitoring"),
        "ConfigMap",
    )  # fmt: skip
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == files


def test_monitors_have_labels_interval_and_namespace_selector() -> None:
    docs = template(
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.podMonitor.enabled=true",
        "--set", "metrics.podMonitor.labels.release=kps",
        "--set", "metrics.workers.serviceMonitor.enabled=true",
        "--set", "metrics.workers.serviceMonitor.labels.release=kps",
        "--set", "metrics.workers.serviceMonitor.interval=15s",
        "--set", "metrics.workers.podMonitor.enabled=true",
        "--set-json", 'metrics.workers.podMonitor.namespaceSelector={"matchNames":["apps"]}',
    )  # fmt: skip
    op_pm = find(docs, "PodMonitor", "t-patio-operator")
    assert op_pm["metadata"]["labels"]["release"] == "kps"
    assert op_pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    workers_sm = find(docs, "ServiceMonitor", "t-patio-workers")
    assert workers_sm["metadata"]["labels"]["release"] == "kps"
    assert workers_sm["spec"]["namespaceSelector"] == {"any": True}
    assert workers_sm["spec"]["selector"]["matchLabels"]["patio.dev/service"] == "mesh"
    (endpoint,) = workers_sm["spec"]["endpoints"]
    assert endpoint["interval"] == "15s"
    relabel = {"sourceLabels": ["__meta_kubernetes_pod_label_patio_dev_cluster"],
               "targetLabel": "patio_cluster"}  # fmt: skip
    assert endpoint["relabelings"] == [relabel]
    workers_pm = find(docs, "PodMonitor", "t-patio-workers")
    assert workers_pm["spec"]["namespaceSelector"] == {"matchNames": ["apps"]}  # not any: true
    own = template("--set", "metrics.workers.podMonitor.enabled=true",
                   "--set", "metrics.workers.podMonitor.namespaceSelector.any=false")  # fmt: skip
    assert find(own, "PodMonitor")["spec"]["namespaceSelector"] == {}
    assert workers_pm["spec"]["podMetricsEndpoints"][0]["relabelings"] == [relabel]
    # What the operator's pods and Services carry is what the monitors select.
    from patio_operator import desired, names

    demo = {"metadata": {"name": "demo", "namespace": "ns", "uid": "u"}, "spec": {}}
    mesh = desired.mesh_service(demo)["metadata"]["labels"]
    assert mesh.items() >= workers_sm["spec"]["selector"]["matchLabels"].items()
    assert names.labels("demo").items() >= workers_pm["spec"]["selector"]["matchLabels"].items()
    assert endpoint["port"] in {p["name"] for p in desired.mesh_service(demo)["spec"]["ports"]}
    sm = desired.service_monitor(
        {"metadata": {"name": "demo", "namespace": "ns", "uid": "u"},
         "spec": {"metrics": {"serviceMonitor": True, "serviceMonitorLabels": {
             "release": "kps", names.CLUSTER_LABEL: "not-ours"}, "scrapeInterval": "10s"}}}
    )  # fmt: skip
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["metadata"]["labels"][names.CLUSTER_LABEL] == "demo"  # ours win
    assert sm["spec"]["endpoints"][0]["interval"] == "10s"
    assert sm["spec"]["endpoints"][0]["relabelings"] == [relabel]


# --- against a real Prometheus --------------------------------------------------

NAMESPACE, CLUSTER = "obs", "demo"


async def load(addresses: list[tuple[str, int]], key: str, stop: asyncio.Event) -> int:
    """Calls until ``stop``: fast ones, slow ones that queue, and failing ones."""
    made = 0
    async with caller(addresses, key) as broker:

        async def one(i: int) -> None:
            nonlocal made
            kind = i % 4
            if kind == 3:
                with pytest.raises(ValueError, match="on purpose"):
                    await broker.call("fail", "on purpose", timeout=10)
            elif kind == 2:
                await broker.call("sleep", 0.05, timeout=10)
            else:
                assert await broker.call("mul", i, 2, timeout=10) == i * 2
            made += 1

        i = 0
        while not stop.is_set():
            await asyncio.gather(*(one(i + j) for j in range(16)))
            i += 16
    return made


async def wrong_key(worker: Any) -> None:
    """A member with the wrong key dials a worker until it has counted the refusal."""
    async with caller([], "not-the-key") as intruder:
        intruder.add_peer(worker.host, worker.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, text = await asyncio.to_thread(http_get, worker.metrics_url + "/metrics")
            if 'patio_handshake_failures_total{reason="auth"}' in text:
                return
            await asyncio.sleep(0.2)
    raise AssertionError("the worker never counted an authentication failure")


@pytest.mark.slow
async def test_every_worker_query_and_alert_returns_data_from_real_workers(
    tmp_path: Path,
) -> None:
    spawn = Spawner(tmp_path)
    key = tmp_path / "key"
    key.write_text("obs-key\n")
    prom = Prometheus(tmp_path / "prometheus", tmp_path / "sd",
                      rule_files=(write_rules(tmp_path),))  # fmt: skip
    stop = asyncio.Event()
    loader: asyncio.Task[int] | None = None
    try:
        pa, pb = free_port(), free_port()
        common = ("--key-file", str(key), "--max-workers", "2")
        a = spawn.worker("--peers", f"127.0.0.1:{pb}", *common, port=pa, node_id="wa")
        b = spawn.worker("--peers", f"127.0.0.1:{pa}", *common, port=pb, node_id="wb")
        await asyncio.to_thread(a.wait_ready)
        await asyncio.to_thread(b.wait_ready)
        # The targets as the chart's monitors label them (namespace, pod, patio_cluster).
        prom.sd_dir.mkdir()
        (prom.sd_dir / "operator.json").write_text("[]")
        (prom.sd_dir / "workers.json").write_text(json.dumps([
            {"targets": [f"{w.host}:{w.metrics_port}"],
             "labels": {"namespace": NAMESPACE, "patio_cluster": CLUSTER, "pod": name}}
            for name, w in (("demo-0", a), ("demo-1", b))
        ]))  # fmt: skip
        await asyncio.to_thread(prom.start)
        loader = asyncio.create_task(load([(a.host, a.port), (b.host, b.port)], "obs-key", stop))
        await wrong_key(a)

        queries = [
            q for q in observability.all_queries(helm_binary()) if not q.operator
        ]  # fmt: skip
        assert len(queries) > 30
        variables = {"namespace": NAMESPACE, "cluster": CLUSTER, "__rate_interval": "10s"}
        started = time.monotonic()
        found: list[str] = ["not run yet"]
        while found and time.monotonic() - started < 60:
            assert not loader.done(), loader
            found = await asyncio.to_thread(observability.problems, prom.query, queries, variables)
            if found:
                await asyncio.sleep(1)
        assert not found, "\n".join(found)
        print(f"\n[observability] {len(queries)} worker queries return data after "
              f"{time.monotonic() - started:.1f}s of load")  # fmt: skip
        # Prometheus itself loaded and evaluated every rule without an error.
        rules = await asyncio.to_thread(prom.rules)
        assert len(rules) == 7
        for rule in rules:
            assert rule["health"] == "ok", rule
            assert not rule["lastEvaluation"].startswith("0001"), rule
    finally:
        stop.set()
        if loader is not None:
            made = await loader
            print(f"[observability] load: {made} calls")
        prom.stop()
        for worker in spawn.workers:
            worker.terminate()
        for worker in spawn.workers:
            worker.kill()
