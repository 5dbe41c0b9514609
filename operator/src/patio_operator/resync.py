"""The periodic, level-based pass over every PatioCluster.

Watch events drive most work, but events can be missed (operator down,
watch gap) and drift needs no event at all (a hand-edited StatefulSet is an
event on the StatefulSet, which the operator does not watch). So every
`resync_seconds` each cluster gets a full reconcile anyway, and a cluster in
the middle of a key rotation is re-evaluated every `rotation_tick_seconds`.

Only *scheduling* is kept in memory (when each cluster last had a pass);
losing it on restart just means every cluster is reconciled at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from patio_operator.reconciler import Reconciler

log = logging.getLogger("patio_operator")


def due(
    cluster: Mapping[str, Any], last_run: float | None, now: float, resync_seconds: float
) -> bool:
    """Whether a cluster needs a pass now (pure, for tests)."""
    if (cluster.get("metadata") or {}).get("deletionTimestamp"):
        return False
    if last_run is None or now - last_run >= resync_seconds:
        return True
    phase = ((cluster.get("status") or {}).get("rotation") or {}).get("phase") or "Idle"
    return phase != "Idle"


async def resync_forever(reconciler: Reconciler, namespaces: list[str]) -> None:
    """Run until cancelled; errors are logged and retried on the next tick."""
    cfg = reconciler.config
    last: dict[tuple[str, str], float] = {}
    while True:
        try:
            clusters = await asyncio.to_thread(reconciler.kube.list_clusters, namespaces)
            seen = set()
            for cluster in clusters:
                meta = cluster["metadata"]
                key = (meta["namespace"], meta["name"])
                seen.add(key)
                now = time.monotonic()
                if not due(cluster, last.get(key), now, cfg.resync_seconds):
                    continue
                last[key] = now
                try:
                    await asyncio.to_thread(reconciler.reconcile, *key)
                except Exception:
                    log.exception("periodic reconcile of %s/%s failed", *key)
            for key in set(last) - seen:
                del last[key]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("listing PatioClusters failed; retrying")
        await asyncio.sleep(cfg.rotation_tick_seconds)
