"""The Helm chart, rendered by the real helm: lint, templates, values schema, drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chart_tools import CHART, CRD_FILE, RENDER_SCRIPT, ROOT, find, helm, helm_binary, template
from patio_operator import kube


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "cluster.enabled=true", "--set", "cluster.spec.registry=tasks:rpc"],
        ["--set", "watchNamespace=apps", "--set", "metrics.serviceMonitor.enabled=true"],
        [
            f"--set=metrics.{part}.enabled=true"
            for part in (
                "podMonitor",
                "workers.serviceMonitor",
                "workers.podMonitor",
                "prometheusRule",
                "dashboards",
            )
        ],
    ],
    ids=["defaults", "with-cluster", "namespaced", "observability"],
)
def test_lint(values: list[str]) -> None:
    res = helm("lint", "--strict", str(CHART), *values, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_default_render() -> None:
    docs = template()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",  # the leader Lease, in the release's namespace
            "Lease",  # owned by the release: helm uninstall removes it
            "RoleBinding",
            "Service",
            "Deployment",
            "Pod",
        ]
    )
    # The chart's CRD is the file, unchanged.
    assert find(docs, "CustomResourceDefinition") == yaml.safe_load(CRD_FILE.read_text())
    dep = find(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["command"] == ["patio", "operator"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["image"] == "ghcr.io/patio-project/patio:1.0.0a1"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert not any(a.startswith("--namespace") for a in c["args"])
    # Two replicas, one active through the Lease: a rolling upgrade is safe.
    assert dep["spec"]["replicas"] == 2
    assert "--leader-election-lease=t-patio-operator" in c["args"]
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    leader = find(docs, "Role")
    assert leader["metadata"]["namespace"] == "patio-system"
    assert leader["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": ["t-patio-operator"], "verbs": ["get", "update"]},
    ]  # fmt: skip
    lease = find(docs, "Lease")
    assert lease["metadata"]["name"] == "t-patio-operator" and lease["spec"] == {}
    single = find(
        template("--set", "operator.replicas=1", "--set", "operator.leaderElection.enabled=false"),
        "Deployment",
    )
    assert single["spec"]["strategy"]["type"] == "Recreate"
    assert not any(
        "leader" in a for a in single["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    test_pod = find(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_watch_namespace_uses_a_role_not_a_clusterrole() -> None:
    docs = template("--set", "watchNamespace=apps")
    kinds = {d["kind"] for d in docs}
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    role = find(docs, "Role", "t-patio-operator")
    binding = find(docs, "RoleBinding", "t-patio-operator")
    assert role["metadata"]["namespace"] == "apps" == binding["metadata"]["namespace"]
    assert binding["subjects"][0]["namespace"] == "patio-system"
    args = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=apps" in args


@pytest.mark.parametrize("values", [[], ["--set", "watchNamespace=apps"]], ids=["cluster", "ns"])
def test_rbac_grants_exactly_the_operator_permissions(values: list[str]) -> None:
    # Issue 16 item 9: the ClusterRole granted list, watch, patch and delete
    # on every Secret of the cluster; the code needs get, create and update.
    docs = template(*values)
    role = find(docs, "Role", "t-patio-operator") if values else find(docs, "ClusterRole")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                granted.setdefault((group, res), set()).update(rule["verbs"])
    assert granted == {k: set(v) for k, v in kube.PERMISSIONS.items()}
    assert not any("resourceNames" in r for r in role["rules"])


def test_example_cluster_is_a_hook_only_until_its_crd_exists() -> None:
    values = ["--set", "cluster.enabled=true", "--set", "cluster.spec.registry=tasks:rpc"]
    first = find(template(*values), "PatioCluster")
    assert first["metadata"]["annotations"]["helm.sh/hook"] == "post-install"
    assert first["metadata"]["annotations"]["meta.helm.sh/release-name"] == "t"
    later = find(
        template(*values, "--api-versions", "patio.dev/v1alpha1/PatioCluster"), "PatioCluster"
    )
    assert "annotations" not in later["metadata"]
    assert later["spec"] == {"registry": "tasks:rpc", "replicas": 3}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "unknownKey=1"], "additional properties 'unknownKey' not allowed"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "operator.rotation.check=never"], "/operator/rotation/check"),
        (["--set", "operator.resyncSeconds=1"], "/operator/resyncSeconds"),
        (["--set", "metrics.port=70000"], "/metrics/port"),
        (["--set", "metrics.prometheusRule.errorRatio=1.5"], "/metrics/prometheusRule/errorRatio"),
        (["--set", "metrics.prometheusRule.busyRatio=0"], "/metrics/prometheusRule/busyRatio"),
        (["--set", "watchNamespace=Not_A_Namespace"], "/watchNamespace"),
        (["--set", "cluster.enabled=true"], "/cluster/spec/registry"),
        (["--set", "cluster.name=UPPER"], "/cluster/name"),
        (["--set", "operator.extra=1"], "additional properties 'extra' not allowed"),
        (["--set-json", 'imagePullSecrets=[{"nom":"x"}]'], "/imagePullSecrets/0"),
    ],
)
def test_values_schema_rejects(values: list[str], message: str) -> None:
    res = helm("template", "t", str(CHART), *values, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "metrics.port=8080"], "metrics.port and health.port must differ"),
        (
            [
                "--set",
                "watchNamespace=other",
                "--set",
                "cluster.enabled=true",
                "--set",
                "cluster.spec.registry=a:b",
            ],
            "the operator would never reconcile it",
        ),
        (
            [
                "--set",
                "crds.install=false",
                "--set",
                "cluster.enabled=true",
                "--set",
                "cluster.spec.registry=a:b",
            ],
            "cluster.enabled needs the PatioCluster CRD",
        ),
        (["--set", "serviceAccount.create=false"], "serviceAccount.name is required"),
        (
            ["--set-json", 'operator.extraEnv=[{"name":"POD_IP","value":"1.2.3.4"}]'],
            "operator.extraEnv sets POD_IP, which the chart sets itself",
        ),
        (
            ["--set-json", 'operator.extraVolumes=[{"name":"tmp","emptyDir":{}}]'],
            'the name "tmp" is the chart\'s own /tmp volume',
        ),
        (
            ["--set", "operator.leaderElection.enabled=false"],
            "every replica would reconcile the same clusters",
        ),
    ],
)
def test_invalid_combinations_fail(values: list[str], message: str) -> None:
    res = helm("template", "t", str(CHART), *values, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


def test_manifests_match_the_chart(tmp_path: Path) -> None:
    """manifests/ is generated; edit the chart and run operator/hack/render-manifests.sh."""
    subprocess.run(
        [str(RENDER_SCRIPT), str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        env={"HELM": str(helm_binary()), "PATH": "/usr/bin:/bin"},
    )
    committed = ROOT / "manifests"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir())
    for name in names:
        assert (committed / name).read_text() == (tmp_path / name).read_text(), (
            f"manifests/{name} drifted from the chart: run operator/hack/render-manifests.sh"
        )


def test_operator_security_context_env_and_volumes_are_configurable() -> None:
    pod = find(
        template(
            # OpenShift's restricted SCC assigns the user: drop the fixed IDs.
            "--set", "operator.podSecurityContext.runAsUser=null",
            "--set", "operator.podSecurityContext.runAsGroup=null",
            "--set", "operator.securityContext.readOnlyRootFilesystem=false",
            "--set-json", 'operator.extraEnv=[{"name":"HTTPS_PROXY","value":"http://p:3128"}]',
            "--set-json", 'operator.extraVolumes=[{"name":"ca","configMap":{"name":"ca"}}]',
            "--set-json", 'operator.extraVolumeMounts=[{"name":"ca","mountPath":"/etc/ca"}]',
        ),
        "Deployment",
    )["spec"]["template"]["spec"]  # fmt: skip
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (c,) = pod["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["env"][-1] == {"name": "HTTPS_PROXY", "value": "http://p:3128"}
    assert {e["name"] for e in c["env"]} >= {"POD_IP", "PATIO_WORKER_IMAGE"}
    assert c["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "ca", "mountPath": "/etc/ca"},
    ]
    assert [v["name"] for v in pod["volumes"]] == ["tmp", "ca"]


def test_one_default_image() -> None:
    """The chart's default image, its Artifact Hub listing and the operator's built-in default."""
    from patio_operator import names

    import patio

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (listed,) = yaml.safe_load(chart["annotations"]["artifacthub.io/images"])
    rendered = find(template(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert rendered["image"] == listed["image"] == names.DEFAULT_IMAGE
    assert chart["appVersion"] == patio.__version__
    env = {e["name"]: e.get("value") for e in rendered["env"]}
    assert env["PATIO_WORKER_IMAGE"] == names.DEFAULT_IMAGE


def test_readme_and_dashboards_match_their_generator() -> None:
    """charts/patio/README.md and dashboards/ are generated: run operator/hack/chart_files.py."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "operator" / "hack" / "chart_files.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
