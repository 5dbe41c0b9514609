"""The worker runtime: configuration, health and metrics endpoints, the local cluster.

Layering: ``patio.cli`` -> ``patio.worker`` -> ``patio.broker``, never the reverse.
Import the submodules you need (``patio.worker.config``, ``patio.worker.runtime``...);
this package's import stays cheap so ``patio keygen`` and ``--help`` start fast.
"""

from patio.worker.config import ConfigError, WorkerConfig, load_config

__all__ = ["ConfigError", "WorkerConfig", "load_config"]
