"""Peers file parsing at start-up; noticing Kubernetes-style file swaps.

Watching the peers file is the broker's (test_worker_inprocess.py runs it
through the worker with the real broker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from patio.worker.files import FileSetWatch, file_identity
from patio.worker.peers import PeersFileError, parse_peers_text, read_peers_file


def test_parse_peers_text() -> None:
    text = """
    # the mesh
    10.0.0.1:15383
    10.0.0.2:9000   # a comment after an address
    [fd00::3]:15383
    worker-4.patio
    """
    assert parse_peers_text(text, default_port=15383) == {
        ("10.0.0.1", 15383), ("10.0.0.2", 9000), ("fd00::3", 15383), ("worker-4.patio", 15383),
    }  # fmt: skip


def test_malformed_line_is_named() -> None:
    with pytest.raises(PeersFileError, match="line 2"):
        parse_peers_text("a:1\nb:notaport\n", default_port=1)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PeersFileError, match="does not exist"):
        read_peers_file(str(tmp_path / "nope"), default_port=1)


def kube_swap(directory: Path, name: str, content: str, version: int) -> None:
    """Update a file the way the kubelet updates a mounted ConfigMap/Secret."""
    data = directory / f"..{version}"
    data.mkdir()
    (data / name).write_text(content)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(data.name)
    os.replace(tmp_link, directory / "..data")
    if not (directory / name).is_symlink():
        (directory / name).symlink_to(f"..data/{name}")


def test_symlink_swap_is_noticed_even_with_same_size_and_mtime(tmp_path: Path) -> None:
    kube_swap(tmp_path, "key", "AAAA", 1)
    watch = FileSetWatch([str(tmp_path / "key")])
    assert not watch.changed()
    kube_swap(tmp_path, "key", "BBBB", 2)
    stat1 = os.stat(tmp_path / "..1" / "key")
    os.utime(tmp_path / "..2" / "key", ns=(stat1.st_atime_ns, stat1.st_mtime_ns))
    assert watch.changed()
    assert not watch.changed()
    assert file_identity(str(tmp_path / "missing")) is None


def test_a_garbage_line_is_refused_not_dialled_forever() -> None:
    """`this is garbage` used to become a host name that was dialled, failing, for ever."""
    from patio.broker.membership import parse_peers
    from patio.worker.peers import PeersFileError, parse_peers_text

    with pytest.raises(ValueError, match="neither an IP address nor a host name"):
        parse_peers("127.0.0.2:1\nthis is garbage\n", 15383)
    with pytest.raises(PeersFileError, match="line 2"):
        parse_peers_text("127.0.0.2:1\nthis is garbage\n", default_port=15383)
    assert parse_peers("patio-0.patio.ns.svc:1\n[::1]:2\n10.0.0.1\n", 15383) == {
        ("patio-0.patio.ns.svc", 1), ("::1", 2), ("10.0.0.1", 15383)}  # fmt: skip
