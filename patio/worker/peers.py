"""Peer sources for the worker: a watched peers file and periodic DNS lookups.

The broker owns the membership (``broker.set_peers(source, addresses)``); these
loops only turn a file or a DNS name into a set of ``(host, port)`` and hand
it over when it changes. Both keep the last good set when the source is
broken (a missing, empty or malformed file; a failed lookup) and log why: a
half-written file or a DNS hiccup must not make a worker drop the mesh.

These are the worker's own implementation; when ``patio.broker.membership``
provides watchers the runtime prefers those (see ``runtime.py``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from patio.worker.config import ConfigError, PeerAddress, parse_peer_address
from patio.worker.files import POLL_INTERVAL, FileSetWatch

log = logging.getLogger("patio.worker.peers")

DNS_INTERVAL = 5.0

PeerSet = frozenset[PeerAddress]
OnChange = Callable[[PeerSet], None]


class PeersFileError(ConfigError):
    """The peers file is missing, unreadable or has a line that is not an address."""


def parse_peers_text(text: str, *, default_port: int, source: str = "peers file") -> PeerSet:
    """One ``host:port`` (or ``[v6]:port``) a line; ``#`` starts a comment."""
    peers: set[PeerAddress] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            peers.add(parse_peer_address(line, default_port=default_port))
        except ConfigError as exc:
            raise PeersFileError(f"{source} line {number}: {exc}") from None
    return frozenset(peers)


def read_peers_file(path: str, *, default_port: int) -> PeerSet:
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise PeersFileError(f"peers file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PeersFileError(f"peers file {path} cannot be read: {exc}") from None
    return parse_peers_text(text, default_port=default_port, source=f"peers file {path}")


async def watch_file(
    path: str,
    on_change: OnChange,
    *,
    default_port: int = 15383,
    interval: float = POLL_INTERVAL,
    initial: PeerSet | None = None,
) -> None:
    """Call ``on_change(peers)`` with the file's set now and whenever it changes.

    Runs until cancelled. An empty file counts as broken, not as "no peers":
    truncate-then-write editors and half-synced volumes produce empty files far
    more often than anyone means to remove every peer.
    """
    last_good: PeerSet | None = initial
    watch = FileSetWatch([path])
    first = initial is None
    while True:
        if first or watch.changed():
            try:
                peers = read_peers_file(path, default_port=default_port)
                if not peers and last_good:
                    raise PeersFileError(f"peers file {path} is empty")
            except PeersFileError as exc:
                log.error(
                    "%s; keeping the last good peer set (%d peers)", exc, len(last_good or ())
                )
            else:
                if peers != last_good:
                    log.info("peers file %s: %d peers", path, len(peers))
                    last_good = peers
                    on_change(peers)
        first = False
        await asyncio.sleep(interval)


async def resolve_peers(name: str, port: int) -> PeerSet:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return frozenset((str(info[4][0]), port) for info in infos)


async def watch_dns(
    name: str,
    port: int,
    on_change: OnChange,
    *,
    interval: float = DNS_INTERVAL,
) -> None:
    """Resolve ``name`` every ``interval`` s; call ``on_change`` when the set changes."""
    last_good: PeerSet | None = None
    while True:
        try:
            peers = await resolve_peers(name, port)
        except (OSError, UnicodeError) as exc:
            log.error(
                "resolving peers %s failed (%s); keeping the last good peer set (%d peers)",
                name,
                exc,
                len(last_good or ()),
            )
        else:
            if peers != last_good:
                log.info("peers from DNS %s: %d addresses", name, len(peers))
                last_good = peers
                on_change(peers)
        await asyncio.sleep(interval)
