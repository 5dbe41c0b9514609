"""patio's Kubernetes operator: PatioCluster -> a mesh of `patio worker` pods.

Layout: pure decisions in `desired` (spec -> objects), `peers` (pods -> peers
file), `status` (observed -> status) and `rotation` (key-rotation state
machine); I/O in `kube`, `keyprobe` and `reconciler`; kopf glue in `handlers`;
flags in `cli`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `python -m patio_operator` and `patio operator`.

    Imported lazily so that `import patio_operator` (e.g. by the patio CLI
    building its help) does not pull in kopf and the Kubernetes client.
    """
    from patio_operator.cli import main as run  # noqa: PLC0415 - deliberately lazy

    return run(argv)
