"""Level-based reconciliation: read the cluster's objects, apply what the pure
functions want, write status.

Every pass starts from what the API server says, so it does not matter
whether the previous pass finished, ran in another operator process, or was
undone by hand: a deleted Service is re-created, an edited StatefulSet field
is reset (server-side apply with force), a killed pod is replaced by the
StatefulSet and its address re-published. The only state is in the cluster
(the auth Secret's annotations and the PatioCluster's status).

Decision on a deleted *generated* auth Secret: the old key is gone (the
operator never copies it elsewhere), so the operator generates a new key,
increments keyGeneration and records a Warning Event. Running workers keep
the old key until the kubelet refreshes their mounted Secret; for that
window (about a minute) new connections between a refreshed and a stale
worker are refused, established ones keep working. A Secret edited to lose
its `key` is treated the same way.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiException

from patio_operator import (
    autoscale,
    desired,
    loadprobe,
    metrics,
    names,
    peers,
    podsecurity,
    rotation,
    status,
)
from patio_operator.keyprobe import fetch_report, probe_all
from patio_operator.kube import Kube

Obj = dict[str, Any]
#: (involved object body, "Normal"/"Warning", reason, message)
EmitFn = Callable[[Mapping[str, Any], str, str, str], None]

log = logging.getLogger("patio_operator")


@dataclass(frozen=True)
class Config:
    """The operator's flags, as the reconciler needs them."""

    settings: desired.Settings
    #: "metrics" or "settle": how a rotation step is confirmed (rotation.py).
    rotation_mode: str = "metrics"
    #: Wait for the steps workers cannot report (all steps in settle mode).
    settle_seconds: float = 90.0
    resync_seconds: float = 30.0
    rotation_tick_seconds: float = 5.0
    #: Apply worker templates that break the Pod Security "restricted"
    #: profile (podsecurity.py); off unless a cluster admin turns it on.
    allow_privileged_templates: bool = False


#: First retry of a failed pass; doubled per further failure up to resync_seconds.
RETRY_BASE_SECONDS = 1.0


def retry_delay(failures: int, cap: float) -> float:
    """Exponential backoff for a cluster whose pass failed `failures` times in a row."""
    if failures <= 0:
        return 0.0
    return float(min(cap, RETRY_BASE_SECONDS * 2 ** min(failures - 1, 30)))


def new_key() -> str:
    """A fresh mesh key: 32 random bytes, URL-safe text (no newline, no padding issues)."""
    return secrets.token_urlsafe(32)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _decode(data: Mapping[str, str] | None) -> dict[str, str]:
    out = {}
    for k, v in (data or {}).items():
        try:
            out[k] = base64.b64decode(v).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            continue
    return out


def _encode(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode("utf-8")).decode("ascii") for k, v in data.items()}


