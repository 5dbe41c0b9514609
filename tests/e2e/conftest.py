"""The end-to-end journey runs on the real test control plane of tests/kube.

Its session fixtures (``kube_control_plane``, ``kube_node``) come from the
``tests.kube.plugin`` pytest plugin, which ``tests/conftest.py`` registers
for the whole session; they are imported here only if it has not been.
"""

from __future__ import annotations

import sys

import pytest

if "tests.kube.plugin" not in sys.modules:
    from tests.kube.plugin import kube_control_plane, kube_node  # noqa: F401


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Remember a failed journey step: the steps after it build on it."""
    outcome = yield
    report = outcome.get_result()
    journey = getattr(getattr(item, "module", None), "JOURNEY", None)
    if report.failed and journey is not None:
        journey.failed.append(item.name)
