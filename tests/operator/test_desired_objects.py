"""spec -> desired objects (pure; no cluster)."""

from __future__ import annotations

from typing import Any

from operator_factories import cluster
from patio_operator import desired, names

SETTINGS = desired.Settings(default_image="example/patio:1", operator_namespace="patio-system")


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] != "demo-mesh"]
    return found


def sts_of(c: dict[str, Any]) -> dict[str, Any]:
    return desired.statefulset(c, SETTINGS, [])


def container(c: dict[str, Any]) -> dict[str, Any]:
    cont: dict[str, Any] = sts_of(c)["spec"]["template"]["spec"]["containers"][0]
    return cont


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(c)["env"]}


def test_worker_env_follows_the_contract() -> None:
    e = env(cluster(executor="thread", maxWorkers=8, port=16000))
    assert e["PATIO_REGISTRY"] == "tasks:rpc"
    assert e["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert e["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["PATIO_LISTEN"] == "$(POD_IP)"
    assert e["PATIO_NODE_ID"] == "$(POD_NAME)"
    assert e["PATIO_PORT"] == "16000"
    assert e["PATIO_EXECUTOR"] == "thread"
    assert e["PATIO_MAX_WORKERS"] == "8"
    assert e["PATIO_PEERS_FILE"] == "/etc/patio/peers/peers"
    assert e["PATIO_KEY_FILE"] == "/etc/patio/auth/key"
    assert e["PATIO_NEXT_KEY_FILE"] == "/etc/patio/auth/next-key"
    assert e["PATIO_METRICS_PORT"] == "9383"
    assert "PATIO_KEY" not in e  # the key travels as a file, never as env


def test_env_refers_to_pod_ip_only_after_defining_it() -> None:
    names_in_order = [x["name"] for x in container(cluster())["env"]]
    assert names_in_order.index("POD_IP") < names_in_order.index("PATIO_LISTEN")
    assert names_in_order.index("POD_NAME") < names_in_order.index("PATIO_NODE_ID")


def test_keys_and_peers_are_directory_volumes_so_updates_reach_running_pods() -> None:
    spec = sts_of(cluster())["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["auth"]["secret"]["secretName"] == "demo-auth"
    assert vols["peers"]["configMap"]["name"] == "demo-peers"
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    # subPath mounts are never refreshed by the kubelet.
    assert all("subPath" not in m for m in mounts.values())
    assert mounts["auth"]["mountPath"] == names.AUTH_MOUNT and mounts["auth"]["readOnly"]
    assert mounts["peers"]["mountPath"] == names.PEERS_MOUNT


def test_existing_secret_is_mounted_instead_of_the_generated_one() -> None:
    spec = sts_of(cluster(auth={"existingSecret": "mine"}))["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["auth"]["secret"]["secretName"] == "mine"


def test_statefulset_shape() -> None:
    s = sts_of(cluster(replicas=5, drainTimeoutSeconds=45))
    assert s["spec"]["replicas"] == 5
    assert s["spec"]["podManagementPolicy"] == "Parallel"
    assert s["spec"]["serviceName"] == "demo-mesh"
    assert s["spec"]["selector"] == {"matchLabels": {"patio.dev/cluster": "demo"}}
    pod_spec = s["spec"]["template"]["spec"]
    grace = pod_spec["terminationGracePeriodSeconds"]
    assert grace == 45 + names.PRESTOP_SLEEP_SECONDS + names.GRACE_MARGIN_SECONDS
    c = pod_spec["containers"][0]
    assert c["command"] == ["patio", "worker"]
    assert c["image"] == "example/patio:1"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    # The key files are 0440: readable only through the fsGroup.
    assert pod_spec["securityContext"]["fsGroup"] == pod_spec["securityContext"]["runAsUser"]
    vols = {v["name"]: v for v in pod_spec["volumes"]}
    assert vols["auth"]["secret"]["defaultMode"] == 0o440
    assert pod_spec["automountServiceAccountToken"] is False
    ref = s["metadata"]["ownerReferences"][0]
    assert ref == {
        "apiVersion": "patio.dev/v1alpha1",
        "kind": "PatioCluster",
        "name": "demo",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_pod_template_overrides_are_merged_without_breaking_the_selector() -> None:
    c = cluster(
        image="custom:2",
        podTemplate={
            "labels": {"team": "a", "patio.dev/cluster": "hijack"},
            "annotations": {"a": "b"},
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}],
            "env": [
                {"name": "PATIO_LOG_FORMAT", "value": "plain"},
                {"name": "EXTRA", "value": "1"},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        },
    )
    s = sts_of(c)
    tmpl = s["spec"]["template"]
    assert tmpl["metadata"]["labels"]["team"] == "a"
    assert tmpl["metadata"]["labels"]["patio.dev/cluster"] == "demo"
    assert tmpl["metadata"]["annotations"] == {"a": "b"}
    assert tmpl["spec"]["nodeSelector"] == {"disk": "ssd"}
    assert tmpl["spec"]["tolerations"][0]["key"] == "k"
    cont = tmpl["spec"]["containers"][0]
    assert cont["image"] == "custom:2"
    env_names = [e["name"] for e in cont["env"]]
    assert len(env_names) == len(set(env_names))  # server-side apply needs unique keys
    assert {e["name"]: e.get("value") for e in cont["env"]}["PATIO_LOG_FORMAT"] == "plain"
    assert "EXTRA" in env_names
    assert {"name": "data", "mountPath": "/data"} in cont["volumeMounts"]


def test_service_account_token_only_for_a_chosen_account() -> None:
    plain = sts_of(cluster())["spec"]["template"]["spec"]
    assert plain["automountServiceAccountToken"] is False
    chosen = sts_of(cluster(podTemplate={"serviceAccountName": "tasks"}))["spec"]["template"][
        "spec"
    ]
    assert chosen["serviceAccountName"] == "tasks"
    assert chosen["automountServiceAccountToken"] is True


def test_pod_security_context_can_be_replaced() -> None:
    ctx = {"runAsUser": 1000, "fsGroup": 1000}
    s = sts_of(cluster(podTemplate={"securityContext": ctx}))
    assert s["spec"]["template"]["spec"]["securityContext"] == ctx


def test_reserved_volume_names_are_refused_with_a_warning() -> None:
    warnings: list[str] = []
    c = cluster(podTemplate={"volumes": [{"name": "auth", "emptyDir": {}}]})
    s = desired.statefulset(c, SETTINGS, warnings)
    auth = [v for v in s["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth"]
    assert len(auth) == 1 and "secret" in auth[0]
    assert warnings and "reserved" in warnings[0]


def test_tls_mounts_and_env() -> None:
    e = env(cluster(tls={"existingSecret": "certs"}))
    assert e["PATIO_TLS_CERT"] == "/etc/patio/tls/tls.crt"
    assert e["PATIO_TLS_CA"] == "/etc/patio/tls/ca.crt"
    e2 = env(cluster(tls={"existingSecret": "certs", "mutual": False}))
    assert "PATIO_TLS_CA" not in e2


def test_services() -> None:
    c = cluster(port=16000)
    mesh = desired.mesh_service(c)
    assert mesh["spec"]["clusterIP"] == "None"
    assert mesh["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in mesh["spec"]["ports"]} == {"mesh": 16000, "metrics": 9383}
    client = desired.client_service(c)
    assert client["metadata"]["name"] == "demo"
    assert "publishNotReadyAddresses" not in client["spec"]


def test_optional_objects_are_applied_or_listed_for_deletion() -> None:
    plain = desired.desired_objects(cluster(), SETTINGS)
    kinds = {o["kind"] for o in plain.objects}
    assert kinds == {"StatefulSet", "Service", "PodDisruptionBudget"}
    assert {k for _, k, _ in plain.absent} == {"NetworkPolicy", "ServiceMonitor"}
    full = desired.desired_objects(
        cluster(
            networkPolicy={"enabled": True, "clientsFrom": [{"podSelector": {}}]},
            # The operator scales by itself: no HPA among its children.
            autoscaling={"enabled": True, "minReplicas": 2, "maxReplicas": 9},
            metrics={"serviceMonitor": True, "port": 9400},
        ),
        SETTINGS,
    )
    assert not full.absent
    assert {o["kind"] for o in full.objects} == kinds | {"NetworkPolicy", "ServiceMonitor"}
    netpol = by_kind(full.objects, "NetworkPolicy")
    mesh_rule, metrics_rule = netpol["spec"]["ingress"]
    assert mesh_rule["from"][0] == {"podSelector": {"matchLabels": {"patio.dev/cluster": "demo"}}}
    assert mesh_rule["from"][1] == {"podSelector": {}}
    assert metrics_rule["ports"] == [{"protocol": "TCP", "port": 9400}]
    ns_sel = metrics_rule["from"][0]["namespaceSelector"]["matchLabels"]
    assert ns_sel == {"kubernetes.io/metadata.name": "patio-system"}
    sm = by_kind(full.objects, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"]["patio.dev/service"] == "mesh"


def test_every_child_is_owned_and_labelled() -> None:
    out = desired.desired_objects(
        cluster(networkPolicy={"enabled": True}, autoscaling={"maxReplicas": 3}), SETTINGS
    )
    objs = [
        *out.objects,
        desired.peers_configmap(cluster(), ""),
        desired.auth_secret(cluster(), {}, {}),
    ]
    for o in objs:
        assert o["metadata"]["ownerReferences"][0]["uid"] == "uid-1", o["kind"]
        assert o["metadata"]["labels"]["patio.dev/cluster"] == "demo", o["kind"]
        assert o["metadata"]["namespace"] == "ns1"


def test_same_spec_same_objects() -> None:
    """Idempotence starts here: server-side apply of equal dicts is a no-op."""
    a = desired.desired_objects(cluster(), SETTINGS)
    b = desired.desired_objects(cluster(), SETTINGS)
    assert a.objects == b.objects


def test_workers_also_follow_the_headless_service_dns() -> None:
    assert env(cluster(port=16000))["PATIO_PEERS_DNS"] == "demo-mesh.ns1.svc:16000"


def test_complete_pod_template_init_containers_sidecars_env_from_runtime_class() -> None:
    warnings: list[str] = []
    c = cluster(
        podTemplate={
            "initContainers": [{"name": "fetch", "image": "busybox"}],
            "sidecars": [
                {"name": "proxy", "image": "envoy"},
                {"name": "worker", "image": "clash"},  # taken by the worker itself
            ],
            "envFrom": [{"configMapRef": {"name": "settings"}}],
            "containerSecurityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": False},
            "runtimeClassName": "gvisor",
        }
    )
    sts = desired.statefulset(c, SETTINGS, warnings)
    pod_spec = sts["spec"]["template"]["spec"]
    assert pod_spec["initContainers"] == [
        {"name": "fetch", "image": "busybox"},
        {"name": "proxy", "image": "envoy", "restartPolicy": "Always"},
    ]
    assert pod_spec["runtimeClassName"] == "gvisor"
    worker = pod_spec["containers"][0]
    assert worker["envFrom"] == [{"configMapRef": {"name": "settings"}}]
    assert worker["securityContext"] == {"runAsNonRoot": True, "readOnlyRootFilesystem": False}
    assert warnings == ["podTemplate.sidecars: container name 'worker' is taken; ignored"]
    plain = desired.statefulset(cluster(), SETTINGS, [])["spec"]["template"]["spec"]
    assert "initContainers" not in plain and "runtimeClassName" not in plain
    assert "envFrom" not in plain["containers"][0]


def test_init_containers_and_sidecars_fall_under_the_pod_security_check() -> None:
    from patio_operator import podsecurity

    spec = {
        "podTemplate": {
            "initContainers": [{"name": "a", "securityContext": {"privileged": True}}],
            "sidecars": [
                {"name": "b", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}
            ],
            "containerSecurityContext": {"allowPrivilegeEscalation": True},
        }
    }
    fields = {p.split(":")[0] for p in podsecurity.violations("demo", spec)}
    assert {
        "spec.podTemplate.initContainers[0].securityContext.privileged",
        "spec.podTemplate.sidecars[0].securityContext.capabilities.add",
        "spec.podTemplate.containerSecurityContext.allowPrivilegeEscalation",
    } <= fields
