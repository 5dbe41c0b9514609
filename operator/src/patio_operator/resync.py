"""The periodic, level-based pass over every PatioCluster.

Watch events drive most work, but events can be missed (operator down,
watch gap) and drift needs no event at all (a hand-edited StatefulSet is an
event on the StatefulSet, which the operator does not watch). So every
`resync_seconds` each cluster gets a full reconcile anyway; a cluster in the
middle of a key rotation is re-evaluated every `rotation_tick_seconds`, a
cluster whose last pass failed is retried with exponential backoff
(`retry_delay`), and a cluster with autoscaling enabled has its load sampled
every tick.

Clusters are handled concurrently, at most `MAX_CONCURRENT` at once: one
cluster with unreachable workers (a probe waits for its timeout) must not
hold every other cluster's pass back, and a bound keeps a namespace with
hundreds of clusters from opening hundreds of API connections at once.

Only *scheduling* is kept in memory (when each cluster last had a pass, and
its failure count in the Reconciler); losing it on restart just means every
cluster is reconciled at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from patio_operator import autoscale, desired
from patio_operator.reconciler import Reconciler

log = logging.getLogger("patio_operator")

#: Passes running at once; each holds a thread of the default executor.
MAX_CONCURRENT = 4


def due(
    cluster: Mapping[str, Any],
    last_run: float | None,
    now: float,
    resync_seconds: float,
    retry_at: float | None = None,
) -> bool:
    """Whether a cluster needs a full pass now (pure, for tests)."""
    if (cluster.get("metadata") or {}).get("deletionTimestamp"):
        return False
    if retry_at is not None:
        return now >= retry_at
    if last_run is None or now - last_run >= resync_seconds:
        return True
    phase = ((cluster.get("status") or {}).get("rotation") or {}).get("phase") or "Idle"
    return phase != "Idle"


def autoscaled(cluster: Mapping[str, Any]) -> bool:
    """Whether the cluster's load is sampled on every tick."""
    if (cluster.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return autoscale.policy_of(desired.spec_of(dict(cluster))) is not None


async def _bounded(
    limit: asyncio.Semaphore, what: str, key: tuple[str, str], fn: Callable[..., object]
) -> None:
    async with limit:
        try:
            await asyncio.to_thread(fn, *key)
        except Exception:
            log.exception("%s of %s/%s failed", what, *key)


async def resync_forever(reconciler: Reconciler, namespaces: list[str]) -> None:
    """Run until cancelled; errors are logged and retried (with backoff) on later ticks."""
    cfg = reconciler.config
    last: dict[tuple[str, str], float] = {}
    limit = asyncio.Semaphore(MAX_CONCURRENT)
    while True:
        try:
            clusters = await asyncio.to_thread(reconciler.kube.list_clusters, namespaces)
            seen = set()
            passes = []
            for cluster in clusters:
                meta = cluster["metadata"]
                key = (meta["namespace"], meta["name"])
                seen.add(key)
                now = time.monotonic()
                if due(cluster, last.get(key), now, cfg.resync_seconds, reconciler.retry_at(key)):
                    last[key] = now
                    passes.append(_bounded(limit, "reconcile", key, reconciler.reconcile))
                elif autoscaled(cluster):
                    passes.append(_bounded(limit, "autoscaling", key, reconciler.autoscale))
            # A full pass is not followed by a sample in the same tick: it
            # may just have changed the StatefulSet the sample would judge.
            await asyncio.gather(*passes)
            for key in set(last) - seen:
                del last[key]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("listing PatioClusters failed; retrying")
        await asyncio.sleep(cfg.rotation_tick_seconds)
