"""Spec -> desired Kubernetes objects, as pure functions on plain dicts.

Nothing here talks to the API server or reads a clock, so every decision about
what a PatioCluster turns into is pinned by plain synchronous tests
(tests/operator/test_desired.py). The reconciler server-side-applies what these
functions return; because the same spec always yields the same dicts, applying
them again is a no-op, and a hand edit of a field they set is undone.

Peers and keys are deliberately *not* in the pod template: they reach running
workers through mounted ConfigMap/Secret volumes that the kubelet refreshes in
place, so a membership change or a key rotation never restarts a pod. Only a
change of the template itself (image, registry, executor, resources, ...)
rolls the StatefulSet.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from patio_operator import names

Obj = dict[str, Any]

#: Names the operator uses for its own volumes; a user volume with one of
#: these names would silently replace a key or the peers file.
RESERVED_VOLUMES = frozenset({"auth", "peers", "tmp", "tls"})

#: The user the project's image runs as (Dockerfile: USER 10001:10001).
WORKER_UID = 10001


@dataclass(frozen=True)
class Settings:
    """What the operator knows that the PatioCluster does not say."""

    #: Image used when spec.image is empty: the one the operator ships in.
    default_image: str
    #: Namespace the operator runs in; its pods may always scrape workers
    #: (key-rotation checks), so NetworkPolicies let it in.
    operator_namespace: str = "patio-system"


@dataclass
class Desired:
    """Objects to apply, optional kinds to delete, and spec problems found."""

    objects: list[Obj] = field(default_factory=list)
    #: (apiVersion, kind, name) of optional objects that must not exist.
    absent: list[tuple[str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def owner_reference(cluster: Obj) -> Obj:
    """Owner reference that makes the garbage collector delete children with the cluster."""
    meta = cluster["metadata"]
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(cluster: Obj, name: str, extra_labels: dict[str, str] | None = None) -> Obj:
    cname = cluster["metadata"]["name"]
    lbl = names.labels(cname)
    if extra_labels:
        lbl.update(extra_labels)
    return {
        "name": name,
        "namespace": cluster["metadata"]["namespace"],
        "labels": lbl,
        "ownerReferences": [owner_reference(cluster)],
    }


def spec_of(cluster: Obj) -> Obj:
    """The spec with the CRD's defaults filled in.

    The API server applies the same defaults (they are in the CRD schema);
    repeating them here keeps the functions total for specs that were never
    defaulted, e.g. in unit tests or from an older CRD.
    """
    spec = dict(cluster.get("spec") or {})
    spec.setdefault("replicas", 3)
    spec.setdefault("executor", "async")
    spec.setdefault("port", names.DEFAULT_PORT)
    spec.setdefault("logLevel", "info")
    spec.setdefault("drainTimeoutSeconds", names.DEFAULT_DRAIN_SECONDS)
    metrics = dict(spec.get("metrics") or {})
    metrics.setdefault("port", names.DEFAULT_METRICS_PORT)
    metrics.setdefault("serviceMonitor", False)
    metrics.setdefault("scrapeInterval", "30s")
    spec["metrics"] = metrics
    return spec


def auth_secret_name(cluster: Obj) -> str:
    """The Secret the workers mount: the user's, or the one the operator manages."""
    auth = spec_of(cluster).get("auth") or {}
    existing = auth.get("existingSecret")
    if existing:
        return str(existing)
    return names.auth_secret_name(cluster["metadata"]["name"])


def termination_grace_seconds(spec: Obj) -> int:
    """Drain time plus the preStop pause plus a margin to exit.

    Too short and the kubelet SIGKILLs a worker that is still finishing
    calls, which is exactly what a drain exists to prevent.
    """
    return (
        int(spec["drainTimeoutSeconds"]) + names.PRESTOP_SLEEP_SECONDS + names.GRACE_MARGIN_SECONDS
    )


def peers_dns_name(cluster: Obj) -> str:
    """The headless Service's name, qualified by namespace (resolvable from any pod)."""
    meta = cluster["metadata"]
    return f"{names.mesh_service_name(meta['name'])}.{meta['namespace']}.svc"


