#!/usr/bin/env python3
"""Generate the chart's Grafana dashboards and its README from one place.

    python operator/hack/chart_files.py           write them
    python operator/hack/chart_files.py --check   exit 1 and name what drifted

Written files:
  charts/patio/dashboards/patio-cluster.json   calls, latency, errors, queue,
                                               links and key rotation of one cluster
  charts/patio/dashboards/patio-operator.json  the operator
  charts/patio/README.md                       every value of values.yaml, with the
                                               comment above it and its schema type

The dashboards are described below as short panel lists rather than kept as
hand-edited Grafana JSON, so a query is written once and reads like PromQL.
tests/operator/test_observability.py runs every query against a real
Prometheus; tests/operator/test_chart.py fails while a file differs from this
script's output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "patio"

# --- dashboards -----------------------------------------------------------------

DS = {"type": "prometheus", "uid": "${datasource}"}
#: Every worker series of the selected cluster (labels set by the chart's and
#: the operator's monitors: namespace and patio_cluster).
CL = 'namespace="$namespace", patio_cluster="$cluster"'
#: The operator's series in the selected namespace.
OP = 'namespace="$namespace"'
RI = "$__rate_interval"


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def p(title: str, expr: str, legend: str = "", **kw: Any) -> Panel:
    return Panel(title, [(expr, legend)], **kw)


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> Panel:
    return Panel(title, [(expr, "")], unit=unit, kind="stat", description=description, width=4)


def quantiles(metric: str, sel: str, by: str = "") -> list[tuple[str, str]]:
    group = f"{by}, le" if by else "le"
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
            f"p{round(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in (0.5, 0.9, 0.99)
    ]


def rate(metric: str, sel: str, by: str = "") -> str:
    return f"sum{f' by ({by})' if by else ''} (rate({metric}{{{sel}}}[{RI}]))"


EXEC = f'{CL}, side="executor"'
RAN = f'{CL}, side=~"executor|forwarder"'
FAILED = f'{RAN}, outcome!="ok"'

CLUSTER_ROWS = [
    Row(
        "Overview",
        [
            stat("Workers", f"count(patio_worker_info{{{CL}}})"),
            stat(
                "Mesh links up",
                f"sum(patio_peers_connected{{{CL}}}) / sum(patio_peers_known{{{CL}}})",
                "percentunit",
                "Authenticated links over known peers, summed over the workers.",
            ),
            stat("Calls executed", rate("patio_calls_finished_total", EXEC), "reqps"),
            stat(
                "Failed calls",
                f"(sum(rate(patio_calls_finished_total{{{FAILED}}}[{RI}])) or vector(0))"
                f" / sum(rate(patio_calls_finished_total{{{RAN}}}[{RI}]))",
                "percentunit",
                "Calls run or forwarded by the cluster that did not end ok.",
            ),
            stat(
                "p99 call duration",
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(patio_call_duration_seconds_bucket{{{EXEC}}}[{RI}])))",
                "s",
            ),
            stat(
                "Executor busy",
                f"sum(patio_executor_busy{{{CL}}}) / sum(patio_executor_capacity{{{CL}}})",
                "percentunit",
            ),
        ],
    ),
    Row(
        "Calls",
        [
            p(
                "Calls executed by task",
                rate("patio_calls_finished_total", EXEC, "task"),
                "{{task}}",
                unit="reqps",
            ),
            p(
                "Calls executed by worker",
                rate("patio_calls_finished_total", EXEC, "pod"),
                "{{pod}}",
                unit="reqps",
            ),
            p(
                "Calls in flight by side",
                f"sum by (side) (patio_calls_in_flight{{{CL}}})",
                "{{side}}",
            ),
            Panel(
                "Forwarded and retried calls",
                [
                    (rate("patio_calls_forwarded_total", CL), "forwarded"),
                    (rate("patio_calls_retried_total", CL), "retried"),
                ],
                unit="reqps",
                description="Forwarded: calls from outside callers passed on one hop. "
                "Retried: retryable calls re-sent after their link dropped.",
            ),
        ],
    ),
    Row(
        "Latency",
        [
            Panel(
                "Call duration",
                quantiles("patio_call_duration_seconds", EXEC),
                unit="s",
                description="From a call's arrival to its answer, on the executing worker.",
            ),
            Panel(
                "p99 call duration by task",
                quantiles("patio_call_duration_seconds", EXEC, "task")[2:],
                unit="s",
            ),
            Panel(
                "Queue wait",
                quantiles("patio_call_queue_wait_seconds", CL),
                unit="s",
                description="From a call's arrival to the moment a free executor slot runs it.",
            ),
        ],
    ),
    Row(
        "Errors",
        [
            p(
                "Failed calls by outcome",
                rate("patio_calls_finished_total", FAILED, "outcome"),
                "{{outcome}}",
                unit="reqps",
                description="error: the task raised; timeout, refused, no_route, connection, "
                "cancelled: the call did not complete.",
            ),
            p(
                "Failed share by task",
                f'sum by (task) (rate(patio_calls_finished_total{{{EXEC}, outcome!="ok"}}[{RI}]))'
                f" / sum by (task) (rate(patio_calls_finished_total{{{EXEC}}}[{RI}]))",
                "{{task}}",
                unit="percentunit",
            ),
        ],
    ),
    Row(
        "Queue",
        [
            p(
                "Executor busy by worker",
                f"sum by (pod) (patio_executor_busy{{{CL}}}) / sum by (pod) "
                f"(patio_executor_capacity{{{CL}}})",
                "{{pod}}",
                unit="percentunit",
            ),
            p(
                "Calls queued by worker",
                f"sum by (pod) (patio_executor_queued{{{CL}}})",
                "{{pod}}",
                description="Calls waiting for a free executor slot.",
            ),
        ],
    ),
    Row(
        "Links",
        [
            Panel(
                "Peers connected and known by worker",
                [
                    (f"sum by (pod) (patio_peers_connected{{{CL}}})", "{{pod}} connected"),
                    (f"sum by (pod) (patio_peers_known{{{CL}}})", "{{pod}} known"),
                ],
            ),
            Panel(
                "Link events",
                [
                    (rate("patio_connects_total", CL), "connects"),
                    (rate("patio_disconnects_total", CL), "disconnects"),
                    (rate("patio_reconnects_total", CL), "reconnects"),
                ],
                unit="ops",
            ),
            p(
                "Failed handshakes by reason",
                rate("patio_handshake_failures_total", CL, "reason"),
                "{{reason}}",
                unit="ops",
                description="auth: a wrong or retired key dialled the mesh port.",
            ),
            Panel(
                "Mesh traffic",
                [
                    (rate("patio_bytes_sent_total", CL), "sent"),
                    (rate("patio_bytes_received_total", CL), "received"),
                ],
                unit="Bps",
            ),
        ],
    ),
    Row(
        "Key rotation",
        [
            p(
                "Workers by presented key",
                f"count by (primary) (patio_auth_keys_info{{{CL}}})",
                "{{primary}}",
                description="Key fingerprints the workers present. Two at once: a rotation is "
                "under way (or stuck, see the PatioKeyRotationStuck alert).",
            ),
            p("Draining workers", f"sum(patio_draining{{{CL}}})", "draining"),
            p(
                "Workers by version",
                f"count by (version) (patio_worker_info{{{CL}}})",
                "{{version}}",
            ),
        ],
    ),
]

OPERATOR_ROWS = [
    Row(
        "Overview",
        [
            stat("PatioClusters", f"sum(patio_operator_clusters{{{OP}}})"),
            stat("Ready", f"sum(patio_operator_clusters_ready{{{OP}}})"),
            stat("Reconciles", rate("patio_operator_reconcile_total", OP), "ops"),
            stat(
                "Reconcile errors",
                rate("patio_operator_reconcile_total", f'{OP}, result="error"'),
                "ops",
            ),
        ],
    ),
    Row(
        "Reconciles",
        [
            p(
                "Reconciles by result",
                rate("patio_operator_reconcile_total", OP, "result"),
                "{{result}}",
                unit="ops",
            ),
            Panel(
                "Reconcile duration",
                quantiles("patio_operator_reconcile_duration_seconds", OP),
                unit="s",
            ),
            Panel(
                "Clusters and Ready by operator pod",
                [
                    (f"sum by (pod) (patio_operator_clusters{{{OP}}})", "{{pod}} clusters"),
                    (f"sum by (pod) (patio_operator_clusters_ready{{{OP}}})", "{{pod}} ready"),
                ],
            ),
            p(
                "Peers ConfigMap writes",
                rate("patio_operator_peers_updates_total", OP),
                "writes",
                unit="ops",
            ),
            p(
                "Key rotation steps",
                f"sum by (step) (increase(patio_operator_key_rotation_steps_total{{{OP}}}[{RI}]))",
                "{{step}}",
                description="Rotation phases entered (Accepting, Presenting, Retiring, Idle).",
            ),
        ],
    ),
    Row(
        "Process",
        [
            p(
                "Operator CPU",
                f"rate(process_cpu_seconds_total{{{OP}}}[{RI}]) and on (namespace, pod) "
                f"patio_operator_clusters{{{OP}}}",
                "{{pod}}",
                unit="percentunit",
            ),
            p(
                "Operator memory",
                f"process_resident_memory_bytes{{{OP}}} and on (namespace, pod) "
                f"patio_operator_clusters{{{OP}}}",
                "{{pod}}",
                unit="bytes",
            ),
        ],
    ),
]


def variable_query(name: str, label: str, definition: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": definition,
        "query": {"query": definition, "refId": f"{name}-values", "qryType": 1},
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
        "hide": 0,
        "current": {},
        "options": [],
        "regex": "",
    }


def panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    height = 4 if panel.kind == "stat" else 8
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DS,
        "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }
    if panel.description:
        out["description"] = panel.description
    if panel.kind == "stat":
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
        }
    else:
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return out


def dashboard(
    uid: str, title: str, description: str, variables: list[dict[str, Any]], rows: list[Row]
) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row in rows:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        row_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(panel_json(panel, len(panels) + 1, x, y))
            row_height = max(row_height, 4 if panel.kind == "stat" else 8)
            x += panel.width
        y += row_height
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "options": [],
        "refresh": 1,
        "regex": "",
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["patio"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": [datasource, *variables]},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        "patio-cluster.json": dashboard(
            "patio-cluster",
            "patio / cluster",
            "Calls, latency, errors, queues, mesh links and key rotation of one PatioCluster.",
            [
                variable_query(
                    "namespace", "Namespace", "label_values(patio_worker_info, namespace)"
                ),
                variable_query(
                    "cluster",
                    "PatioCluster",
                    'label_values(patio_worker_info{namespace="$namespace"}, patio_cluster)',
                ),
            ],
            CLUSTER_ROWS,
        ),
        "patio-operator.json": dashboard(
            "patio-operator",
            "patio / operator",
            "Reconciles, clusters, peers updates and key rotation steps of the patio operator.",
            [
                variable_query(
                    "namespace", "Namespace", "label_values(patio_operator_clusters, namespace)"
                )
            ],
            OPERATOR_ROWS,
        ),
    }


# --- README -----------------------------------------------------------------------

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")


def value_comments(text: str) -> dict[str, str]:
    """The comment block right above each key of values.yaml, by dotted path."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(line)
        if not match:
            pending = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        path = ".".join(k for _, k in stack)
        if pending:
            comments[path] = " ".join(pending)
        pending = []
    return comments