class Reconciler:
    """Applies desired state for one PatioCluster at a time (per-cluster lock)."""

    def __init__(
        self,
        kube: Kube,
        config: Config,
        emit: EmitFn,
        *,
        clock: Callable[[], datetime] = utcnow,
        make_key: Callable[[], str] = new_key,
        probe: Callable[[str, int], str | None] = fetch_report,
        sample: Callable[
            [list[tuple[str, str]], int], Mapping[str, autoscale.Load]
        ] = loadprobe.sample,
    ) -> None:
        self.kube = kube
        self.config = config
        self.emit = emit
        self.clock = clock
        self.make_key = make_key
        self.probe = probe
        self.sample = sample
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        #: (failures in a row, monotonic time of the next retry) per failing cluster.
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        # kopf runs the timer, the cluster's event handler and pod events
        # concurrently in its thread pool; one pass at a time per cluster keeps
        # two passes from generating two different "next" keys.
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
            self._failures.pop((namespace, name), None)
        metrics.forget_cluster(namespace, name)

    def retry_at(self, key: tuple[str, str]) -> float | None:
        """When a failed cluster's next pass is due (monotonic), None when it is healthy."""
        with self._locks_guard:
            entry = self._failures.get(key)
        return entry[1] if entry else None

    def failed(self, namespace: str, name: str, exc: BaseException) -> None:
        """Schedule a retry with backoff (the resync loop runs it) and say so in an Event.

        kopf never retries `on.event` handlers, so whoever failed (a watch
        event or the resync) lands here. Events are posted on the 1st, 3rd and
        every 10th failure in a row, not on each retry.
        """
        failures = self._record((namespace, name), ok=False)
        if failures in (1, 3) or failures % 10 == 0:
            self.emit(
                {"metadata": {"namespace": namespace, "name": name}},
                "Warning",
                "ReconcileFailed",
                f"pass failed ({failures} in a row; retrying with backoff): {exc}",
            )

    def _record(self, key: tuple[str, str], ok: bool) -> int:
        with self._locks_guard:
            if ok:
                self._failures.pop(key, None)
                return 0
            failures = self._failures.get(key, (0, 0.0))[0] + 1
            delay = retry_delay(failures, self.config.resync_seconds)
            self._failures[key] = (failures, time.monotonic() + delay)
            return failures

    # -- reading -----------------------------------------------------------

    def list_pods(self, cluster: Obj) -> list[peers.PodView]:
        meta = cluster["metadata"]
        items = self.kube.list_objects(
            "v1", "Pod", meta["namespace"], names.selector_string(meta["name"])
        )
        return [peers.pod_view(p) for p in items]

    # -- the full pass -------------------------------------------------------

    def _fresh(self, namespace: str, name: str) -> Obj | None:
        """The cluster as the API server has it now; None when gone or being deleted.

        Every pass re-reads under the cluster's lock instead of trusting the
        body of the event that triggered it: two events queued behind each
        other would otherwise each act on a stale view (e.g. publish an old
        pod list over a newer one, or overwrite a newer status).
        """
        cluster = self.kube.get(names.API_VERSION, names.KIND, namespace, name)
        if cluster is None or (cluster.get("metadata") or {}).get("deletionTimestamp"):
            return None
        return cluster

    def reconcile(self, namespace: str, name: str) -> Obj | None:
        """One full, idempotent pass; returns the status written (None: no cluster)."""
        started = time.monotonic()
        result = "error"
        try:
            with self._lock(namespace, name):
                cluster = self._fresh(namespace, name)
                out = self._reconcile(cluster) if cluster is not None else None
            result = "ok"
            return out
        except Exception as exc:
            self.failed(namespace, name, exc)
            raise
        finally:
            if result == "ok":
                self._record((namespace, name), ok=True)
            metrics.observe_reconcile(result, time.monotonic() - started)

    def _reconcile(self, cluster: Obj) -> Obj:
        meta = cluster["metadata"]
        ns, cname = meta["namespace"], meta["name"]
        spec = desired.spec_of(cluster)
        problems: list[str] = []
        want = desired.desired_objects(cluster, self.config.settings)
        for warning in want.warnings:
            self.emit(cluster, "Warning", "SpecIgnored", warning)

        pod_list = self.list_pods(cluster)
        key_state = self._sync_secret(cluster, pod_list, problems)
        refused = self._refusals(cluster, spec)
        problems.extend(refused)
        published = self._sync_peers(cluster, pod_list)

        for obj in want.objects:
            if refused and obj["kind"] == "StatefulSet":
                continue  # the workers wait until the spec is fixed; others are harmless
            try:
                self.kube.apply(obj)
            except ApiException as exc:
                if exc.status == 404 and obj["kind"] == "ServiceMonitor":
                    problems.append(
                        "spec.metrics.serviceMonitor is true but "
                        "monitoring.coreos.com/v1 is not installed"
                    )
                    continue
                if exc.status in (400, 403, 422):
                    problems.append(f"{obj['kind']} {obj['metadata']['name']}: {_api_reason(exc)}")
                    continue
                raise
        for api_version, kind, name in want.absent:
            try:
                if self.kube.delete(api_version, kind, ns, name):
                    log.info("deleted %s %s/%s no longer in the spec", kind, ns, name)
            except ApiException as exc:
                if exc.status not in (403, 404, 405):
                    raise

        sts = self.kube.get("apps/v1", "StatefulSet", ns, names.statefulset_name(cname))
        return self._write_status(
            cluster, sts, pods=pod_list, published=published, key_state=key_state, problems=problems
        )

    def _refusals(self, cluster: Obj, spec: Obj) -> list[str]:
        """Why the workers' StatefulSet must not be applied as the spec stands.

        A template breaking the restricted Pod Security profile (unless
        allowed), or an existingSecret that is missing or not labelled for
        patio: mounting it would hand any Secret of the namespace to the
        workers' image.
        """
        ns, cname = cluster["metadata"]["namespace"], cluster["metadata"]["name"]
        out: list[str] = []
        if not self.config.allow_privileged_templates:
            out.extend(podsecurity.violations(cname, spec))
            if out:
                out.append(podsecurity.REFUSAL_HINT)
        for field_name, section in (
            ("spec.auth.existingSecret", "auth"),
            ("spec.tls.existingSecret", "tls"),
        ):
            secret_name = (spec.get(section) or {}).get("existingSecret")
            if secret_name:
                secret = self.kube.get("v1", "Secret", ns, secret_name)
                problem = podsecurity.secret_problem(field_name, secret_name, secret)
                if problem is not None:
                    out.append(problem)
        return out

    # -- lighter pass for pod events ----------------------------------------

    def pods_changed(self, namespace: str, name: str) -> Obj | None:
        """Re-publish peers and refresh status; no other object is touched.

        Pod events are frequent (every probe flip), so this path reads the
        cluster, its pods, StatefulSet and Secret and writes at most the
        ConfigMap and the status, instead of applying every child object.
        """
        with self._lock(namespace, name):
            cluster = self._fresh(namespace, name)
            if cluster is None:
                return None
            pod_list = self.list_pods(cluster)
            published = self._sync_peers(cluster, pod_list)
            sts = self.kube.get("apps/v1", "StatefulSet", namespace, names.statefulset_name(name))
            previous = cluster.get("status") or {}
            # Problems found by the last full pass stay until the next one.
            problems = [
                c.get("message", "")
                for c in previous.get("conditions") or []
                if c.get("type") == "Degraded" and c.get("reason") == "ReconcileError"
            ]
            return self._write_status(
                cluster,
                sts,
                pods=pod_list,
                published=published,
                key_state=self._read_key_state(cluster),
                problems=problems,
            )

    def _read_key_state(self, cluster: Obj) -> rotation.KeyState | None:
        """The rotation state from the generated Secret (None for existingSecret or none yet)."""
        if (desired.spec_of(cluster).get("auth") or {}).get("existingSecret"):
            return None
        meta = cluster["metadata"]
        secret = self.kube.get(
            "v1", "Secret", meta["namespace"], names.auth_secret_name(meta["name"])
        )
        if secret is None:
            return None
        return rotation.from_secret(
            _decode(secret.get("data")), (secret.get("metadata") or {}).get("annotations") or {}
        )

    # -- autoscaling -----------------------------------------------------------

    def autoscale(self, namespace: str, name: str) -> autoscale.Decision | None:
        """Sample the workers' load and move spec.replicas (autoscale.py decides).

        Runs from the resync loop every tick for clusters with autoscaling
        enabled. A change goes through the /scale subresource with the
        resourceVersion just read, so a concurrent edit makes it fail (409)
        and the next tick decides again. The StatefulSet follows in the full
        pass that the new generation triggers.
        """
        with self._lock(namespace, name):
            cluster = self._fresh(namespace, name)
            if cluster is None:
                return None
            spec = desired.spec_of(cluster)
            policy = autoscale.policy_of(spec)
            if policy is None:
                return None
            pod_list = self.list_pods(cluster)
            ready = [(p.name, p.ip) for p in pod_list if p.ready and not p.terminating and p.ip]
            loads = self.sample(ready, int(spec["metrics"]["port"]))
            previous = (cluster.get("status") or {}).get("autoscaling") or {}
            current = int(spec["replicas"])
            now = self.clock()
            decision = autoscale.decide(
                policy,
                current=current,
                pods=pod_list,
                loads=loads,
                pending=autoscale.pending_from_status(previous.get("pending")),
                now=now,
            )
            new: Obj = {
                "desiredReplicas": decision.replicas,
                "pending": decision.pending.to_status() if decision.pending else None,
                "lastScaleTime": previous.get("lastScaleTime"),
                "lastScaleReason": previous.get("lastScaleReason"),
                "message": decision.reason,
            }
            last_written = previous.get("desiredReplicas")
            if last_written is not None and int(last_written) != current:
                self.emit(
                    cluster,
                    "Normal",
                    "ManualScale",
                    f"spec.replicas was set to {current} by someone else; with "
                    "spec.autoscaling.enabled the autoscaler owns it and continues from there",
                )
            if decision.changes(current):
                body = {
                    "metadata": {"resourceVersion": cluster["metadata"]["resourceVersion"]},
                    "spec": {"replicas": decision.replicas},
                }
                self.kube.patch_scale(namespace, name, body)
                new["lastScaleTime"] = rotation.iso(now)
                new["lastScaleReason"] = decision.reason
                metrics.AUTOSCALE_CHANGES.labels(
                    direction="up" if decision.replicas > current else "down"
                ).inc()
                self.emit(
                    cluster,
                    "Normal",
                    "ScaledUp" if decision.replicas > current else "ScaledDown",
                    decision.reason,
                )
                log.info("autoscaled %s/%s: %s", namespace, name, decision.reason)
            if any(previous.get(k) != v for k, v in new.items()):
                self.kube.patch_status(namespace, name, {"autoscaling": new})
            return decision

    # -- pieces ----------------------------------------------------------------

    def _sync_peers(self, cluster: Obj, pods: list[peers.PodView]) -> list[str]:
        meta = cluster["metadata"]
        port = int(desired.spec_of(cluster)["port"])
        expected = peers.peer_addresses(pods, port)
        text = peers.render(expected)
        cm = self.kube.get(
            "v1", "ConfigMap", meta["namespace"], names.peers_configmap_name(meta["name"])
        )
        if (
            cm is None
            or (cm.get("data") or {}).get(names.PEERS_ITEM) != text
            or not _owned(cm, cluster)
        ):
            self.kube.apply(desired.peers_configmap(cluster, text))
            metrics.PEERS_UPDATES.inc()
            log.info("published %d peers for %s/%s", len(expected), meta["namespace"], meta["name"])
        return expected

    def _sync_secret(
        self, cluster: Obj, pods: list[peers.PodView], problems: list[str]
    ) -> rotation.KeyState | None:
        """Ensure the auth Secret exists and advance a rotation in progress."""
        meta = cluster["metadata"]
        ns = meta["namespace"]
        spec = desired.spec_of(cluster)
        auth = spec.get("auth") or {}
        if auth.get("existingSecret"):
            return None  # checked (and the workers held back) by _refusals

        name = names.auth_secret_name(meta["name"])
        secret = self.kube.get("v1", "Secret", ns, name)
        state = None
        if secret is not None:
            state = rotation.from_secret(
                _decode(secret.get("data")), (secret.get("metadata") or {}).get("annotations") or {}
            )
        now = self.clock()
        requested = str(auth.get("rotation") or "")
        if state is None:
            previous_gen = int((cluster.get("status") or {}).get("keyGeneration") or 0)
            state = rotation.fresh(self.make_key(), requested, previous_gen + 1, now)
            obj = desired.auth_secret(cluster, _encode(state.data()), state.annotations())
            if secret is None:
                self.kube.create(obj)
            else:
                obj["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
                self.kube.replace(obj)
            if previous_gen > 0:
                self.emit(
                    cluster,
                    "Warning",
                    "AuthKeyRegenerated",
                    f"auth Secret {name} was deleted or lost its key; generated key generation "
                    f"{state.generation}. Workers switch as the kubelet refreshes their volume.",
                )
            else:
                self.emit(
                    cluster, "Normal", "AuthKeyCreated", f"generated the mesh key in Secret {name}"
                )
            return state

        wants_rotation = requested and requested != state.token
        if state.phase == rotation.IDLE and not wants_rotation:
            return state
        metrics_port = int(spec["metrics"]["port"])
        reports = probe_all(
            {p.name: (p.ip, metrics_port) for p in pods if p.ready and not p.terminating and p.ip},
            self.probe,
        )
        step = rotation.advance(
            state,
            requested_token=requested,
            reports=reports,
            now=now,
            mode=self.config.rotation_mode,
            settle_seconds=self.config.settle_seconds,
            new_key=self.make_key,
        )
        if step.state is None:
            log.info("rotation of %s/%s waits: %s", ns, meta["name"], step.reason)
            return state
        obj = desired.auth_secret(cluster, _encode(step.state.data()), step.state.annotations())
        obj["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]  # type: ignore[index]
        # PUT with resourceVersion: a concurrent writer makes this fail (409)
        # instead of two keys being generated; the next pass re-reads.
        self.kube.replace(obj)
        metrics.ROTATION_STEPS.labels(step=step.state.phase).inc()
        self.emit(cluster, "Normal", step.event, step.reason)
        return step.state

    def _write_status(
        self,
        cluster: Obj,
        sts: Obj | None,
        *,
        pods: list[peers.PodView],
        published: list[str],
        key_state: rotation.KeyState | None,
        problems: list[str],
    ) -> Obj:
        meta = cluster["metadata"]
        previous = cluster.get("status") or {}
        if key_state is not None:
            phase, token, since, gen = (
                key_state.phase,
                key_state.token,
                key_state.since,
                key_state.generation,
            )
        else:  # existingSecret (the user rotates; nothing to count) or no Secret yet
            phase, token, since, gen = "Idle", "", "", int(previous.get("keyGeneration") or 0)
        observed = status.Observed(
            statefulset=sts,
            pods=pods,
            published_peers=published,
            expected_peers=peers.peer_addresses(pods, int(desired.spec_of(cluster)["port"])),
            rotation_phase=phase,
            rotation_token=token,
            rotation_since=since,
            key_generation=gen,
            problems=problems,
        )
        new = status.compute_status(cluster, observed, previous, rotation.iso(self.clock()))
        if _status_differs(previous, new):
            self.kube.patch_status(meta["namespace"], meta["name"], new)
            for ctype, cstatus, reason, message in status.transitions(previous, new):
                if ctype in ("Ready", "Degraded", "MeshReady"):
                    bad = (ctype == "Degraded") == (cstatus == "True")
                    self.emit(
                        cluster,
                        "Warning" if bad else "Normal",
                        reason,
                        f"{ctype}={cstatus}: {message}",
                    )
        ready = (status.condition(new, "Ready") or {}).get("status") == "True"
        metrics.set_cluster_ready(meta["namespace"], meta["name"], ready)
        return new


def _status_differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


def _owned(obj: Mapping[str, Any], cluster: Mapping[str, Any]) -> bool:
    uid = cluster["metadata"].get("uid")
    return any(
        ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or []
    )


def _api_reason(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
