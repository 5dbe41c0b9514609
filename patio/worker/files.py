"""Noticing that mounted files changed, the way Kubernetes changes them.

Kubernetes updates a mounted Secret or ConfigMap by writing a new timestamped
directory and swapping the ``..data`` symlink to it. The path we were given
(``/etc/patio/key``) is a symlink chain that never changes itself, and the new
file can have the same size and even the same mtime as the old one. So a
file's identity here is its fully resolved path plus the stat of the target
(device, inode, mtime, size): any of them changing means "re-read".

Polling once a second is deliberate: inotify does not follow symlink swaps in
parent directories, and one ``stat`` a second per file costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

log = logging.getLogger("patio.worker.files")

POLL_INTERVAL = 1.0

Identity = tuple[str, int, int, int, int] | None


def file_identity(path: str) -> Identity:
    """(resolved path, device, inode, mtime_ns, size), or None if it does not exist."""
    try:
        resolved = os.path.realpath(path)
        st = os.stat(resolved)
    except OSError:
        return None
    return (resolved, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class FileSetWatch:
    """Remembers the identity of a few files and says when any of them changed."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self._seen = self.snapshot()

    def snapshot(self) -> tuple[Identity, ...]:
        return tuple(file_identity(path) for path in self.paths)

    def changed(self) -> bool:
        now = self.snapshot()
        if now == self._seen:
            return False
        self._seen = now
        return True


async def watch_files(
    paths: Sequence[str],
    on_change: Callable[[], None],
    *,
    interval: float = POLL_INTERVAL,
    what: str = "files",
) -> None:
    """Call ``on_change()`` whenever any of ``paths`` changes; runs until cancelled.

    ``on_change`` must handle (and log) bad content itself; an exception that
    escapes it is logged here and the watch goes on, so one bad reload never
    stops later good ones from being picked up.
    """
    watch = FileSetWatch(paths)
    while True:
        await asyncio.sleep(interval)
        if not watch.changed():
            continue
        log.debug("%s changed: %s", what, ", ".join(paths))
        try:
            on_change()
        except Exception:
            log.exception("reloading %s failed; keeping the previous configuration", what)
