"""The end-to-end journey runs on the real test control plane of tests/kube.

Its session fixtures (``kube_control_plane``, ``kube_node``) come from the
``tests.kube.plugin`` pytest plugin; they are imported here unless the
suite-wide conftest already registered the plugin.

The control plane's work folder (node agent pod folders included) must not
be under /tmp: every patio pod mounts an emptyDir at /tmp in its private
mount namespace, and the node agent mounts it before the Secret and
ConfigMap volumes, whose source folders it would then hide (see
docs/e2e.md). So unless ``PATIO_KUBE_WORKDIR`` is set, it is set here to a
folder under /var/tmp, removed again after a passing session (kept after a
failing one, for its logs).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

if "tests.kube.plugin" not in sys.modules:
    from tests.kube.plugin import kube_control_plane, kube_node  # noqa: F401

_OWN_WORKDIR = None
if not os.environ.get("PATIO_KUBE_WORKDIR"):
    _OWN_WORKDIR = Path("/var/tmp") / f"patio-e2e-{os.getuid()}"
    os.environ["PATIO_KUBE_WORKDIR"] = str(_OWN_WORKDIR)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_WORKDIR is None:
        return
    own = _OWN_WORKDIR / f"session-{os.getpid()}"
    if exitstatus == 0 or (own.is_dir() and not any(own.iterdir())):
        shutil.rmtree(own, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Remember a failed journey step: the steps after it build on it."""
    outcome = yield
    report = outcome.get_result()
    journey = getattr(getattr(item, "module", None), "JOURNEY", None)
    if report.failed and journey is not None:
        journey.failed.append(item.name)