def worker_env(cluster: Obj) -> list[Obj]:
    """Environment of the worker container, per docs/worker-contract.md."""
    spec = spec_of(cluster)
    env: list[Obj] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "PATIO_REGISTRY", "value": str(spec["registry"])},
        {"name": "PATIO_LISTEN", "value": "$(POD_IP)"},
        {"name": "PATIO_PORT", "value": str(spec["port"])},
        {"name": "PATIO_NODE_ID", "value": "$(POD_NAME)"},
        {"name": "PATIO_PEERS_FILE", "value": f"{names.PEERS_MOUNT}/{names.PEERS_ITEM}"},
        # A second source of peers: the headless Service lists every pod,
        # so the mesh keeps healing (a replaced pod's new address is found)
        # while no operator runs to rewrite the peers file.
        {"name": "PATIO_PEERS_DNS", "value": f"{peers_dns_name(cluster)}:{spec['port']}"},
        {"name": "PATIO_KEY_FILE", "value": f"{names.AUTH_MOUNT}/{names.KEY_ITEM}"},
        {"name": "PATIO_NEXT_KEY_FILE", "value": f"{names.AUTH_MOUNT}/{names.NEXT_KEY_ITEM}"},
        {"name": "PATIO_EXECUTOR", "value": str(spec["executor"])},
        {"name": "PATIO_METRICS_PORT", "value": str(spec["metrics"]["port"])},
        {"name": "PATIO_DRAIN_TIMEOUT", "value": str(spec["drainTimeoutSeconds"])},
        {"name": "PATIO_LOG_LEVEL", "value": str(spec["logLevel"])},
        {"name": "PATIO_LOG_FORMAT", "value": "json"},
    ]
    if spec.get("maxWorkers") is not None:
        env.append({"name": "PATIO_MAX_WORKERS", "value": str(spec["maxWorkers"])})
    tls = spec.get("tls")
    if tls:
        env.append({"name": "PATIO_TLS_CERT", "value": f"{names.TLS_MOUNT}/tls.crt"})
        env.append({"name": "PATIO_TLS_KEY", "value": f"{names.TLS_MOUNT}/tls.key"})
        if tls.get("mutual", True):
            env.append({"name": "PATIO_TLS_CA", "value": f"{names.TLS_MOUNT}/ca.crt"})
    # The user's extra env may override ours by name (e.g. PATIO_LOG_FORMAT);
    # replacing in place keeps $(POD_IP) references defined before use and
    # keeps names unique, which server-side apply requires of a list map.
    index = {e["name"]: i for i, e in enumerate(env)}
    for extra in (spec.get("podTemplate") or {}).get("env") or []:
        if extra["name"] in index:
            env[index[extra["name"]]] = copy.deepcopy(extra)
        else:
            index[extra["name"]] = len(env)
            env.append(copy.deepcopy(extra))
    return env


def _extra_containers(tmpl: Obj, warnings: list[str]) -> list[Obj]:
    """podTemplate.initContainers, then podTemplate.sidecars as native sidecars.

    Sidecars are init containers with `restartPolicy: Always` (Kubernetes
    1.29+): they start after the user's init containers and before the
    worker, and keep running until the worker has drained, so a proxy or
    log shipper outlives the worker's last call. Names must be unique in the
    pod; one that collides is dropped with a warning.
    """
    out: list[Obj] = []
    used = {"worker"}
    for field_name, sidecar in (("initContainers", False), ("sidecars", True)):
        for c in tmpl.get(field_name) or []:
            if c["name"] in used:
                warnings.append(
                    f"podTemplate.{field_name}: container name {c['name']!r} is taken; ignored"
                )
                continue
            used.add(c["name"])
            container = copy.deepcopy(c)
            if sidecar:
                container["restartPolicy"] = "Always"
            out.append(container)
    return out


