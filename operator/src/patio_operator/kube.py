"""A thin, dict-in dict-out client for the few API calls the operator makes.

It wraps the official client's low-level `call_api`, so objects stay plain
dicts end to end (the pure functions build dicts; no model classes), and one
`apply` serves every kind through server-side apply. Errors surface as
`kubernetes.client.ApiException`; 404 on reads becomes None.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client import ApiException

from patio_operator import names

Obj = dict[str, Any]
log = logging.getLogger("patio_operator")

#: kind -> plural. Every kind the operator touches is namespaced.
PLURALS = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Service": "services",
    "Pod": "pods",
    "Event": "events",
    "StatefulSet": "statefulsets",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "ServiceMonitor": "servicemonitors",
    "Lease": "leases",
    names.KIND: names.PLURAL,
}


#: (API group, resource) -> exactly the verbs the operator uses on it: the
#: calls of `Kube` made by the reconciler and the resync, kopf's list and
#: watch for the resources its handlers watch (handlers.py), Events, and
#: `update` on patioclusters/finalizers, which the API server requires for
#: blockOwnerDeletion on the children's owner references. Server-side apply
#: is a `patch` that also needs `create` when the object does not exist yet
#: (the API server checks it then). The chart's RBAC is asserted
#: equal to this table (tests/operator/test_chart.py), the table to what the
#: code calls (tests/operator/test_reconcile.py), and `Kube` refuses any
#: request outside it, so none of the three can drift.
PERMISSIONS: dict[tuple[str, str], frozenset[str]] = {
    (names.GROUP, names.PLURAL): frozenset({"get", "list", "watch"}),
    (names.GROUP, f"{names.PLURAL}/status"): frozenset({"patch"}),
    # The autoscaler's only write to the custom resource (spec.replicas).
    (names.GROUP, f"{names.PLURAL}/scale"): frozenset({"patch"}),
    (names.GROUP, f"{names.PLURAL}/finalizers"): frozenset({"update"}),
    ("", "pods"): frozenset({"list", "watch"}),
    ("", "configmaps"): frozenset({"get", "create", "patch"}),
    # Only by name: the generated key is created and rotated (update with
    # resourceVersion); a user's existingSecret is only read for its label.
    ("", "secrets"): frozenset({"get", "create", "update"}),
    ("", "services"): frozenset({"create", "patch"}),
    ("", "events"): frozenset({"create"}),
    ("apps", "statefulsets"): frozenset({"get", "create", "patch"}),
    ("policy", "poddisruptionbudgets"): frozenset({"create", "patch"}),
    ("networking.k8s.io", "networkpolicies"): frozenset({"create", "patch", "delete"}),
    ("monitoring.coreos.com", "servicemonitors"): frozenset({"create", "patch", "delete"}),
}

#: The leader Lease (leader.py), granted by a Role of its own in the
#: operator's namespace whatever namespaces it watches (rbac.yaml, asserted
#: equal by tests/operator/test_chart.py).
LEADER_PERMISSIONS: dict[tuple[str, str], frozenset[str]] = {
    ("coordination.k8s.io", "leases"): frozenset({"get", "create", "update"}),
}

_VERB_OF_METHOD = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


#: Content type of a server-side apply: a patch that may create.
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"


def permission_for(
    method: str, url: str, content_type: str = ""
) -> tuple[tuple[str, str], set[str]]:
    """((group, resource), verbs) that RBAC checks for one request of `Kube`."""
    parts = url.split("?", 1)[0].strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[:1] == ["namespaces"]:
        rest = rest[2:]
    resource = "/".join([rest[0], *rest[2:3]])  # plural, plus a subresource
    verb = ("get" if len(rest) > 1 else "list") if method == "GET" else _VERB_OF_METHOD[method]
    return (group, resource), {verb, "create"} if content_type == APPLY_CONTENT_TYPE else {verb}


def load_config() -> None:
    """In-cluster service account first, else the kubeconfig (KUBECONFIG)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


def path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    out = f"{base}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{out}/{name}" if name else out


