"""Names, labels and paths shared by the operator's pure functions.

Everything that two modules must agree on (a label key, a mount path, the
name of a child object) lives here once, so the StatefulSet's selector, the
pod index and the peers file can never disagree about which pods belong to a
cluster.
"""

from __future__ import annotations

from patio import __version__ as patio_version

GROUP = "patio.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PatioCluster"
PLURAL = "patioclusters"

#: Field manager for server-side apply: the API server tracks which fields
#: the operator owns, so applying the same desired object again is a no-op
#: and a hand edit of an owned field is overwritten on the next pass.
FIELD_MANAGER = "patio-operator"

#: Label carried by every object (and every pod) of one PatioCluster; the
#: operator's pod index and the StatefulSet selector use it.
CLUSTER_LABEL = "patio.dev/cluster"
COMPONENT = "worker"
#: The label every scraped worker series carries with its cluster's name
#: (dashboards, alerts), relabelled from the pod label CLUSTER_LABEL.
CLUSTER_TARGET_LABEL = "patio_cluster"
POD_CLUSTER_LABEL_META = "__meta_kubernetes_pod_label_patio_dev_cluster"

# Annotations on the operator-managed auth Secret. The rotation state lives
# there (not in operator memory, not only in status) because the Secret is
# written in the same request as the key material it describes: after a
# crash the two can never disagree.
ROTATION_PHASE_ANNOTATION = "patio.dev/rotation-phase"
ROTATION_TOKEN_ANNOTATION = "patio.dev/rotation-token"
ROTATION_SINCE_ANNOTATION = "patio.dev/rotation-since"
KEY_GENERATION_ANNOTATION = "patio.dev/key-generation"

# Keys inside the auth Secret and where the workers find them.
KEY_ITEM = "key"
NEXT_KEY_ITEM = "next-key"
AUTH_MOUNT = "/etc/patio/auth"
PEERS_MOUNT = "/etc/patio/peers"
PEERS_ITEM = "peers"
TLS_MOUNT = "/etc/patio/tls"

#: The project's image; workers without spec.image run it when the operator
#: was started without --worker-image / PATIO_WORKER_IMAGE. The chart's
#: default (values.yaml image.repository at Chart.yaml appVersion) is the same
#: image: tests/operator/test_chart.py checks they agree.
IMAGE_REPOSITORY = "ghcr.io/patio-project/patio"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{patio_version}"

DEFAULT_PORT = 15383
DEFAULT_METRICS_PORT = 9383
DEFAULT_DRAIN_SECONDS = 30
#: Seconds the pod waits in preStop before SIGTERM reaches the worker, so
#: the client Service's endpoints drop it before it stops taking calls.
PRESTOP_SLEEP_SECONDS = 3
#: Extra grace on top of drain + preStop, for the process to exit after
#: draining; past it the kubelet sends SIGKILL.
GRACE_MARGIN_SECONDS = 10


def labels(cluster_name: str) -> dict[str, str]:
    """Labels put on every child object of a cluster."""
    return {
        "app.kubernetes.io/name": "patio",
        "app.kubernetes.io/instance": cluster_name,
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        CLUSTER_LABEL: cluster_name,
    }


def selector_labels(cluster_name: str) -> dict[str, str]:
    """The immutable StatefulSet selector: as small as possible on purpose."""
    return {CLUSTER_LABEL: cluster_name}


def selector_string(cluster_name: str) -> str:
    """The selector as the /scale subresource wants it (status.selector)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(cluster_name).items())


def statefulset_name(cluster_name: str) -> str:
    return cluster_name


def client_service_name(cluster_name: str) -> str:
    return cluster_name


def mesh_service_name(cluster_name: str) -> str:
    return f"{cluster_name}-mesh"


def auth_secret_name(cluster_name: str) -> str:
    return f"{cluster_name}-auth"


def peers_configmap_name(cluster_name: str) -> str:
    return f"{cluster_name}-peers"