def statefulset(cluster: Obj, settings: Settings, warnings: list[str]) -> Obj:
    """The workers: Parallel pod management, rolling updates, drained on SIGTERM."""
    spec = spec_of(cluster)
    cname = cluster["metadata"]["name"]
    tmpl = spec.get("podTemplate") or {}
    metrics_port = int(spec["metrics"]["port"])

    volumes: list[Obj] = [
        {"name": "auth", "secret": {"secretName": auth_secret_name(cluster), "defaultMode": 0o440}},
        {
            "name": "peers",
            "configMap": {"name": names.peers_configmap_name(cname), "defaultMode": 0o444},
        },
        # readOnlyRootFilesystem: the process executor and Python need a scratch dir.
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    mounts: list[Obj] = [
        {"name": "auth", "mountPath": names.AUTH_MOUNT, "readOnly": True},
        {"name": "peers", "mountPath": names.PEERS_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.get("tls"):
        volumes.append(
            {
                "name": "tls",
                "secret": {"secretName": spec["tls"]["existingSecret"], "defaultMode": 0o440},
            }
        )
        mounts.append({"name": "tls", "mountPath": names.TLS_MOUNT, "readOnly": True})
    used_paths = {m["mountPath"] for m in mounts}
    for vol in tmpl.get("volumes") or []:
        if vol["name"] in RESERVED_VOLUMES:
            warnings.append(f"podTemplate.volumes: name {vol['name']!r} is reserved; ignored")
            continue
        volumes.append(copy.deepcopy(vol))
    for mount in tmpl.get("volumeMounts") or []:
        if mount["name"] in RESERVED_VOLUMES or mount["mountPath"] in used_paths:
            warnings.append(
                f"podTemplate.volumeMounts: {mount['name']!r} at {mount['mountPath']!r} "
                "collides with the operator's mounts; ignored"
            )
            continue
        used_paths.add(mount["mountPath"])
        mounts.append(copy.deepcopy(mount))

    container: Obj = {
        "name": "worker",
        "image": spec.get("image") or settings.default_image,
        "command": ["patio", "worker"],
        "ports": [
            {"name": "mesh", "containerPort": int(spec["port"]), "protocol": "TCP"},
            {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"},
        ],
        "env": worker_env(cluster),
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "metrics"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        # Give the client Service time to drop the pod before SIGTERM makes
        # the worker stop taking calls; the drain itself happens in-process.
        "lifecycle": {"preStop": {"sleep": {"seconds": names.PRESTOP_SLEEP_SECONDS}}},
        "securityContext": copy.deepcopy(tmpl.get("containerSecurityContext"))
        or {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    if tmpl.get("envFrom"):
        container["envFrom"] = copy.deepcopy(tmpl["envFrom"])
    if spec.get("imagePullPolicy"):
        container["imagePullPolicy"] = spec["imagePullPolicy"]
    if spec.get("resources"):
        container["resources"] = copy.deepcopy(spec["resources"])

    pod_labels = dict(tmpl.get("labels") or {})
    pod_labels.update(names.labels(cname))  # ours win: the selector depends on them
    pod_spec: Obj = {
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        # Workers never call the Kubernetes API (membership comes from the
        # peers file); a token is mounted only for a ServiceAccount the user
        # chose, whose tasks presumably need it.
        "automountServiceAccountToken": bool(tmpl.get("serviceAccountName")),
        "enableServiceLinks": False,
        # The image's non-root user. fsGroup makes the kubelet give the
        # mounted key files (mode 0440) to that group: without it they are
        # root-owned and the worker could not read its own key.
        "securityContext": copy.deepcopy(tmpl.get("securityContext"))
        or {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    init = _extra_containers(tmpl, warnings)
    if init:
        pod_spec["initContainers"] = init
    for key in (
        "nodeSelector",
        "affinity",
        "serviceAccountName",
        "priorityClassName",
        "runtimeClassName",
    ):
        if tmpl.get(key):
            pod_spec[key] = copy.deepcopy(tmpl[key])
    for key in ("tolerations", "topologySpreadConstraints"):
        if tmpl.get(key):
            pod_spec[key] = copy.deepcopy(tmpl[key])
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = copy.deepcopy(spec["imagePullSecrets"])

    template_meta: Obj = {"labels": pod_labels}
    if tmpl.get("annotations"):
        template_meta["annotations"] = dict(tmpl["annotations"])

    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(cluster, names.statefulset_name(cname)),
        "spec": {
            "replicas": int(spec["replicas"]),
            "serviceName": names.mesh_service_name(cname),
            # Workers are peers, not an ordered chain: start and stop them together.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": names.selector_labels(cname)},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def mesh_service(cluster: Obj) -> Obj:
    """Headless Service: stable DNS per pod, listing pods before they are ready.

    Not-ready pods must be reachable, because a worker only becomes ready
    once it has connected to enough of its peers.
    """
    spec = spec_of(cluster)
    cname = cluster["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cluster, names.mesh_service_name(cname), {"patio.dev/service": "mesh"}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.selector_labels(cname),
            "ports": [
                {
                    "name": "mesh",
                    "port": int(spec["port"]),
                    "targetPort": "mesh",
                    "protocol": "TCP",
                },
                {
                    "name": "metrics",
                    "port": int(spec["metrics"]["port"]),
                    "targetPort": "metrics",
                    "protocol": "TCP",
                },
            ],
        },
    }


def client_service(cluster: Obj) -> Obj:
    """ClusterIP Service for callers (`patio call`): ready workers only."""
    spec = spec_of(cluster)
    cname = cluster["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(
            cluster, names.client_service_name(cname), {"patio.dev/service": "client"}
        ),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector_labels(cname),
            "ports": [
                {"name": "mesh", "port": int(spec["port"]), "targetPort": "mesh", "protocol": "TCP"}
            ],
        },
    }


def pod_disruption_budget(cluster: Obj) -> Obj:
    """At most one worker evicted at a time, so a node drain never empties the mesh."""
    cname = cluster["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(cluster, cname),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": names.selector_labels(cname)}},
    }


def network_policy(cluster: Obj, settings: Settings) -> Obj:
    """Mesh port: own pods plus listed clients; metrics: operator plus listed scrapers."""
    spec = spec_of(cluster)
    cname = cluster["metadata"]["name"]
    netpol = spec.get("networkPolicy") or {}
    own_pods: Obj = {"podSelector": {"matchLabels": names.selector_labels(cname)}}
    operator_ns: Obj = {
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": settings.operator_namespace}
        }
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(cluster, cname),
        "spec": {
            "podSelector": {"matchLabels": names.selector_labels(cname)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [own_pods, *copy.deepcopy(netpol.get("clientsFrom") or [])],
                    "ports": [{"protocol": "TCP", "port": int(spec["port"])}],
                },
                {
                    "from": [operator_ns, *copy.deepcopy(netpol.get("metricsFrom") or [])],
                    "ports": [{"protocol": "TCP", "port": int(spec["metrics"]["port"])}],
                },
            ],
        },
    }


def service_monitor(cluster: Obj) -> Obj:
    """Prometheus-operator ServiceMonitor scraping every worker via the headless Service.

    Labelled with spec.metrics.serviceMonitorLabels (a Prometheus selects
    monitors by label, e.g. kube-prometheus-stack by `release`); ours win on a
    clash, as the operator finds its children by them. Each target gets the
    label patio_cluster, as from the chart's monitors, for the dashboards and
    alerts.
    """
    cname = cluster["metadata"]["name"]
    metrics = spec_of(cluster)["metrics"]
    extra = {str(k): str(v) for k, v in (metrics.get("serviceMonitorLabels") or {}).items()}
    meta = _meta(cluster, cname)
    meta["labels"] = {**extra, **meta["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {names.CLUSTER_LABEL: cname, "patio.dev/service": "mesh"}},
            "endpoints": [
                {
                    "port": "metrics",
                    "path": "/metrics",
                    "interval": str(metrics["scrapeInterval"]),
                    "relabelings": [
                        {
                            "sourceLabels": [names.POD_CLUSTER_LABEL_META],
                            "targetLabel": names.CLUSTER_TARGET_LABEL,
                        }
                    ],
                }
            ],
        },
    }


def peers_configmap(cluster: Obj, peers_text: str) -> Obj:
    """The ConfigMap mounted as the workers' PATIO_PEERS_FILE."""
    cname = cluster["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cluster, names.peers_configmap_name(cname)),
        "data": {names.PEERS_ITEM: peers_text},
    }


def auth_secret(cluster: Obj, data: dict[str, str], annotations: dict[str, str]) -> Obj:
    """The operator-managed auth Secret (`stringData`-free: data is base64 already)."""
    cname = cluster["metadata"]["name"]
    meta = _meta(cluster, names.auth_secret_name(cname))
    meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": dict(data),
    }


def desired_objects(cluster: Obj, settings: Settings) -> Desired:
    """Everything except the auth Secret and peers ConfigMap (they carry live state)."""
    spec = spec_of(cluster)
    cname = cluster["metadata"]["name"]
    out = Desired()
    out.objects.append(statefulset(cluster, settings, out.warnings))
    out.objects.append(mesh_service(cluster))
    out.objects.append(client_service(cluster))
    out.objects.append(pod_disruption_budget(cluster))

    if (spec.get("networkPolicy") or {}).get("enabled"):
        out.objects.append(network_policy(cluster, settings))
    else:
        out.absent.append(("networking.k8s.io/v1", "NetworkPolicy", cname))
    if spec["metrics"].get("serviceMonitor"):
        out.objects.append(service_monitor(cluster))
    else:
        out.absent.append(("monitoring.coreos.com/v1", "ServiceMonitor", cname))
    return out
