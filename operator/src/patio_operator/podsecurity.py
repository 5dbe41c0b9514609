"""What a PatioCluster may ask of its worker pods, as pure functions.

Whoever may create a PatioCluster gets a StatefulSet the operator writes
with its own, wider, rights. Without a check that is a way around Pod
Security admission for anyone who can only create PatioClusters: hostPath
volumes, privileged containers, host namespaces, added capabilities, or a
ServiceAccount (and its token) that is not the cluster's. So by default the
operator refuses templates that break the Pod Security Standards'
"restricted" profile, naming the field, and applies nothing for the
workers until the spec is fixed. A cluster admin can allow them
(``--allow-privileged-templates``, chart value
``operator.podSecurity.allowPrivilegedTemplates``); namespace Pod Security
labels (``pod-security.kubernetes.io/enforce: restricted``) remain the
second, independent line (docs/security.md).

Mounted Secrets are the other half: ``auth.existingSecret`` and
``tls.existingSecret`` may only name Secrets that carry ``SECRET_LABEL``, so
a PatioCluster cannot mount (and hand to its own image) any Secret of the
namespace, only those someone with rights on Secrets marked for patio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

#: Label a Secret must carry (value "true") to be named by an existingSecret.
SECRET_LABEL: Final = "patio.dev/mountable"

#: Volume sources the restricted profile allows.
RESTRICTED_VOLUME_SOURCES: Final = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)

#: The only capability the restricted profile lets a container add.
ALLOWED_ADDED_CAPABILITIES: Final = frozenset({"NET_BIND_SERVICE"})

#: Sysctls the baseline (and so restricted) profile allows.
SAFE_SYSCTLS: Final = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)

_HOST_NAMESPACES: Final = ("hostNetwork", "hostPID", "hostIPC")


def worker_service_account_name(cluster_name: str) -> str:
    """The one ServiceAccount a cluster's template may name (created by its owner)."""
    return f"{cluster_name}-worker"


