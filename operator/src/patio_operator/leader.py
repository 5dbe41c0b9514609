"""One active operator among replicas: leader election with a coordination.k8s.io Lease.

Why a Lease and not kopf's peering (docs/operator-ha.md has the longer
version): kopf's peering needs its own cluster- or namespace-scoped CRD and
object, pauses *every* operator when two share a priority (two identical
Deployment replicas do), and only pauses kopf's handlers, not the operator's
own resync loop. A Lease is the built-in object kube-controller-manager and
KubeRay use; the holder renews it every `RENEW_SECONDS`, a standby takes it
once it has seen no renewal for `DURATION_SECONDS`, and a holder that stops
gracefully hands it over at once by clearing `holderIdentity`.

Expiry is judged on the standby's own monotonic clock (when it last *saw*
the lease change), never by comparing the holder's wall-clock renewTime
with its own, so clock skew between nodes cannot elect two leaders. The
holder steps down (the process exits; its Deployment restarts it as a
standby) when it could not renew for `DURATION_SECONDS` minus a margin,
before any standby can take over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiException

from patio_operator.kube import Kube

log = logging.getLogger("patio_operator")

API_VERSION = "coordination.k8s.io/v1"
#: A standby takes over after this long without seeing a renewal; with
#: RENEW_SECONDS it bounds failover after a crash to about 12 s.
DURATION_SECONDS = 10
#: How often the holder renews and a standby looks.
RENEW_SECONDS = 2.0
#: The holder gives up this long before a standby could take over.
STEP_DOWN_MARGIN_SECONDS = 3.0


def _micro(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Observation:
    """What a candidate last saw of the lease, on its own clock."""

    version: str = ""
    seen_at: float = 0.0


def can_take(
    spec: Mapping[str, Any], identity: str, seen: Observation, now: float, version: str
) -> bool:
    """Whether `identity` may write itself into the lease now (pure)."""
    holder = str(spec.get("holderIdentity") or "")
    if not holder or holder == identity:
        return True
    if version != seen.version:  # the holder renewed since we last looked
        return False
    duration = float(spec.get("leaseDurationSeconds") or DURATION_SECONDS)
    return now - seen.seen_at >= duration


class Elector:
    """Acquire, renew and release one Lease (blocking calls; run them in a thread)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.monotonic, self.wall = monotonic, wall
        self.seen = Observation()
        #: Monotonic time of the last successful renewal while leading.
        self.renewed_at: float | None = None

    def _body(self, spec: Mapping[str, Any], transitions: int) -> dict[str, Any]:
        now = _micro(self.wall())
        acquired = spec.get("acquireTime") if spec.get("holderIdentity") == self.identity else now
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": DURATION_SECONDS,
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def try_lead(self) -> bool:
        """One attempt to acquire or renew; True while this candidate holds the lease."""
        now = self.monotonic()
        lease: dict[str, Any] | None = None
        try:
            lease = self.kube.get(API_VERSION, "Lease", self.namespace, self.name)
            if lease is None:
                # The chart creates the Lease (and has `helm uninstall` delete
                # it) and grants no `create`; an operator run without the
                # chart, with the right to create, makes it here.
                self.kube.create(
                    {
                        "apiVersion": API_VERSION,
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": self._body({}, 0),
                    }
                )
                self.renewed_at = now
                return True
            spec = lease.get("spec") or {}
            version = str(lease["metadata"]["resourceVersion"])
            if version != self.seen.version:
                self.seen = Observation(version, now)
            if not can_take(spec, self.identity, self.seen, now, version):
                self.renewed_at = None
                return False
            transitions = int(spec.get("leaseTransitions") or 0)
            if spec.get("holderIdentity") != self.identity:
                transitions += 1
                log.info(
                    "taking the leader lease %s/%s from %r",
                    self.namespace,
                    self.name,
                    spec.get("holderIdentity") or "nobody",
                )
            lease["spec"] = self._body(spec, transitions)
            # PUT with the resourceVersion read: two standbys racing for an
            # expired lease cannot both win (the loser gets 409).
            self.kube.replace(lease)
            self.renewed_at = now
            return True
        except ApiException as exc:
            if exc.status == 403 and lease is None:
                log.warning(
                    "leader lease %s/%s does not exist and this operator may not create it; "
                    "waiting for it (the chart creates it)",
                    self.namespace,
                    self.name,
                )
                return False
            log.warning("leader lease %s/%s: %s", self.namespace, self.name, exc.reason)
            if exc.status == 409:  # someone else wrote the lease in between
                self.renewed_at = None
        except Exception as exc:  # a refused connection is no leadership either
            log.warning("leader lease %s/%s: %s", self.namespace, self.name, exc)
        return self.still_leading()

    def still_leading(self) -> bool:
        """While renewals fail, keep leading only until shortly before a standby may take over."""
        if self.renewed_at is None:
            return False
        return self.monotonic() - self.renewed_at < DURATION_SECONDS - STEP_DOWN_MARGIN_SECONDS

    def release(self) -> None:
        """Hand the lease over at once (graceful stop); best effort."""
        if self.renewed_at is None:
            return
        self.renewed_at = None
        try:
            lease = self.kube.get(API_VERSION, "Lease", self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = ""
            self.kube.replace(lease)
            log.info("released the leader lease %s/%s", self.namespace, self.name)
        except Exception as exc:
            log.warning("could not release the leader lease: %s", exc)
