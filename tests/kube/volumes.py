"""Per-pod volume directories, updated atomically like the kubelet does.

A volume directory holds a timestamped folder with the files, a ``..data``
symlink to it and one symlink per top-level entry through ``..data``. An
update writes a new timestamped folder and swaps ``..data`` with a rename, so
a reader inside the pod sees either the old or the new set of files, never a
mix, and sees it without a restart (the directory itself is bind-mounted).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from pathlib import Path, PurePosixPath

DATA_LINK = "..data"


class VolumeError(ValueError):
    pass


def _check_rel(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts or p.parts[0].startswith(".."):
        raise VolumeError(f"invalid volume item path {path!r}")
    return p


def read_current(target: Path) -> dict[str, tuple[bytes, int]]:
    """The files the volume shows now: relative path -> (content, mode)."""
    data = target / DATA_LINK
    out: dict[str, tuple[bytes, int]] = {}
    if not data.is_dir():
        return out
    for root, _dirs, files in os.walk(data, followlinks=False):
        for name in files:
            full = Path(root) / name
            rel = full.relative_to(data).as_posix()
            out[rel] = (full.read_bytes(), full.stat().st_mode & 0o777)
    return out


def write_atomic(target: Path, files: dict[str, tuple[bytes, int]]) -> bool:
    """Make ``target`` show exactly ``files`` (path -> (content, mode)).

    Returns True if anything changed.
    """
    for rel in files:
        _check_rel(rel)
    target.mkdir(parents=True, exist_ok=True)
    if (target / DATA_LINK).is_symlink() and read_current(target) == files:
        return False
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + secrets.token_hex(4)
    new_dir = target / stamp
    new_dir.mkdir()
    for rel, (content, mode) in files.items():
        path = new_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    old = os.readlink(target / DATA_LINK) if (target / DATA_LINK).is_symlink() else None
    tmp_link = target / "..data_tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    os.symlink(stamp, tmp_link)
    os.rename(tmp_link, target / DATA_LINK)  # the atomic swap
    top = {PurePosixPath(rel).parts[0] for rel in files}
    for name in top:
        link = target / name
        if not link.is_symlink():
            os.symlink(f"{DATA_LINK}/{name}", link)
    for entry in target.iterdir():
        if entry.name.startswith(".."):
            continue
        if entry.is_symlink() and entry.name not in top:
            entry.unlink()
    if old and old != stamp:
        shutil.rmtree(target / old, ignore_errors=True)
    return True
