"""Pure helpers that turn a pod object (a dict) into what a process needs:
its environment, its command line, and its volume files."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from typing import Any

Obj = dict[str, Any]
# (kind, namespace, name) -> object dict, or None if it does not exist
Lookup = Callable[[str, str, str], Obj | None]


class ConfigError(Exception):
    """The pod refers to something that does not exist (kubelet's
    ``CreateContainerConfigError``)."""


_FIELD_LABEL = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Obj, path: str) -> str:
    """Downward API ``fieldRef.fieldPath``."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    m = _FIELD_LABEL.match(path)
    if m:
        return str(meta.get(m.group(1), {}).get(m.group(2), ""))
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs", [])),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs", [])),
    }
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {}) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    if path not in simple:
        raise ConfigError(f"unsupported fieldPath {path!r}")
    return str(simple[path] or "")


def resource_value(container: Obj, ref: Obj, node_allocatable: Mapping[str, str]) -> str:
    """Downward API ``resourceFieldRef`` (quantities returned as written)."""
    kind, _, res = str(ref.get("resource", "")).partition(".")
    resources = container.get("resources", {}) or {}
    value = (resources.get(kind) or {}).get(res)
    if value is None and kind in ("limits", "requests"):
        value = (resources.get("limits") or {}).get(res) if kind == "requests" else None
        value = value or node_allocatable.get(res, "0")
    return str(value)


def _secret_data(obj: Obj) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


def _configmap_data(obj: Obj) -> dict[str, bytes]:
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def object_data(kind: str, obj: Obj) -> dict[str, bytes]:
    return _secret_data(obj) if kind == "Secret" else _configmap_data(obj)


def _key_ref(kind: str, ref: Obj, namespace: str, lookup: Lookup) -> str | None:
    obj = lookup(kind, namespace, ref["name"])
    optional = bool(ref.get("optional"))
    if obj is None:
        if optional:
            return None
        raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
    data = object_data(kind, obj)
    if ref["key"] not in data:
        if optional:
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
    return data[ref["key"]].decode(errors="replace")


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced,
    ``$$`` escapes a ``$``, undefined references stay as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR.sub(sub, text)


def resolve_env(
    pod: Obj,
    container: Obj,
    lookup: Lookup,
    node_allocatable: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment from ``envFrom`` then ``env`` (later wins)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []) or []:
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = source.get(key)
            if ref is None:
                continue
            obj = lookup(kind, namespace, ref["name"])
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
            for k, v in object_data(kind, obj).items():
                env[prefix + k] = v.decode(errors="replace")
    for var in container.get("env", []) or []:
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        vf = var["valueFrom"]
        value: str | None
        if "secretKeyRef" in vf:
            value = _key_ref("Secret", vf["secretKeyRef"], namespace, lookup)
        elif "configMapKeyRef" in vf:
            value = _key_ref("ConfigMap", vf["configMapKeyRef"], namespace, lookup)
        elif "fieldRef" in vf:
            value = field_value(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            value = resource_value(container, vf["resourceFieldRef"], node_allocatable or {})
        else:
            raise ConfigError(f"unsupported valueFrom for {name}: {sorted(vf)}")
        if value is not None:
            env[name] = value
    return env


def _items(
    data: dict[str, bytes], items: list[Obj] | None, default_mode: int, what: str
) -> dict[str, tuple[bytes, int]]:
    if not items:
        return {k: (v, default_mode) for k, v in data.items()}
    out: dict[str, tuple[bytes, int]] = {}
    for item in items:
        if item["key"] not in data:
            raise ConfigError(f"couldn't find key {item['key']} in {what}")
        out[item["path"]] = (data[item["key"]], int(item.get("mode", default_mode)))
    return out


def _kind_source(
    kind: str, src: Obj, name_key: str, namespace: str, lookup: Lookup, *, default_mode: int
) -> dict[str, tuple[bytes, int]]:
    name = src[name_key]
    obj = lookup(kind, namespace, name)
    if obj is None:
        if src.get("optional"):
            return {}
        raise ConfigError(f'{kind.lower()} "{name}" not found')
    mode = int(src.get("defaultMode", default_mode))
    return _items(object_data(kind, obj), src.get("items"), mode, f"{kind} {namespace}/{name}")


def _downward(pod: Obj, src: Obj, default_mode: int) -> dict[str, tuple[bytes, int]]:
    out: dict[str, tuple[bytes, int]] = {}
    containers = {c["name"]: c for c in pod["spec"].get("containers", [])}
    for item in src.get("items", []) or []:
        mode = int(item.get("mode", src.get("defaultMode", default_mode)))
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            ref = item["resourceFieldRef"]
            container = containers.get(ref.get("containerName", ""), {})
            value = resource_value(container, ref, {})
        out[item["path"]] = (value.encode(), mode)
    return out


def volume_files(
    pod: Obj,
    volume: Obj,
    lookup: Lookup,
    token: Callable[[Obj], bytes] | None = None,
) -> dict[str, tuple[bytes, int]] | None:
    """Files of a Secret/ConfigMap/downwardAPI/projected volume, or None for
    volumes that are plain directories (emptyDir) or not supported."""
    namespace = pod["metadata"]["namespace"]
    if "secret" in volume:
        return _kind_source(
            "Secret", volume["secret"], "secretName", namespace, lookup, default_mode=0o644
        )
    if "configMap" in volume:
        return _kind_source(
            "ConfigMap", volume["configMap"], "name", namespace, lookup, default_mode=0o644
        )
    if "downwardAPI" in volume:
        return _downward(pod, volume["downwardAPI"], 0o644)
    if "projected" in volume:
        proj = volume["projected"]
        mode = int(proj.get("defaultMode", 0o644))
        out: dict[str, tuple[bytes, int]] = {}
        for src in proj.get("sources", []) or []:
            if "secret" in src:
                out.update(
                    _kind_source(
                        "Secret", src["secret"], "name", namespace, lookup, default_mode=mode
                    )
                )
            elif "configMap" in src:
                out.update(
                    _kind_source(
                        "ConfigMap", src["configMap"], "name", namespace, lookup, default_mode=mode
                    )
                )
            elif "downwardAPI" in src:
                out.update(_downward(pod, src["downwardAPI"], mode))
            elif "serviceAccountToken" in src:
                if token is None:
                    raise ConfigError("serviceAccountToken projection needs a token source")
                out[src["serviceAccountToken"]["path"]] = (token(src["serviceAccountToken"]), mode)
        return out
    return None
