"""Register the ``tests.kube.plugin`` fixtures for the whole session when the
suite-wide ``tests/conftest.py`` does not (it should:
``pytest_plugins = ["tests.kube.plugin"]``).

Registering the plugin (rather than importing its fixtures here) keeps one
control plane per session: fixtures of a registered plugin are global, while
fixtures imported into a conftest are a separate, folder-local copy.
"""

from __future__ import annotations

import importlib

import pytest

PLUGIN = "tests.kube.plugin"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.register(importlib.import_module(PLUGIN), PLUGIN)
