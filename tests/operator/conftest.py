"""Make `patio_operator` (and this folder's helpers) importable without installing.

`operator/` is deliberately not a package (a top-level `operator` package
would shadow the standard library), so its source folder is put on sys.path
here; an editable install (`pip install -e .`) works just as well.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "operator" / "src"
# No __init__.py in tests/operator on purpose: as a package it would be
# imported as `operator`, shadowing the standard library module.
for folder in (SRC, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


_ROOT = HERE.parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

# The real control plane comes from tests/kube. Its node and namespace
# fixtures are reused as they are (tests/kube/conftest.py's copies are only
# visible under tests/kube); the control plane fixture is our own, for one
# reason: worker pods mount an emptyDir at /tmp (their root filesystem is
# read-only) and the test node agent bind-mounts each pod's volumes from the
# plane's work folder, so that folder must not live under /tmp -- where
# pytest's tmp_path is -- or the /tmp mount hides it from the pod.
from tests.kube.controlplane import ControlPlane  # noqa: E402
from tests.kube.plugin import kube_namespace, kube_node  # noqa: E402, F401


@pytest.fixture(scope="session")
def kube_control_plane() -> Iterator[ControlPlane]:
    base = os.environ.get("PATIO_KUBE_WORKDIR") or "/var/tmp"
    Path(base).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="patio-operator-kube-", dir=base))
    plane = ControlPlane.start(workdir)
    try:
        yield plane
    finally:
        plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)
