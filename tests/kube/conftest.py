"""Make the fixtures of ``tests.kube.plugin`` available to tests/kube even when
the suite-wide ``tests/conftest.py`` does not register the plugin (it should:
``pytest_plugins = ["tests.kube.plugin"]``)."""

import sys

if "tests.kube.plugin" not in sys.modules:
    from tests.kube.plugin import kube_control_plane, kube_namespace, kube_node  # noqa: F401
