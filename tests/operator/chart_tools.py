"""Locating helm and rendering the chart, shared by the chart and kube tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "patio"
CRD_FILE = CHART / "files" / "crd-patioclusters.yaml"
RENDER_SCRIPT = ROOT / "operator" / "hack" / "render-manifests.sh"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def helm_binary() -> Path:
    """The helm that hack/k8s/build.sh builds (via the control-plane plugin's helper).

    Fails, not skips, when it is missing: a chart check that silently does
    not run is worse than a red build that names the command to run.
    """
    from tests.kube.controlplane import Binaries

    return Binaries.find().helm


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env.setdefault(var, str(Path("/tmp") / "patio-helm-test" / var.lower()))
    return subprocess.run(
        [str(helm_binary()), *args],
        capture_output=True,
        text=True,
        check=check,
        env=env,
        timeout=120,
    )


def template(*args: str, namespace: str = "patio-system") -> list[dict[str, Any]]:
    out = helm("template", "t", str(CHART), "--namespace", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"{len(hits)} {kind} objects named {name}"
    return hits[0]
