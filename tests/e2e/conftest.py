"""The end-to-end journey runs on the real test control plane of tests/kube.

A failed step stops the steps after it (``Journey.in_order``).

Its session fixtures (``kube_control_plane``, ``kube_node``) come from the
``tests.kube.plugin`` pytest plugin, which ``tests/conftest.py`` registers
for the whole session; they are imported here only if it has not been.
"""

from __future__ import annotations

import sys

if "tests.kube.plugin" not in sys.modules:
    from tests.kube.plugin import kube_control_plane, kube_node  # noqa: F401