def schema_type(node: dict[str, Any], schema: dict[str, Any]) -> str:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    kind = node.get("type", "object")
    if "enum" in node:
        return " | ".join(f"`{v}`" for v in node["enum"])
    return " or ".join(kind) if isinstance(kind, list) else str(kind)


def resolve(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def value_rows(
    values: Any, node: dict[str, Any], schema: dict[str, Any], comments: dict[str, str], path: str
) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every value; objects the schema
    describes key by key are split into their keys."""
    described = node.get("description") or comments.get(path, "")
    node = resolve(node, schema)
    props = node.get("properties")
    if isinstance(values, dict) and props and values and "description" not in node:
        rows = []
        if path and path in comments:
            rows.append((path, "object", "", comments[path]))
        for key, sub in values.items():
            child = f"{path}.{key}" if path else key
            rows += value_rows(sub, props.get(key, {}), schema, comments, child)
        return rows
    default = json.dumps(values, separators=(", ", ": "))
    return [(path, schema_type(node, schema), f"`{default}`", comments.get(path) or described)]


def readme() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    comments = value_comments(text)
    rows = value_rows(values, schema, schema, comments, "")
    missing = [key for key, kind, _, desc in rows if not desc and kind != "object"]
    parents_described = [k for k in missing if any(k.startswith(f"{r[0]}.") for r in rows if r[3])]
    undocumented = sorted(set(missing) - set(parents_described))
    if undocumented:
        raise SystemExit(
            "values.yaml: add a comment above "
            + ", ".join(undocumented)
            + " (the chart README is generated from them)"
        )
    lines = [
        "<!-- Generated by operator/hack/chart_files.py from values.yaml, values.schema.json",
        "     and Chart.yaml. Do not edit: change those and run the script. -->",
        f"# {chart['name']} chart",
        "",
        " ".join(chart["description"].split()),
        "",
        f"Chart version {chart['version']}, app version {chart['appVersion']}, "
        f"Kubernetes {chart['kubeVersion']}.",
        "",
        "```sh",
        "helm install patio charts/patio --namespace patio-system --create-namespace",
        "```",
        "",
        "The project's [README](../../README.md) and",
        "[docs/kubernetes.md](../../docs/kubernetes.md) explain the operator and the",
        "PatioCluster resource; [docs/metrics.md](../../docs/metrics.md) the metrics,",
        "dashboards and alerts. `values.schema.json` rejects unknown keys and wrong types,",
        "so a typo fails `helm install`.",
        "",
        "## Values",
        "",
        "| Key | Type | Default | Description |",
        "|---|---|---|---|",
    ]
    for key, kind, default, desc in rows:
        cells = [f"`{key}`", kind, default, desc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------


def generated() -> dict[Path, str]:
    files = {
        CHART / "dashboards" / name: json.dumps(board, indent=2) + "\n"
        for name, board in dashboards().items()
    }
    files[CHART / "README.md"] = readme()
    return files


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ")
    args = parser.parse_args(argv)
    files = generated()
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} differs: run operator/hack/chart_files.py")
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