class Kube:
    """The operator's API access. One instance per process; thread-safe as the client is."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or client.ApiClient()

    def _call(
        self,
        method: str,
        url: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        resource, verbs = permission_for(method, url, content_type)
        allowed = PERMISSIONS.get(resource) or LEADER_PERMISSIONS.get(resource, frozenset())
        if missing := verbs - allowed:
            # A bug, not a runtime condition: the chart grants exactly PERMISSIONS.
            raise PermissionError(
                f"the operator may not {'/'.join(sorted(missing))} {resource[1]} "
                f"({resource[0] or 'core'}): add it to kube.PERMISSIONS and "
                "charts/patio/templates/rbac.yaml together"
            )
        method_, url_, headers, body_, post = self.api.param_serialize(
            method=method,
            resource_path=url,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(
            method_, url_, header_params=headers, body=body_, post_params=post, _request_timeout=30
        )
        resp.read()  # type: ignore[no-untyped-call]
        raw = resp.data or b""
        if not 200 <= resp.status <= 299:
            raise ApiException.from_response(
                http_resp=resp, body=raw.decode("utf-8", "replace"), data=None
            )
        return json.loads(raw) if raw else {}

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            return self._call("GET", path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_objects(self, api_version: str, kind: str, namespace: str, selector: str) -> list[Obj]:
        out = self._call(
            "GET", path(api_version, kind, namespace), query=[("labelSelector", selector)]
        )
        return list(out.get("items") or [])

    def list_clusters(self, namespaces: list[str]) -> list[Obj]:
        """PatioClusters in the given namespaces (all namespaces when empty)."""
        if not namespaces:
            out = self._call("GET", f"/apis/{names.API_VERSION}/{names.PLURAL}")
            return list(out.get("items") or [])
        items: list[Obj] = []
        for ns in namespaces:
            out = self._call("GET", path(names.API_VERSION, names.KIND, ns))
            items.extend(out.get("items") or [])
        return items

    def apply(self, obj: Obj) -> Obj:
        """Server-side apply with force: the operator owns the fields it sets."""
        meta = obj["metadata"]
        return self._call(
            "PATCH",
            path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]),
            body=json.dumps(obj),
            query=[("fieldManager", names.FIELD_MANAGER), ("force", "true")],
            content_type=APPLY_CONTENT_TYPE,
        )

    def create(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        return self._call("POST", path(obj["apiVersion"], obj["kind"], meta["namespace"]), body=obj)

    def replace(self, obj: Obj) -> Obj:
        """PUT with the resourceVersion inside obj: fails with 409 if someone wrote in between."""
        meta = obj["metadata"]
        return self._call(
            "PUT", path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]), body=obj
        )

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete; False when it was not there (or the kind is not installed)."""
        try:
            self._call("DELETE", path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """Record a core/v1 Event about `involved`; best effort, never raises.

        Posted directly rather than through kopf.event, which only works
        inside kopf's handler context (the periodic resync runs outside it).
        """
        meta = involved.get("metadata") or {}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{meta.get('name', 'patio')}.",
                "namespace": meta.get("namespace"),
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", names.API_VERSION),
                "kind": involved.get("kind", names.KIND),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": names.FIELD_MANAGER},
            "reportingComponent": names.FIELD_MANAGER,
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._call("POST", path("v1", "Event", str(meta.get("namespace"))), body=event)
        except Exception:
            log.warning("could not post Event %s for %s", reason, meta.get("name"), exc_info=True)

    def patch_scale(self, namespace: str, name: str, body: Obj) -> Obj:
        """Merge-patch the PatioCluster's /scale subresource (the autoscaler's replicas)."""
        url = path(names.API_VERSION, names.KIND, namespace, name) + "/scale"
        return self._call("PATCH", url, body=body, content_type="application/merge-patch+json")

    def patch_status(self, namespace: str, name: str, status: Obj) -> Obj:
        """Merge-patch the PatioCluster's status subresource."""
        url = path(names.API_VERSION, names.KIND, namespace, name) + "/status"
        return self._call(
            "PATCH", url, body={"status": status}, content_type="application/merge-patch+json"
        )
