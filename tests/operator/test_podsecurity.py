"""Which worker pod templates the operator refuses by default (podsecurity.py)."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import cluster
from patio_operator import desired, podsecurity

# Issue 16 item 9: each of these was turned into a StatefulSet as written.
REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}, "volumes[0].hostPath"),
    ({"volumes": [{"name": "n", "nfs": {"server": "x", "path": "/"}}]}, "volumes[0].nfs"),
    ({"securityContext": {"runAsUser": 0}}, "securityContext.runAsUser"),
    ({"securityContext": {"runAsNonRoot": False}}, "securityContext.runAsNonRoot"),
    (
        {"securityContext": {"seccompProfile": {"type": "Unconfined"}}},
        "securityContext.seccompProfile.type",
    ),
    (
        {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}},
        "securityContext.sysctls",
    ),
    ({"serviceAccountName": "ci-deployer"}, "serviceAccountName"),
    # Fields a fuller pod template may carry (sidecars, host namespaces):
    # every key under the template is checked, wherever it is.
    ({"hostNetwork": True}, "hostNetwork"),
    ({"hostPID": True}, "hostPID"),
    ({"hostIPC": True}, "hostIPC"),
    (
        {"sidecars": [{"name": "s", "securityContext": {"privileged": True}}]},
        "sidecars[0].securityContext.privileged",
    ),
    (
        {
            "initContainers": [
                {"name": "i", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}
            ]
        },
        "initContainers[0].securityContext.capabilities.add",
    ),
    (
        {"containerSecurityContext": {"allowPrivilegeEscalation": True}},
        "containerSecurityContext.allowPrivilegeEscalation",
    ),
    ({"sidecars": [{"name": "s", "ports": [{"hostPort": 80}]}]}, "sidecars[0].ports[0].hostPort"),
    # Omissions: the restricted profile requires these to be said.
    ({"sidecars": [{"name": "s"}]}, "sidecars[0].securityContext.allowPrivilegeEscalation"),
    ({"initContainers": [{"name": "i"}]}, "initContainers[0].securityContext.capabilities.drop"),
    ({"containerSecurityContext": {}}, "containerSecurityContext.allowPrivilegeEscalation"),
    ({"securityContext": {"fsGroup": 2000}}, "securityContext.runAsNonRoot"),
    ({"securityContext": {"fsGroup": 2000}}, "securityContext.seccompProfile"),
]


@pytest.mark.parametrize(("template", "field"), REFUSED, ids=[f for _, f in REFUSED])
def test_templates_breaking_the_restricted_profile_are_named(
    template: dict[str, Any], field: str
) -> None:
    problems = podsecurity.violations("demo", {"podTemplate": template})
    assert any(p.startswith(f"spec.podTemplate.{field}: ") for p in problems), problems


@pytest.mark.parametrize(
    "template",
    [
        {},
        {"serviceAccountName": "demo-worker"},
        {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 20000,
                "fsGroup": 20000,
                "seccompProfile": {"type": "RuntimeDefault"},
                "sysctls": [{"name": "net.ipv4.tcp_keepalive_time", "value": "60"}],
            }
        },
        {
            "volumes": [
                {"name": "c", "configMap": {"name": "x"}},
                {"name": "s", "secret": {"secretName": "x"}},
                {"name": "e", "emptyDir": {}},
                {"name": "p", "persistentVolumeClaim": {"claimName": "x"}},
                {"name": "pr", "projected": {"sources": []}},
            ],
            "env": [{"name": "privileged", "value": "true"}],  # a value, not a field
        },
        {
            "sidecars": [
                {
                    "name": "s",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                    },
                }
            ]
        },
    ],
)
def test_restricted_templates_pass(template: dict[str, Any]) -> None:
    assert podsecurity.violations("demo", {"podTemplate": template}) == []


def test_the_operators_own_statefulset_is_restricted() -> None:
    # What the operator writes by default must itself pass its own check.
    sts = desired.statefulset(cluster(), desired.Settings(default_image="img"), [])
    pod_spec = sts["spec"]["template"]["spec"]
    assert podsecurity.violations("demo", {"podTemplate": pod_spec}) == []


def test_existing_secret_must_be_labelled_for_patio() -> None:
    field = "spec.auth.existingSecret"
    assert "not found" in str(podsecurity.secret_problem(field, "s", None))
    unlabelled = {"metadata": {"name": "s", "labels": {"app": "db"}}}
    problem = str(podsecurity.secret_problem(field, "s", unlabelled))
    assert field in problem and "kubectl label secret s patio.dev/mountable=true" in problem
    labelled = {"metadata": {"name": "s", "labels": {podsecurity.SECRET_LABEL: "true"}}}
    assert podsecurity.secret_problem(field, "s", labelled) is None
