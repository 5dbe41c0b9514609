"""The chart's dashboards and alert rules as PromQL, for checks against a real Prometheus.

Shared by tests/operator/test_observability.py (real workers under load) and
the end-to-end journey (the real operator on the test control plane).

A query "returns data" when Prometheus evaluates it without error to a
non-empty result, AND every series selector in it matches at least one
series: so ``x or vector(0)`` and an alert whose condition is false (an empty
result is the normal state of an alert) are still checked against the series
they read.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "patio"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))

#: A Grafana variable query: label_values(<selector>, <label>).
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")
#: A series selector: a metric name (ours or the process collector's) and
#: optional matchers. Label names such as patio_cluster are not metrics.
SELECTOR = re.compile(r"(?<![\w\"])((?:patio|process)_[a-z_]+)(\{[^}]*\})?")
LABEL_NAMES = {"patio_cluster"}


@dataclass(frozen=True)
class Query:
    where: str  # "patio-cluster.json: Calls executed by task [A]" or "alert PatioLinksMissing"
    expr: str
    label: str = ""  # for a variable query: the label whose values it lists
    alert: bool = False

    @property
    def operator(self) -> bool:
        """Reads the operator's metrics (checked where the operator runs)."""
        return "patio_operator_" in self.expr


def dashboard_queries(path: Path) -> Iterator[Query]:
    board = json.loads(path.read_text())
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = LABEL_VALUES.match(var["definition"])
            assert match, f"{path.name}: variable {var['name']}: {var['definition']}"
            yield Query(f"{path.name}: variable ${var['name']}", match["selector"], match["label"])
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield Query(f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"])


def render_rules(helm: Path, *values: str) -> dict[str, Any]:
    """The chart's PrometheusRule spec ({groups: ...}), as `helm template` renders it."""
    out = subprocess.run(
        [str(helm), "template", "t", str(CHART), "--set", "metrics.prometheusRule.enabled=true",
         *values, "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    spec: dict[str, Any] = yaml.safe_load(out)["spec"]
    return spec


def rule_queries(rules: dict[str, Any]) -> Iterator[Query]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield Query(f"alert {rule['alert']}", rule["expr"], alert=True)


def all_queries(helm: Path) -> list[Query]:
    queries = [q for path in DASHBOARDS for q in dashboard_queries(path)]
    return queries + list(rule_queries(render_rules(helm)))


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables by value: $namespace, $cluster, $__rate_interval..."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    assert "$" not in expr.replace("$labels", "").replace("$value", ""), f"unsubstituted: {expr}"
    return expr


def selectors(expr: str) -> list[str]:
    return [
        m.group(1) + (m.group(2) or "")
        for m in SELECTOR.finditer(expr)
        if m.group(1) not in LABEL_NAMES
    ]


Run = Callable[[str], list[dict[str, Any]]]


def problems(run: Run, queries: list[Query], variables: dict[str, str]) -> list[str]:
    """What is wrong with each query now (empty when all are fine).

    ``run`` evaluates an instant query and raises on an error answer (a
    parse error, a bad function), which is reported as such.
    """
    found: list[str] = []
    for query in queries:
        expr = substitute(query.expr, variables)
        try:
            result = run(expr)
            empty = [s for s in selectors(expr) if not run(f"count({s})")]
        except Exception as exc:  # reported with the query that caused it
            found.append(f"{query.where}: {expr}: {exc}")
            continue
        if not selectors(expr):
            found.append(f"{query.where}: reads no patio series: {expr}")
        if empty:
            found.append(f"{query.where}: no series for {', '.join(empty)}")
        elif query.label and not any(query.label in r["metric"] for r in result):
            found.append(f"{query.where}: no {query.label} label in {expr}")
        elif not result and not query.alert:
            found.append(f"{query.where}: no data: {expr}")
    return found
