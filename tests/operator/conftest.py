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
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "operator" / "src"
# No __init__.py in tests/operator on purpose: as a package it would be
# imported as `operator`, shadowing the standard library module.
for folder in (SRC, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


# Worker pods mount an emptyDir at /tmp (their root filesystem is read-only).
# The test node agent bind-mounts each pod's volumes from its work folder, so
# that folder must not live under /tmp or the /tmp mount would hide it: put
# the control plane's work folder elsewhere unless the caller chose one.
_KUBE_WORKDIR_SET_HERE = "PATIO_KUBE_WORKDIR" not in os.environ
if _KUBE_WORKDIR_SET_HERE:
    os.environ["PATIO_KUBE_WORKDIR"] = tempfile.mkdtemp(prefix="patio-kube-", dir="/var/tmp")


def pytest_unconfigure(config: object) -> None:
    if _KUBE_WORKDIR_SET_HERE:
        shutil.rmtree(os.environ.pop("PATIO_KUBE_WORKDIR", ""), ignore_errors=True)


# The real control plane (tests/kube). Imported here rather than relying on
# tests/kube/conftest.py, whose fixtures are only visible under tests/kube.
# If tests/conftest.py ever registers `pytest_plugins = ["tests.kube.plugin"]`
# these imports can go and both folders share one control plane.
_ROOT = HERE.parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
from tests.kube.plugin import kube_control_plane, kube_namespace, kube_node  # noqa: E402, F401
