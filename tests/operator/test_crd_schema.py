"""The CRD file itself: the shape other tools (kubectl scale, HPA) rely on."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from chart_tools import CRD_FILE
from patio_operator import names


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return data


def version(crd: dict[str, Any]) -> dict[str, Any]:
    (v,) = crd["spec"]["versions"]
    return dict(v)


def spec_props(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])


def test_identity(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}"
    assert crd["spec"]["group"] == names.GROUP
    assert crd["spec"]["names"]["kind"] == names.KIND
    # `pc` is PriorityClass's short name; kubectl would never reach ours.
    assert crd["spec"]["names"]["shortNames"] == ["ptc"]
    assert crd["spec"]["names"]["categories"] == ["patio"]
    assert version(crd)["name"] == names.VERSION


def test_scale_and_status_subresources(crd: dict[str, Any]) -> None:
    sub = version(crd)["subresources"]
    assert sub["status"] == {}
    assert sub["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }


def test_printer_columns(crd: dict[str, Any]) -> None:
    cols = {c["name"]: c["jsonPath"] for c in version(crd)["additionalPrinterColumns"]}
    assert cols["Replicas"] == ".spec.replicas"
    assert cols["Ready"] == ".status.readyReplicas"
    assert cols["Peers"] == ".status.peers"
    assert cols["Age"] == ".metadata.creationTimestamp"


def test_validation_rules(crd: dict[str, Any]) -> None:
    spec_schema = version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec_schema["required"] == ["registry"]
    props = spec_schema["properties"]
    assert props["executor"]["enum"] == ["async", "thread", "process"]
    assert props["replicas"]["minimum"] == 0
    assert (props["port"]["minimum"], props["port"]["maximum"]) == (1, 65535)
    auto = props["autoscaling"]
    assert "self.minReplicas <= self.maxReplicas" in auto["x-kubernetes-validations"][0]["rule"]
    assert auto["x-kubernetes-validations"][0]["fieldPath"] == ".minReplicas"
    # While the autoscaler owns replicas, a hand-set count must stay in bounds
    # (a transition rule: it also guards /scale); unchanged replicas pass.
    owner = [
        r for r in spec_schema["x-kubernetes-validations"] if r.get("fieldPath") == ".replicas"
    ]
    assert "oldSelf.replicas" in owner[0]["rule"]
    assert "operator owns replicas" in owner[0]["message"]


def test_defaults_match_the_operator(crd: dict[str, Any]) -> None:
    props = spec_props(crd)
    assert props["port"]["default"] == names.DEFAULT_PORT
    assert props["metrics"]["properties"]["port"]["default"] == names.DEFAULT_METRICS_PORT
    assert props["drainTimeoutSeconds"]["default"] == names.DEFAULT_DRAIN_SECONDS


@pytest.mark.parametrize(
    ("registry", "ok"),
    [
        ("tasks:rpc", True),
        ("my_pkg.sub.tasks:registry", True),
        ("pkg.mod:obj.attr", True),
        ("tasks", False),
        ("tasks:", False),
        (":rpc", False),
        ("1pkg:rpc", False),
        ("pkg/mod:rpc", False),
        ("pkg.mod:rpc; rm -rf /", False),
    ],
)
def test_registry_pattern(crd: dict[str, Any], registry: str, ok: bool) -> None:
    pattern = spec_props(crd)["registry"]["pattern"]
    assert bool(re.fullmatch(pattern, registry)) is ok


def test_status_conditions_are_a_list_map(crd: dict[str, Any]) -> None:
    status = version(crd)["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    conds = status["conditions"]
    assert conds["x-kubernetes-list-type"] == "map"
    assert set(conds["items"]["properties"]) >= {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    for field in (
        "replicas",
        "readyReplicas",
        "peers",
        "selector",
        "observedGeneration",
        "keyGeneration",
    ):
        assert field in status
