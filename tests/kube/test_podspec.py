"""Unit tests of the node agent's pure parts: env resolution, $(VAR)
expansion, volume files and the atomic volume writer. No cluster needed."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from tests.kube.podspec import ConfigError, expand, resolve_env, volume_files
from tests.kube.volumes import DATA_LINK, VolumeError, write_atomic

POD: dict[str, Any] = {
    "metadata": {"name": "w-0", "namespace": "ns", "uid": "u1", "labels": {"app": "w"}},
    "spec": {"nodeName": "patio-node", "serviceAccountName": "sa"},
    "status": {"podIP": "127.0.0.7", "hostIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.7"}]},
}
SECRET = {"data": {"key": base64.b64encode(b"s3cret").decode()}}
CM = {"data": {"peers": "a,b", "mode": "fast"}}


def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    assert namespace == "ns"
    return {("Secret", "auth"): SECRET, ("ConfigMap", "cfg"): CM}.get((kind, name))


def test_env_values_refs_and_downward_api() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "A", "value": "1"},
            {"name": "B", "value": "$(A)-$(CFG_mode)-$$(A)-$(NOPE)"},
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": "auth", "key": "key"}}},
            {"name": "P", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "peers"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {
                "name": "APP",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
            },
            {
                "name": "OPT",
                "valueFrom": {"secretKeyRef": {"name": "gone", "key": "x", "optional": True}},
            },
        ],
    }
    env = resolve_env(POD, container, lookup)
    assert env == {
        "CFG_peers": "a,b",
        "CFG_mode": "fast",
        "A": "1",
        "B": "1-fast-$(A)-$(NOPE)",
        "K": "s3cret",
        "P": "a,b",
        "IP": "127.0.0.7",
        "N": "w-0",
        "NS": "ns",
        "NODE": "patio-node",
        "HOST": "127.0.0.1",
        "APP": "w",
    }


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"secretKeyRef": {"name": "gone", "key": "x"}}, 'secret "gone" not found'),
        ({"secretKeyRef": {"name": "auth", "key": "nokey"}}, "couldn't find key nokey"),
        ({"configMapKeyRef": {"name": "nocm", "key": "x"}}, 'configmap "nocm" not found'),
    ],
)
def test_env_missing_reference_is_a_config_error(ref: dict[str, Any], message: str) -> None:
    container = {"name": "c", "env": [{"name": "X", "valueFrom": ref}]}
    with pytest.raises(ConfigError, match=message):
        resolve_env(POD, container, lookup)


def test_expand() -> None:
    assert expand("--bind=$(IP):$(PORT) $$(IP)", {"IP": "127.0.0.2", "PORT": "80"}) == (
        "--bind=127.0.0.2:80 $(IP)"
    )


def test_volume_files_secret_items_and_projected() -> None:
    secret_vol = {
        "name": "v",
        "secret": {"secretName": "auth", "items": [{"key": "key", "path": "k/f"}]},
    }
    assert volume_files(POD, secret_vol, lookup) == {"k/f": (b"s3cret", 0o644)}
    projected = {
        "name": "p",
        "projected": {
            "sources": [
                {"configMap": {"name": "cfg"}},
                {
                    "downwardAPI": {
                        "items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
                    }
                },
                {"serviceAccountToken": {"path": "token"}},
            ]
        },
    }
    files = volume_files(POD, projected, lookup, token=lambda src: b"tok")
    assert files == {
        "peers": (b"a,b", 0o644),
        "mode": (b"fast", 0o644),
        "name": (b"w-0", 0o644),
        "token": (b"tok", 0o644),
    }
    assert volume_files(POD, {"name": "e", "emptyDir": {}}, lookup) is None
    with pytest.raises(ConfigError):
        volume_files(POD, {"name": "x", "secret": {"secretName": "gone"}}, lookup)


def test_atomic_writer_swaps_data_link(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    assert write_atomic(target, {"a": (b"1", 0o644), "d/b": (b"2", 0o600)})
    first = os.readlink(target / DATA_LINK)
    assert (target / "a").read_bytes() == b"1"
    assert (target / "d" / "b").read_bytes() == b"2"
    assert ((target / "d" / "b").stat().st_mode & 0o777) == 0o600
    # no change -> nothing written
    assert not write_atomic(target, {"a": (b"1", 0o644), "d/b": (b"2", 0o600)})
    assert os.readlink(target / DATA_LINK) == first
    # change: new data dir, removed key disappears, old dir is gone
    fd = os.open(target / "a", os.O_RDONLY)  # an open reader keeps its view
    try:
        assert write_atomic(target, {"a": (b"new", 0o644), "c": (b"3", 0o644)})
        assert os.read(fd, 10) == b"1"
    finally:
        os.close(fd)
    assert os.readlink(target / DATA_LINK) != first
    assert not (target / first).exists()
    assert (target / "a").read_bytes() == b"new"
    assert (target / "c").read_bytes() == b"3"
    assert not (target / "d").exists()
    with pytest.raises(VolumeError):
        write_atomic(target, {"../escape": (b"", 0o644)})


def test_ip_pool_lowest_free_unique_across_pools_and_reused(tmp_path: Path) -> None:
    from tests.kube.nodeagent import IpPool

    a, b = IpPool(tmp_path), IpPool(tmp_path)  # e.g. two test sessions at once
    assert [a.allocate(), a.allocate()] == ["127.0.0.2", "127.0.0.3"]
    assert b.allocate() == "127.0.0.4"  # held by the other pool: skipped
    a.release("127.0.0.2")
    assert b.allocate() == "127.0.0.2"  # freed: reused, lowest first
    assert a.allocate() == "127.0.0.5"
    assert a.in_use() == ["127.0.0.3", "127.0.0.5"]
    assert b.in_use() == ["127.0.0.2", "127.0.0.4"]
