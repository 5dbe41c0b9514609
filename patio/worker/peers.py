"""Checking the peers file when the worker starts.

Watching it afterwards is the broker's job (``TCPMeshBroker.watch_peers_file``,
patio.broker.membership), which keeps the last good set when the file breaks.
At start-up there is no last good set, so a missing or malformed file is a
configuration error (exit 2) with the line that is wrong; an empty file is
accepted there as "no peers yet".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from patio.worker.config import ConfigError, PeerAddress, parse_peer_address

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