def _walk(node: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """(path of the key, key, value) for every mapping entry under ``node``."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            here = f"{path}.{key}"
            yield here, str(key), value
            yield from _walk(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}[{i}]")


def _added_capabilities(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return None
    added = {str(c) for c in value.get("add") or []} - ALLOWED_ADDED_CAPABILITIES
    return f".add: adding capabilities {sorted(added)} is not allowed" if added else None


def _seccomp(value: Any) -> str | None:
    if not isinstance(value, Mapping) or value.get("type") in (None, "RuntimeDefault", "Localhost"):
        return None
    return f".type: seccomp profile type {value.get('type')!r} is not allowed"


def _sysctls(value: Any) -> str | None:
    if not isinstance(value, list):
        return None
    unsafe = sorted(
        str(s.get("name"))
        for s in value
        if isinstance(s, Mapping) and s.get("name") not in SAFE_SYSCTLS
    )
    return f"sysctls {unsafe} are not allowed" if unsafe else None


def _when(test: Callable[[Any], bool], message: str) -> Callable[[Any], str | None]:
    return lambda value: message if test(value) else None


#: Field name (anywhere under the template) -> why its value breaks the
#: restricted profile, or None when it does not (a leading ".sub:" names a
#: field inside it).
_RULES: Final[dict[str, Callable[[Any], str | None]]] = {
    "hostNetwork": _when(lambda v: v is True, "sharing the node's network is not allowed"),
    "hostPID": _when(lambda v: v is True, "sharing the node's process namespace is not allowed"),
    "hostIPC": _when(lambda v: v is True, "sharing the node's IPC namespace is not allowed"),
    "hostPath": _when(lambda v: True, "hostPath volumes are not allowed"),
    "hostPort": _when(lambda v: v not in (None, 0), "host ports are not allowed"),
    "privileged": _when(lambda v: v is True, "privileged containers are not allowed"),
    "allowPrivilegeEscalation": _when(lambda v: v is True, "privilege escalation is not allowed"),
    "runAsNonRoot": _when(lambda v: v is False, "must not be false: workers run as non-root"),
    "runAsUser": _when(lambda v: v == 0, "running as root (UID 0) is not allowed"),
    "procMount": _when(lambda v: v not in (None, "Default"), "only procMount Default is allowed"),
    "hostProcess": _when(lambda v: v is True, "Windows host processes are not allowed"),
    "capabilities": _added_capabilities,
    "seccompProfile": _seccomp,
    "sysctls": _sysctls,
}


def _seccomp_confined(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("type") in ("RuntimeDefault", "Localhost")


def _container_contexts(template: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(spec path, securityContext) of every container the template puts in the pod.

    The worker's is the operator's own default unless containerSecurityContext
    replaces it; init containers and sidecars have only what they say.
    """
    root = "spec.podTemplate"
    worker = template.get("containerSecurityContext")
    out: list[tuple[str, Mapping[str, Any]]] = [
        (
            f"{root}.containerSecurityContext",
            worker
            if isinstance(worker, Mapping)
            else {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        )
    ]
    for field in ("initContainers", "sidecars"):
        for i, container in enumerate(template.get(field) or []):
            if isinstance(container, Mapping):
                ctx = container.get("securityContext")
                out.append(
                    (
                        f"{root}.{field}[{i}].securityContext",
                        ctx if isinstance(ctx, Mapping) else {},
                    )
                )
    return out


def _missing(template: Mapping[str, Any]) -> list[str]:
    """What the restricted profile requires and the template leaves out.

    Explicit bad values are ``_RULES``' business; this is about omissions:
    every container must forbid privilege escalation and drop ALL
    capabilities, and run as non-root with a confined seccomp profile, set
    on the pod or on every container.
    """
    problems: list[str] = []
    contexts = _container_contexts(template)
    for where, ctx in contexts:
        if ctx.get("allowPrivilegeEscalation") is None:
            problems.append(f"{where}.allowPrivilegeEscalation: must be set to false")
        drop = (ctx.get("capabilities") or {}).get("drop") or []
        if "ALL" not in drop:
            problems.append(f"{where}.capabilities.drop: must include ALL")
    pod = template.get("securityContext")
    if isinstance(pod, Mapping):  # replaces the operator's non-root, seccomp default
        root = "spec.podTemplate.securityContext"
        if pod.get("runAsNonRoot") is None and not all(
            ctx.get("runAsNonRoot") is True for _, ctx in contexts
        ):
            problems.append(f"{root}.runAsNonRoot: must be true (here or in every container)")
        if pod.get("seccompProfile") is None and not all(
            _seccomp_confined(ctx.get("seccompProfile")) for _, ctx in contexts
        ):
            problems.append(
                f"{root}.seccompProfile: must be RuntimeDefault or Localhost "
                "(here or in every container)"
            )
    return problems


def violations(cluster_name: str, spec: Mapping[str, Any]) -> list[str]:
    """Fields of ``spec.podTemplate`` that break the restricted profile, each named.

    Every key anywhere under the template is checked, so fields added to the
    template later (sidecars, init containers, container securityContext)
    are covered without changes here.
    """
    template = spec.get("podTemplate") or {}
    root = "spec.podTemplate"
    problems: list[str] = []
    for here, key, value in _walk(template, root):
        rule = _RULES.get(key)
        problem = rule(value) if rule is not None else None
        if problem is not None:
            problems.append(f"{here}{problem}" if problem.startswith(".") else f"{here}: {problem}")
    problems.extend(_missing(template))
    for i, volume in enumerate(template.get("volumes") or []):
        if not isinstance(volume, Mapping):
            continue
        for source in sorted(set(volume) - {"name"} - RESTRICTED_VOLUME_SOURCES - {"hostPath"}):
            problems.append(f"{root}.volumes[{i}].{source}: {source} volumes are not allowed")
    own = worker_service_account_name(cluster_name)
    for key in ("serviceAccountName", "serviceAccount"):
        chosen = template.get(key)
        if chosen and chosen != own:
            problems.append(
                f"{root}.{key}: {chosen!r} is not this cluster's own ServiceAccount "
                f"(only {own!r} may be named; its token is mounted into the workers)"
            )
    return problems


#: Said once after the template's problems: how to fix, or who may allow it.
REFUSAL_HINT: Final = (
    "the workers' pod template is refused: it breaks the Pod Security 'restricted' profile "
    "(a cluster admin can allow such templates with the chart value "
    "operator.podSecurity.allowPrivilegedTemplates)"
)


def secret_problem(field: str, name: str, secret: Mapping[str, Any] | None) -> str | None:
    """Why the Secret named by ``field`` (e.g. spec.auth.existingSecret) may not be mounted."""
    if secret is None:
        return f"{field} {name!r} not found"
    labels = (secret.get("metadata") or {}).get("labels") or {}
    if labels.get(SECRET_LABEL) != "true":
        return (
            f"{field} {name!r} is not labelled for patio: only Secrets labelled "
            f"{SECRET_LABEL}=true are mounted into workers "
            f"(kubectl label secret {name} {SECRET_LABEL}=true)"
        )
    return None
