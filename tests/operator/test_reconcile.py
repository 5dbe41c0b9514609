"""The Reconciler against an in-memory API: level-based, idempotent, restartable.

The fake stores plain dicts and bumps resourceVersion on every write, which
is all the reconciler relies on; the real API server is exercised by
test_operator_on_kube.py.
"""

from __future__ import annotations

import base64
import copy
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes.client import ApiException
from operator_factories import cluster, pod
from patio_operator import autoscale, desired, kube, peers, rotation
from patio_operator.reconciler import Config, Reconciler

Obj = dict[str, Any]


def strong_key(n: int) -> str:
    """Generated keys are strong; weak test keys would all share one fingerprint."""
    return f"key-{n}-0123456789abcdefghijklmnopqrstuv"


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.rv = itertools.count(1)
        self.writes: list[tuple[str, str, str]] = []
        self.missing_kinds: set[str] = set()
        self.pods: list[Obj] = []

    def _key(self, kind: str, ns: str, name: str) -> tuple[str, str, str]:
        return (kind, ns, name)

    def _store(self, obj: Obj, verb: str) -> Obj:
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(next(self.rv))
        key = self._key(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        self.objects[key] = obj
        self.writes.append((verb, obj["kind"], obj["metadata"]["name"]))
        return copy.deepcopy(obj)

    def get(self, api_version: str, kind: str, ns: str, name: str) -> Obj | None:
        obj = self.objects.get(self._key(kind, ns, name))
        return copy.deepcopy(obj) if obj else None

    def list_objects(self, api_version: str, kind: str, ns: str, selector: str) -> list[Obj]:
        assert kind == "Pod" and selector == "patio.dev/cluster=demo"
        return copy.deepcopy(self.pods)

    def apply(self, obj: Obj) -> Obj:
        if obj["kind"] in self.missing_kinds:
            raise ApiException(status=404, reason="Not Found")
        old = self.get(
            obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        )
        if old is not None:
            merged = copy.deepcopy(obj)
            merged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if "status" in old:
                merged["status"] = old["status"]
            if merged == old:
                return old  # the API server does not write a no-op apply
        return self._store(obj, "apply")

    def create(self, obj: Obj) -> Obj:
        if self.get(
            obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        ):
            raise ApiException(status=409, reason="AlreadyExists")
        return self._store(obj, "create")

    def replace(self, obj: Obj) -> Obj:
        old = self.objects.get(
            self._key(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        )
        if old is None:
            raise ApiException(status=404, reason="Not Found")
        if old["metadata"]["resourceVersion"] != obj["metadata"].get("resourceVersion"):
            raise ApiException(status=409, reason="Conflict")
        return self._store(obj, "replace")

    def delete(self, api_version: str, kind: str, ns: str, name: str) -> bool:
        if kind in self.missing_kinds:
            raise ApiException(status=404, reason="Not Found")
        return self.objects.pop(self._key(kind, ns, name), None) is not None

    def patch_scale(self, ns: str, name: str, body: Obj) -> Obj:
        obj = self.objects[("PatioCluster", ns, name)]
        if obj["metadata"].get("resourceVersion") != body["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        obj["spec"]["replicas"] = body["spec"]["replicas"]
        self.writes.append(("scale", "PatioCluster", name))
        return {}

    def patch_status(self, ns: str, name: str, status: Obj) -> Obj:
        self.writes.append(("status", "PatioCluster", name))
        self.objects[("PatioCluster", ns, name)]["status"] = copy.deepcopy(status)
        return {}

    def secret_data(self, name: str = "demo-auth") -> dict[str, str]:
        obj = self.objects[("Secret", "ns1", name)]
        return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Harness:
    def __init__(self, mode: str = "metrics", *, allow_privileged: bool = False) -> None:
        self.kube = FakeKube()
        self.clock = Clock()
        self.events: list[tuple[str, str, str]] = []
        self.reports: dict[str, str | None] = {}
        counter = itertools.count(1)
        self.rec = Reconciler(
            self.kube,  # type: ignore[arg-type]
            Config(
                settings=desired.Settings(default_image="img:1"),
                rotation_mode=mode,
                settle_seconds=30,
                allow_privileged_templates=allow_privileged,
            ),
            lambda body, t, reason, msg: self.events.append((t, reason, msg)),
            clock=self.clock,
            make_key=lambda: strong_key(next(counter)),
            probe=lambda ip, port: self.reports.get(ip),
            sample=lambda targets, port: {n: self.loads[n] for n, _ in targets if n in self.loads},
        )
        self.loads: dict[str, autoscale.Load] = {}
        self.kube.pods = [pod(f"demo-{i}", f"10.0.0.{i + 1}", ready=True) for i in range(3)]
        self.pods = [peers.pod_view(p) for p in self.kube.pods]

    def store(self, c: Obj) -> None:
        """Put the cluster (as the user last applied it) into the fake API."""
        key = ("PatioCluster", "ns1", "demo")
        old = self.kube.objects.get(key)
        obj = copy.deepcopy(c)
        if old is not None and "status" in old:
            obj["status"] = old["status"]
        self.kube.objects[key] = obj

    def run(self, c: Obj) -> Obj:
        self.store(c)
        st = self.rec.reconcile("ns1", "demo")
        assert st is not None
        return st


def test_first_pass_creates_everything_owned_and_writes_status() -> None:
    h = Harness()
    c = cluster()
    st = h.run(c)
    kinds = sorted(k for k, _, _ in h.kube.objects if k != "PatioCluster")
    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "StatefulSet",
    ]
    data = h.kube.secret_data()
    assert data == {"key": strong_key(1)}
    cm = h.kube.objects[("ConfigMap", "ns1", "demo-peers")]
    assert peers.parse(cm["data"]["peers"]) == [f"10.0.0.{i}:15383" for i in (1, 2, 3)]
    assert st["keyGeneration"] == 1 and st["peers"] == 3
    assert ("Normal", "AuthKeyCreated") in [(t, r) for t, r, _ in h.events]


def test_gone_or_deleting_cluster_is_left_alone() -> None:
    h = Harness()
    assert h.rec.reconcile("ns1", "demo") is None
    c = cluster()
    c["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    h.store(c)
    assert h.rec.reconcile("ns1", "demo") is None
    assert h.rec.pods_changed("ns1", "demo") is None
    assert h.kube.writes == []


def test_second_pass_writes_nothing() -> None:
    h = Harness()
    c = cluster()
    h.run(c)
    before = list(h.kube.writes)
    h.run(c)
    assert h.kube.writes == before


def test_restarted_operator_creates_no_duplicates_and_keeps_the_key() -> None:
    h = Harness()
    c = cluster()
    h.run(c)
    key = h.kube.secret_data()["key"]
    # A new Reconciler (fresh process) over the same API state.
    h2 = Harness()
    h2.kube = h.kube
    h2.rec.kube = h.kube  # type: ignore[assignment]
    writes = len(h.kube.writes)
    h2.run(c)
    assert h.kube.secret_data()["key"] == key
    assert len(h.kube.writes) == writes


def test_deleted_generated_secret_gets_a_new_key_and_generation() -> None:
    h = Harness()
    c = cluster()
    h.run(c)
    del h.kube.objects[("Secret", "ns1", "demo-auth")]
    st = h.run(c)
    assert h.kube.secret_data()["key"] == strong_key(2)
    assert st["keyGeneration"] == 2
    assert ("Warning", "AuthKeyRegenerated") in [(t, r) for t, r, _ in h.events]


def test_hand_edited_statefulset_is_reapplied() -> None:
    h = Harness()
    c = cluster()
    h.run(c)
    sts = h.kube.objects[("StatefulSet", "ns1", "demo")]
    sts["spec"]["replicas"] = 9
    h.run(c)
    assert h.kube.objects[("StatefulSet", "ns1", "demo")]["spec"]["replicas"] == 3


def test_rotation_across_passes() -> None:
    h = Harness()
    c = cluster()
    h.run(c)
    fp = rotation.fingerprint
    h.reports = {p.ip: fp(strong_key(1)) for p in h.pods}
    c["spec"]["auth"] = {"rotation": "2026-11"}
    st = h.run(c)
    assert h.kube.secret_data() == {"key": strong_key(1), "next-key": strong_key(2)}
    assert st["rotation"]["phase"] == "Accepting"
    assert any(c_["reason"] == "RotatingKey" for c_ in st["conditions"])

    h.clock.now += timedelta(seconds=31)
    h.run(c)
    assert h.kube.secret_data() == {"key": strong_key(2), "next-key": strong_key(1)}

    h.clock.now += timedelta(seconds=31)
    h.run(c)  # workers still present key-1: A stays accepted
    assert h.kube.secret_data() == {"key": strong_key(2), "next-key": strong_key(1)}
    h.reports = {p.ip: fp(strong_key(2)) for p in h.pods}
    h.run(c)
    assert h.kube.secret_data() == {"key": strong_key(2)}
    h.clock.now += timedelta(seconds=31)
    st = h.run(c)
    assert st["rotation"]["phase"] == "Idle"
    assert st["keyGeneration"] == 2
    reasons = [r for _, r, _ in h.events]
    for r in ("RotationStarted", "RotationPresenting", "RotationRetiring", "RotationCompleted"):
        assert r in reasons


def test_concurrent_secret_writer_conflicts_instead_of_forking_keys() -> None:
    h = Harness()
    c = cluster()
    h.run(c)
    c["spec"]["auth"] = {"rotation": "x"}
    real_get = h.kube.get

    def stale_get(api_version: str, kind: str, ns: str, name: str) -> Obj | None:
        obj = real_get(api_version, kind, ns, name)
        if obj and kind == "Secret":
            obj["metadata"]["resourceVersion"] = "0"  # someone wrote after our read
        return obj

    h.kube.get = stale_get  # type: ignore[method-assign]
    with pytest.raises(ApiException) as err:
        h.run(c)
    assert err.value.status == 409
    assert h.kube.secret_data() == {"key": strong_key(1)}


def test_missing_existing_secret_and_missing_servicemonitor_crd_are_degraded() -> None:
    h = Harness()
    h.kube.missing_kinds.add("ServiceMonitor")
    c = cluster(auth={"existingSecret": "nope"}, metrics={"serviceMonitor": True})
    st = h.run(c)
    degraded = next(x for x in st["conditions"] if x["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ReconcileError"
    assert "existingSecret 'nope' not found" in degraded["message"]
    assert "monitoring.coreos.com" in degraded["message"]
    assert ("Secret", "ns1", "demo-auth") not in h.kube.objects  # never generated
    # The workers wait for the Secret: one created later without the patio
    # label must not be mounted by a StatefulSet applied now.
    assert ("StatefulSet", "ns1", "demo") not in h.kube.objects
    assert ("Service", "ns1", "demo") in h.kube.objects


def degraded_message(st: Obj) -> str:
    degraded = next(x for x in st["conditions"] if x["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ReconcileError"
    return str(degraded["message"])


def test_template_breaking_pod_security_is_refused_naming_the_field() -> None:
    # Issue 16 item 9: a hostPath volume and a foreign ServiceAccount became a
    # StatefulSet as written.
    h = Harness()
    c = cluster(
        podTemplate={
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
            "serviceAccountName": "ci-deployer",
        }
    )
    message = degraded_message(h.run(c))
    assert "spec.podTemplate.volumes[0].hostPath" in message
    assert "spec.podTemplate.serviceAccountName: 'ci-deployer'" in message
    assert "allowPrivilegedTemplates" in message
    assert ("StatefulSet", "ns1", "demo") not in h.kube.objects
    # Fixed spec: applied on the next pass, and the condition clears.
    del c["spec"]["podTemplate"]
    st = h.run(c)
    assert ("StatefulSet", "ns1", "demo") in h.kube.objects
    assert next(x for x in st["conditions"] if x["type"] == "Degraded")["status"] == "False"


def test_a_cluster_admin_can_allow_privileged_templates() -> None:
    h = Harness(allow_privileged=True)
    c = cluster(podTemplate={"volumes": [{"name": "root", "hostPath": {"path": "/"}}]})
    h.run(c)
    sts = h.kube.objects[("StatefulSet", "ns1", "demo")]
    volumes = sts["spec"]["template"]["spec"]["volumes"]
    assert {"name": "root", "hostPath": {"path": "/"}} in volumes


def user_secret(name: str, labels: dict[str, str]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "ns1", "labels": labels},
        "data": {"key": base64.b64encode(b"k" * 32).decode()},
    }


def test_existing_secrets_must_be_labelled_for_patio() -> None:
    # Issue 16 item 9: existingSecret mounted any Secret of the namespace.
    h = Harness()
    h.kube._store(user_secret("db-password", {"app": "db"}), "create")
    h.kube._store(user_secret("certs", {}), "create")
    c = cluster(auth={"existingSecret": "db-password"}, tls={"existingSecret": "certs"})
    message = degraded_message(h.run(c))
    assert "spec.auth.existingSecret 'db-password' is not labelled for patio" in message
    assert "spec.tls.existingSecret 'certs' is not labelled for patio" in message
    assert ("StatefulSet", "ns1", "demo") not in h.kube.objects
    for name in ("db-password", "certs"):
        h.kube._store(user_secret(name, {"patio.dev/mountable": "true"}), "update")
    h.run(c)
    sts = h.kube.objects[("StatefulSet", "ns1", "demo")]
    names_mounted = {
        v.get("secret", {}).get("secretName") for v in sts["spec"]["template"]["spec"]["volumes"]
    }
    assert {"db-password", "certs"} <= names_mounted


class RecordingKube(FakeKube):
    """FakeKube noting the RBAC (resource, verb) each call of the real Kube needs."""

    # Kube method -> the HTTP verb it sends (kube.py), as RBAC names it.
    VERBS = {
        "get": "get",
        "list_objects": "list",
        "apply": "patch",
        "create": "create",
        "replace": "update",
        "delete": "delete",
    }

    def __init__(self) -> None:
        super().__init__()
        self.used: set[tuple[tuple[str, str], str]] = set()
        self._inside = False

    def _note(self, api_version: str, kind: str, verb: str) -> None:
        group = api_version.rpartition("/")[0]
        self.used.add(((group, kube.PLURALS[kind]), verb))
        if verb == "patch":  # server-side apply: create when the object is new
            self.used.add(((group, kube.PLURALS[kind]), "create"))

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        verbs = type(self).VERBS
        if name not in verbs or super().__getattribute__("_inside"):
            return attr

        def recorded(*args: Any) -> Any:
            obj = args[0] if len(args) == 1 else {"apiVersion": args[0], "kind": args[1]}
            self._note(obj["apiVersion"], obj["kind"], verbs[name])
            self._inside = True  # FakeKube's own get() inside apply() is no request
            try:
                return attr(*args)
            finally:
                self._inside = False

        return recorded

    def patch_status(self, ns: str, name: str, status: Obj) -> Obj:
        self.used.add((("patio.dev", "patioclusters/status"), "patch"))
        return super().patch_status(ns, name, status)

    def patch_scale(self, ns: str, name: str, body: Obj) -> Obj:
        self.used.add((("patio.dev", "patioclusters/scale"), "patch"))
        return super().patch_scale(ns, name, body)


def test_the_code_uses_exactly_the_declared_permissions() -> None:
    # With tests/operator/test_chart.py (chart == kube.PERMISSIONS) this pins
    # the RBAC to what the operator calls, in both directions.
    h = Harness()
    h.kube = RecordingKube()
    h.rec.kube = h.kube  # type: ignore[assignment]
    h.kube.pods = [pod(f"demo-{i}", f"10.0.0.{i + 1}", ready=True) for i in range(3)]
    c = cluster()
    h.run(c)  # generated key, children applied, optional ones deleted
    h.reports = {p.ip: rotation.fingerprint(strong_key(1)) for p in h.pods}
    c["spec"]["auth"] = {"rotation": "r1"}
    h.run(c)  # rotation: the Secret is updated
    h.kube._store(user_secret("mine", {"patio.dev/mountable": "true"}), "create")
    busy = cluster(auth={"existingSecret": "mine"}, networkPolicy={"enabled": True},
                   autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 5},
                   metrics={"serviceMonitor": True})  # fmt: skip
    h.run(busy)
    h.rec.pods_changed("ns1", "demo")
    h.loads = {p.name: autoscale.Load(4, 4, 4) for p in h.pods}
    busy["metadata"]["resourceVersion"] = "1"
    h.store(busy)
    assert h.rec.autoscale("ns1", "demo") is not None  # the autoscaler writes /scale
    used = set(h.kube.used)
    # Not calls of the reconciler: kopf lists and watches what its handlers
    # watch, the resync lists clusters, Events are posted by kube.post_event,
    # and blockOwnerDeletion needs update on the finalizers subresource.
    used |= {
        (("patio.dev", "patioclusters"), "list"),
        (("patio.dev", "patioclusters"), "watch"),
        (("", "pods"), "watch"),
        (("", "events"), "create"),
        (("patio.dev", "patioclusters/finalizers"), "update"),
    }
    declared = {(resource, verb) for resource, verbs in kube.PERMISSIONS.items() for verb in verbs}
    assert used == declared


def test_real_kube_refuses_a_request_outside_its_permissions() -> None:
    class NoNetwork:
        def param_serialize(self, **kwargs: Any) -> Any:
            raise AssertionError("the request must be refused before it is sent")

    client = kube.Kube(NoNetwork())  # type: ignore[arg-type]
    with pytest.raises(PermissionError, match="may not list secrets"):
        client.list_objects("v1", "Secret", "ns1", "app=x")
    with pytest.raises(PermissionError, match="may not delete statefulsets"):
        client.delete("apps/v1", "StatefulSet", "ns1", "demo")


def test_pod_events_republish_peers_without_touching_other_objects() -> None:
    h = Harness()
    c = cluster()
    h.run(c)
    writes = len(h.kube.writes)
    h.kube.pods[2] = pod("demo-2", "10.0.0.9", ready=False)
    st = h.rec.pods_changed("ns1", "demo")
    assert st is not None
    new_writes = h.kube.writes[writes:]
    assert [w[1] for w in new_writes] == ["ConfigMap", "PatioCluster"]
    assert st["keyGeneration"] == 1  # read from the Secret, not from a stale status
    cm = h.kube.objects[("ConfigMap", "ns1", "demo-peers")]
    assert "10.0.0.9:15383" in peers.parse(cm["data"]["peers"])
    assert st["readyReplicas"] == 2


def test_autoscale_writes_scale_status_and_an_event() -> None:
    h = Harness()
    c = cluster(autoscaling={"enabled": True, "maxReplicas": 5, "maxStep": 2})
    c["metadata"]["resourceVersion"] = "7"
    h.store(c)
    h.loads = {f"demo-{i}": autoscale.Load(4, 4, 4) for i in range(3)}  # 24 calls on 12 slots
    decision = h.rec.autoscale("ns1", "demo")
    assert decision is not None and decision.replicas == 5
    stored = h.kube.objects[("PatioCluster", "ns1", "demo")]
    assert stored["spec"]["replicas"] == 5
    auto = stored["status"]["autoscaling"]
    assert auto["desiredReplicas"] == 5 and auto["lastScaleReason"].startswith("scaled up")
    assert auto["lastScaleTime"] == "2026-11-25T12:00:00Z"
    assert [e[1] for e in h.events] == ["ScaledUp"]
    # Someone scales by hand within bounds: noted in an Event, the autoscaler continues.
    stored["spec"]["replicas"] = 3
    h.loads = {f"demo-{i}": autoscale.Load(2, 0, 4) for i in range(3)}
    h.rec.autoscale("ns1", "demo")
    assert h.events[-1][1] == "ManualScale"


def test_autoscale_is_off_unless_enabled() -> None:
    h = Harness()
    h.store(cluster(autoscaling={"maxReplicas": 5}))
    assert h.rec.autoscale("ns1", "demo") is None
    assert not [w for w in h.kube.writes if w[0] == "scale"]


def test_a_failed_pass_is_retried_with_backoff_and_posts_an_event() -> None:
    h = Harness()
    h.store(cluster())
    h.kube.missing_kinds.add("StatefulSet")  # the apply raises 404: not a handled problem
    with pytest.raises(ApiException):
        h.rec.reconcile("ns1", "demo")
    assert h.rec.retry_at(("ns1", "demo")) is not None
    assert h.events[-1][:2] == ("Warning", "ReconcileFailed")
    h.kube.missing_kinds.clear()
    h.rec.reconcile("ns1", "demo")
    assert h.rec.retry_at(("ns1", "demo")) is None
