"""Membership sources: where a mesh learns the addresses of its peers.

Each source feeds ``broker.set_peers(source_name, addresses)``; the broker
dials the union of all sources. A source that fails (a malformed or missing
file, a DNS error) keeps its last good set and logs why, so a bad update never
empties a running mesh.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("patio.membership")

Address = tuple[str, int]
OnChange = Callable[[set[Address]], None]

# Polling a file's identity once a second costs nothing and notices the
# symlink swap Kubernetes uses for mounted ConfigMaps within a second.
FILE_POLL_INTERVAL = 1.0
DNS_POLL_INTERVAL = 5.0


# A DNS name (labels of letters, digits, '-' and '_', dot-separated, an
# optional final dot); anything else that is not an IP address is a typo or
# garbage in a peers file, and is refused rather than dialled forever.
_HOSTNAME = re.compile(r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")  # fmt: skip


def valid_host(host: str) -> bool:
    """An IP address (v4, or v6 with an optional %zone) or a DNS name."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return bool(_HOSTNAME.match(host))
    return True


def _checked(host: str, text: str) -> str:
    if not valid_host(host):
        raise ValueError(f"{host!r} is neither an IP address nor a host name (in {text!r})")
    return host


def parse_address(text: str, default_port: int) -> Address:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"unclosed '[' in {text!r}")
        if not rest:
            return _checked(host, text), default_port
        if not rest.startswith(":"):
            raise ValueError(f"expected ':port' after ']' in {text!r}")
        return _checked(host, text), _port(rest[1:], text)
    if text.count(":") > 1:  # a bare IPv6 address
        return _checked(text, text), default_port
    host, sep, port = text.partition(":")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    return _checked(host, text), _port(port, text) if sep else default_port


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"port is not a number in {whole!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {whole!r}")
    return port


def parse_peers(text: str, default_port: int) -> set[Address]:
    """One address a line (commas also separate); ``#`` starts a comment."""
    peers: set[Address] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        for item in filter(None, (part.strip() for part in line.split(","))):
            try:
                peers.add(parse_address(item, default_port))
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
    return peers


def _identity(path: Path) -> tuple[str, int, int, int] | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return real, st.st_ino, st.st_mtime_ns, st.st_size


def read_peers_file(path: str | os.PathLike[str], default_port: int) -> set[Address]:
    """Read and parse a peers file; ``ValueError``/``OSError`` say what is wrong."""
    text = Path(path).read_text(encoding="utf-8")
    peers = parse_peers(text, default_port)
    if not peers:
        raise ValueError("the file lists no peers")
    return peers


async def watch_file(
    path: str | os.PathLike[str],
    on_change: OnChange,
    *,
    default_port: int,
    interval: float = FILE_POLL_INTERVAL,
) -> None:
    """Call ``on_change`` with the file's peers now and whenever it changes."""
    file = Path(path)
    seen: tuple[str, int, int, int] | str | None = "unread"
    while True:
        identity = _identity(file)
        if identity != seen:
            seen = identity
            try:
                peers = read_peers_file(file, default_port)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                log.error("peers file %s: %s; keeping the last good peer list", file, exc)
            else:
                on_change(peers)
        await asyncio.sleep(interval)


async def resolve_all(name: str, port: int) -> set[Address]:
    """Every A and AAAA record of ``name`` (a headless Service, say)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return {(str(info[4][0]), port) for info in infos}


async def watch_dns(
    name: str,
    port: int,
    on_change: OnChange,
    *,
    interval: float = DNS_POLL_INTERVAL,
) -> None:
    """Re-resolve ``name`` periodically; call ``on_change`` when its records change."""
    last: set[Address] | None = None
    failing = ""  # logged once per failure, not on every retry
    while True:
        try:
            peers = await resolve_all(name, port)
        except OSError as exc:
            if str(exc) != failing:
                failing = str(exc)
                log.error("resolving %s: %s; keeping the last good peer list", name, exc)
        else:
            if failing:
                failing = ""
                log.info("resolving %s works again", name)
            if peers != last:
                last = peers
                on_change(peers)
        await asyncio.sleep(interval)
