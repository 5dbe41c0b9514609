"""The worker's configuration: flags and ``PATIO_*`` variables -> a frozen dataclass.

This module is pure: :func:`load_config` takes argv and an environment mapping
and either returns a :class:`WorkerConfig` or raises :class:`ConfigError` with
one line naming the problem. Nothing here reads files or opens sockets; the
runtime checks what only the filesystem and the network can tell (key files,
TLS files, ports) and reports those as :class:`ConfigError` too, so every bad
configuration ends the same way: exit code 2 and one line on stderr.

docs/worker-contract.md is the specification; the table in :data:`OPTIONS`
mirrors it one row per option.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from patio.broker.membership import valid_host
from patio.broker.tcp.server import DEFAULT_MAX_PEER_CALL_BYTES
from patio.proto.messages import DEFAULT_MAX_FRAME_SIZE
from patio.transport import DEFAULT_MAX_BUFFERED_OUTPUT, check_limits

DEFAULT_PORT = 15383
DEFAULT_METRICS_PORT = 9383
DEFAULT_READY_PEER_RATIO = 0.0  # links do not decide readiness (docs/worker-contract.md)
DEFAULT_DRAIN_TIMEOUT = 30.0
EXECUTOR_KINDS = ("async", "thread", "process", "null")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("plain", "json")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

PeerAddress = tuple[str, int]


class ConfigError(Exception):
    """Bad configuration: the message is one line that names the problem."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting.

    argparse's own error path prints a multi-line usage block; the contract
    asks for one line naming the problem, so we turn it into a ConfigError.
    """

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything ``patio worker`` needs, resolved and validated."""

    registry: str
    listen: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    node_id: str = ""
    peers: tuple[PeerAddress, ...] = ()
    peers_file: str | None = None
    peers_dns: PeerAddress | None = None
    key_file: str | None = None
    key: str | None = None
    next_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    executor: str = "async"
    max_workers: int | None = None
    max_peer_call_bytes: int = DEFAULT_MAX_PEER_CALL_BYTES
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_address: str = "127.0.0.1"
    ready_peer_ratio: float = DEFAULT_READY_PEER_RATIO
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    log_level: str = "info"
    log_format: str = "plain"
    allow_empty_key: bool = False
    allow_weak_key: bool = False
    frame_mac: bool = True
    event_loop: str = "auto"
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_buffered_output: int = DEFAULT_MAX_BUFFERED_OUTPUT

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port != 0


# (flag, variable, help). Flags default to None so "not given" is visible and
# the variable can fill in; the real defaults are applied in load_config.
OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--registry", "PATIO_REGISTRY", "the patio.Registry to serve, as MODULE:ATTRIBUTE"),
    ("--listen", "PATIO_LISTEN", "address of the mesh listener (default $POD_IP, else 127.0.0.1)"),
    ("--port", "PATIO_PORT", f"mesh port (default {DEFAULT_PORT})"),
    (
        "--node-id",
        "PATIO_NODE_ID",
        "stable identity in the mesh (default $POD_NAME, else host-pid)",
    ),
    ("--peers", "PATIO_PEERS", "static peers, HOST:PORT[,HOST:PORT...]"),
    ("--peers-file", "PATIO_PEERS_FILE", "watched file with one HOST:PORT a line"),
    ("--peers-dns", "PATIO_PEERS_DNS", "NAME[:PORT] whose A/AAAA records are the peers"),
    ("--key-file", "PATIO_KEY_FILE", "file holding the shared key (re-read when it changes)"),
    ("--key", "PATIO_KEY", "the shared key inline (development only)"),
    ("--next-key-file", "PATIO_NEXT_KEY_FILE", "file holding an extra accepted key (rotation)"),
    ("--tls-cert", "PATIO_TLS_CERT", "PEM certificate for mesh links"),
    ("--tls-key", "PATIO_TLS_KEY", "PEM private key of --tls-cert"),
    ("--tls-ca", "PATIO_TLS_CA", "PEM CA bundle; peers must present a certificate it signed"),
    ("--executor", "PATIO_EXECUTOR", "executor kind: async|thread|process|null (default async)"),
    ("--max-workers", "PATIO_MAX_WORKERS", "executor capacity (default: the executor's)"),
    (
        "--metrics-port",
        "PATIO_METRICS_PORT",
        f"HTTP port of /metrics /livez /readyz (default {DEFAULT_METRICS_PORT}, 0 disables)",
    ),
    (
        "--metrics-address",
        "PATIO_METRICS_ADDRESS",
        "address of the HTTP server (default: --listen)",
    ),
    (
        "--ready-peer-ratio",
        "PATIO_READY_PEER_RATIO",
        "share of known members that must be connected for /readyz "
        f"(default {DEFAULT_READY_PEER_RATIO:g}: links do not decide readiness)",
    ),
    (
        "--drain-timeout",
        "PATIO_DRAIN_TIMEOUT",
        f"seconds to finish work after SIGTERM (default {DEFAULT_DRAIN_TIMEOUT:g})",
    ),
    (
        "--max-frame-size",
        "PATIO_MAX_FRAME_SIZE",
        "largest frame a peer may send after the handshake, in bytes (64KiB..4GiB; "
        "default 16MiB; give every member the same)",
    ),
    (
        "--max-buffered-output",
        "PATIO_MAX_BUFFERED_OUTPUT",
        "output held for a peer that does not read before its link is cut, in bytes "
        "(at least --max-frame-size; default 64MiB)",
    ),
    (
        "--max-peer-call-bytes",
        "PATIO_MAX_PEER_CALL_BYTES",
        "argument bytes one peer's outstanding calls may hold here before its link is "
        "not read until half is answered (default 64MiB)",
    ),
    ("--log-level", "PATIO_LOG_LEVEL", "debug|info|warning|error (default info)"),
    ("--log-format", "PATIO_LOG_FORMAT", "plain|json (default plain)"),
    (
        "--event-loop",
        "PATIO_EVENT_LOOP",
        "auto|uvloop|asyncio (default auto: uvloop when it is installed)",
    ),
)
BOOLEAN_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--allow-empty-key", "PATIO_ALLOW_EMPTY_KEY", "permit an empty key on a non-loopback address"),
    (
        "--allow-weak-key",
        "PATIO_ALLOW_WEAK_KEY",
        "permit a key under 128 bits on a non-loopback address (make one with `patio keygen`)",
    ),
    (
        "--no-frame-mac",
        "PATIO_NO_FRAME_MAC",
        "do not authenticate frames (benchmarks on loopback only; every peer must agree)",
    ),
)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every worker option on ``parser`` (used by the CLI's subcommand)."""
    parser.add_argument(
        "registry_positional",
        nargs="?",
        metavar="MODULE:ATTRIBUTE",
        help="the registry to serve (same as --registry)",
    )
    for flag, variable, text in OPTIONS:
        parser.add_argument(flag, default=None, help=f"{text} [${variable}]")
    for flag, variable, text in BOOLEAN_OPTIONS:
        parser.add_argument(flag, action="store_true", default=None, help=f"{text} [${variable}]")


def make_parser(prog: str = "patio worker") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Serve a patio registry as a member of the mesh.")
    add_worker_arguments(parser)
    return parser


def load_config(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    hostname: str | None = None,
    pid: int | None = None,
) -> WorkerConfig:
    """Parse ``argv`` (the arguments after ``worker``) with ``environ`` as fallback."""
    namespace = make_parser().parse_args(list(argv))
    return config_from_namespace(namespace, environ, hostname=hostname, pid=pid)


def config_from_namespace(
    namespace: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    hostname: str | None = None,
    pid: int | None = None,
) -> WorkerConfig:
    """Resolve flag > variable > default for every option and validate the result."""
    opts = _Lookup(namespace, environ)
    registry = _registry(opts)
    listen = opts.pick("--listen", "PATIO_LISTEN") or environ.get("POD_IP") or "127.0.0.1"
    port_text = opts.pick("--port", "PATIO_PORT")
    port = _port(opts.name("--port"), port_text, DEFAULT_PORT)
    node_id = (
        opts.pick("--node-id", "PATIO_NODE_ID")
        or environ.get("POD_NAME")
        or f"{hostname if hostname is not None else socket.gethostname()}-"
        f"{pid if pid is not None else os.getpid()}"
    )
    peers, peers_dns = _peers(opts, port)
    key_file, key = resolve_key_source(opts.given("--key-file"), opts.given("--key"), environ)
    tls_cert, tls_key, tls_ca = _tls(opts)
    executor, max_workers = _executor(opts)
    metrics_port_text = opts.pick("--metrics-port", "PATIO_METRICS_PORT")
    metrics_port = _port(opts.name("--metrics-port"), metrics_port_text, DEFAULT_METRICS_PORT)
    ratio, drain_timeout = _readiness(opts)
    max_frame_size, max_buffered_output, max_peer_call_bytes = _limits(opts)
    log_level = opts.choice(
        "--log-level", "PATIO_LOG_LEVEL", "info", LOG_LEVELS, {"warn": "warning"}
    )
    log_format = opts.choice("--log-format", "PATIO_LOG_FORMAT", "plain", LOG_FORMATS)
    event_loop = opts.choice("--event-loop", "PATIO_EVENT_LOOP", "auto", EVENT_LOOPS)
    allow_empty_key, allow_weak_key = _key_allowances(opts)
    frame_mac = _frame_mac(opts, listen, peers, peers_dns)
    if key_file is None and not key and not allow_empty_key and not is_loopback(listen):
        raise ConfigError(
            f"no key for a worker listening on {listen} (not loopback): give --key-file "
            "(or --allow-empty-key to accept anyone who can reach the port)"
        )

    return WorkerConfig(
        registry=registry,
        listen=listen,
        port=port,
        node_id=node_id,
        peers=peers,
        peers_file=opts.pick("--peers-file", "PATIO_PEERS_FILE"),
        peers_dns=peers_dns,
        key_file=key_file,
        key=key,
        next_key_file=opts.pick("--next-key-file", "PATIO_NEXT_KEY_FILE"),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        executor=executor,
        max_workers=max_workers,
        max_peer_call_bytes=max_peer_call_bytes,
        metrics_port=metrics_port,
        metrics_address=opts.pick("--metrics-address", "PATIO_METRICS_ADDRESS") or listen,
        ready_peer_ratio=ratio,
        drain_timeout=drain_timeout,
        log_level=log_level,
        log_format=log_format,
        allow_empty_key=allow_empty_key,
        allow_weak_key=allow_weak_key,
        frame_mac=frame_mac,
        event_loop=event_loop,
        max_frame_size=max_frame_size,
        max_buffered_output=max_buffered_output,
    )


class _Lookup:
    """Flag > variable lookups that remember which one each value came from."""

    def __init__(self, namespace: argparse.Namespace, environ: Mapping[str, str]) -> None:
        self.flags = vars(namespace)
        self.environ = environ
        self._sources: dict[str, str] = {}

    def given(self, flag: str) -> str | None:
        value = self.flags.get(flag.lstrip("-").replace("-", "_"))
        return None if value is None else str(value)

    def pick(self, flag: str, variable: str) -> str | None:
        value = self.given(flag)
        if value is not None:
            return value
        env = self.environ.get(variable)
        if not env:  # an empty variable means "not set" (as in pod specs)
            return None
        self._sources[flag] = variable
        return env

    def name(self, flag: str) -> str:
        """Where a value came from, for its error message: the flag or the variable."""
        return self._sources.get(flag, flag)

    def choice(
        self,
        flag: str,
        variable: str,
        default: str,
        allowed: Sequence[str],
        aliases: Mapping[str, str] | None = None,
    ) -> str:
        """One of ``allowed`` (any case; ``aliases`` map other spellings to it)."""
        value = (self.pick(flag, variable) or default).lower()
        value = (aliases or {}).get(value, value)
        if value not in allowed:
            raise ConfigError(f"{self.name(flag)} must be {_alternatives(allowed)}, not {value!r}")
        return value


def _alternatives(allowed: Sequence[str]) -> str:
    """'a, b or c' for a few, 'one of a, b, c, d' for more."""
    if len(allowed) > 3:
        return f"one of {', '.join(allowed)}"
    return f"{', '.join(allowed[:-1])} or {allowed[-1]}"


def _registry(opts: _Lookup) -> str:
    positional = opts.flags.get("registry_positional")
    flag_registry = opts.given("--registry")
    if positional and flag_registry and positional != flag_registry:
        raise ConfigError(f"registry given twice: {positional!r} and --registry {flag_registry!r}")
    registry = positional or flag_registry or opts.environ.get("PATIO_REGISTRY") or ""
    if not registry:
        raise ConfigError("no registry given: pass MODULE:ATTRIBUTE or set PATIO_REGISTRY")
    check_registry_spec(registry)
    return str(registry)


def _peers(opts: _Lookup, port: int) -> tuple[tuple[PeerAddress, ...], PeerAddress | None]:
    peers_text = opts.pick("--peers", "PATIO_PEERS")
    try:
        peers = parse_peer_list(peers_text, default_port=port) if peers_text else ()
    except ConfigError as exc:
        raise ConfigError(f"{opts.name('--peers')}: {exc}") from None
    dns_text = opts.pick("--peers-dns", "PATIO_PEERS_DNS")
    if not dns_text:
        return peers, None
    return peers, parse_peer_address(dns_text, default_port=port, what=opts.name("--peers-dns"))


def _tls(opts: _Lookup) -> tuple[str | None, str | None, str | None]:
    cert = opts.pick("--tls-cert", "PATIO_TLS_CERT")
    key = opts.pick("--tls-key", "PATIO_TLS_KEY")
    ca = opts.pick("--tls-ca", "PATIO_TLS_CA")
    cert_name, key_name = opts.name("--tls-cert"), opts.name("--tls-key")
    if (cert is None) != (key is None):
        raise ConfigError(f"{cert_name} and {key_name} must be given together")
    if ca is not None and cert is None:
        raise ConfigError(f"{opts.name('--tls-ca')} needs {cert_name} and {key_name} (mutual TLS)")
    return cert, key, ca


def _executor(opts: _Lookup) -> tuple[str, int | None]:
    executor = opts.choice("--executor", "PATIO_EXECUTOR", "async", EXECUTOR_KINDS)
    text = opts.pick("--max-workers", "PATIO_MAX_WORKERS")
    if text is None:
        return executor, None
    max_workers = _int(opts.name("--max-workers"), text)
    if max_workers < 1:
        raise ConfigError(f"{opts.name('--max-workers')} must be at least 1, not {max_workers}")
    return executor, max_workers


def _readiness(opts: _Lookup) -> tuple[float, float]:
    """The ready-peer ratio and the drain timeout."""
    ratio_text = opts.pick("--ready-peer-ratio", "PATIO_READY_PEER_RATIO")
    ratio = _float(opts.name("--ready-peer-ratio"), ratio_text, DEFAULT_READY_PEER_RATIO)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(
            f"{opts.name('--ready-peer-ratio')} must be between 0 and 1, not {ratio:g}"
        )
    drain_text = opts.pick("--drain-timeout", "PATIO_DRAIN_TIMEOUT")
    drain_timeout = _float(opts.name("--drain-timeout"), drain_text, DEFAULT_DRAIN_TIMEOUT)
    if drain_timeout < 0:
        raise ConfigError(
            f"{opts.name('--drain-timeout')} must not be negative, not {drain_timeout:g}"
        )
    return ratio, drain_timeout


def _limits(opts: _Lookup) -> tuple[int, int, int]:
    """The frame size and output buffer caps (checked together as the broker checks
    them) and the bytes of calls one peer may have outstanding here."""
    frame_text = opts.pick("--max-frame-size", "PATIO_MAX_FRAME_SIZE")
    max_frame_size = _size(opts.name("--max-frame-size"), frame_text, DEFAULT_MAX_FRAME_SIZE)
    buffered_text = opts.pick("--max-buffered-output", "PATIO_MAX_BUFFERED_OUTPUT")
    max_buffered_output = _size(
        opts.name("--max-buffered-output"), buffered_text, DEFAULT_MAX_BUFFERED_OUTPUT
    )
    budget_text = opts.pick("--max-peer-call-bytes", "PATIO_MAX_PEER_CALL_BYTES")
    max_peer_call_bytes = _size(
        opts.name("--max-peer-call-bytes"), budget_text, DEFAULT_MAX_PEER_CALL_BYTES
    )
    if max_peer_call_bytes < 1:
        raise ConfigError(f"{opts.name('--max-peer-call-bytes')} must be at least 1 byte, not 0")
    try:
        check_limits(max_frame_size, max_buffered_output)
    except ValueError as exc:  # the broker's words, with the flags' names
        text = str(exc).replace("max_frame_size", opts.name("--max-frame-size"))
        text = text.replace("max_buffered_output", opts.name("--max-buffered-output"))
        raise ConfigError(text) from None
    return max_frame_size, max_buffered_output, max_peer_call_bytes


def _key_allowances(opts: _Lookup) -> tuple[bool, bool]:
    """--allow-empty-key and --allow-weak-key, each also from its variable."""
    environ = opts.environ
    allow_empty = bool(opts.flags.get("allow_empty_key")) or _bool(
        "PATIO_ALLOW_EMPTY_KEY", environ.get("PATIO_ALLOW_EMPTY_KEY", "")
    )
    allow_weak = bool(opts.flags.get("allow_weak_key")) or _bool(
        "PATIO_ALLOW_WEAK_KEY", environ.get("PATIO_ALLOW_WEAK_KEY", "")
    )
    return allow_empty, allow_weak


def _frame_mac(
    opts: _Lookup, listen: str, peers: tuple[PeerAddress, ...], peers_dns: PeerAddress | None
) -> bool:
    """False with --no-frame-mac, which only loopback addresses may use."""
    off = bool(opts.flags.get("no_frame_mac")) or _bool(
        "PATIO_NO_FRAME_MAC", opts.environ.get("PATIO_NO_FRAME_MAC", "")
    )
    if not off:
        return True
    hosts = [listen, *(host for host, _ in peers), *([peers_dns[0]] if peers_dns else [])]
    check_frame_mac_off(hosts, opts.name("--no-frame-mac"))
    return False


def check_frame_mac_off(hosts: Iterable[str], name: str) -> None:
    """Frames without MAC (``name`` is the flag or variable asking) only on loopback hosts."""
    remote = [host for host in hosts if not is_loopback(host)]
    if remote:
        raise ConfigError(
            f"{name} is for benchmarks on loopback only, and "
            f"{', '.join(remote)} is not loopback: anyone on the path could inject calls"
        )


def resolve_key_source(
    flag_key_file: str | None,
    flag_key: str | None,
    environ: Mapping[str, str],
    *,
    inline_allowed: bool = True,
) -> tuple[str | None, str | None]:
    """(key file, inline key) from the flags, else from PATIO_KEY_FILE / PATIO_KEY.

    The two sources are exclusive. A flag for either one overrides both
    variables: ``--key-file`` on the command line must not be silently
    combined with a PATIO_KEY inherited from the environment.
    """
    if flag_key_file is not None and flag_key is not None:
        raise ConfigError("--key and --key-file are exclusive: give one of them")
    if flag_key_file is not None or flag_key is not None:
        return flag_key_file, flag_key
    key_file = environ.get("PATIO_KEY_FILE") or None
    key = (environ.get("PATIO_KEY") or None) if inline_allowed else None
    if key_file is not None and key is not None:
        raise ConfigError("PATIO_KEY and PATIO_KEY_FILE are both set: set one of them")
    return key_file, key


def check_registry_spec(spec: str) -> None:
    module, sep, attribute = spec.partition(":")
    if not sep or not module or not attribute:
        raise ConfigError(f"registry must be MODULE:ATTRIBUTE (e.g. myapp.tasks:rpc), not {spec!r}")


def parse_peer_address(text: str, *, default_port: int, what: str = "peer") -> PeerAddress:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address -> (host, port)."""
    text = text.strip()
    if not text:
        raise ConfigError(f"empty {what} address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise ConfigError(f"malformed {what} address {text!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"malformed {what} address {text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        try:  # a bare IPv6 address, no port
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ConfigError(
                f"malformed {what} address {text!r}: write IPv6 addresses as [ADDR]:PORT"
            ) from None
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise ConfigError(f"malformed {what} address {text!r}: missing host")
    if not valid_host(host):
        raise ConfigError(f"malformed {what} address {text!r}: not an IP address or host name")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"malformed {what} address {text!r}: port is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"malformed {what} address {text!r}: port out of range")
    return host, port


def parse_peer_list(text: str, *, default_port: int) -> tuple[PeerAddress, ...]:
    """Comma- or whitespace-separated addresses, order kept, duplicates dropped."""
    seen: dict[PeerAddress, None] = {}
    for item in text.replace(",", " ").split():
        seen[parse_peer_address(item, default_port=default_port)] = None
    return tuple(seen)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} must be an integer, not {text!r}") from None


def _port(flag: str, text: str | None, default: int) -> int:
    if text is None:
        return default
    value = _int(flag, text)
    if not 0 <= value < 65536:
        raise ConfigError(f"{flag} must be between 0 and 65535, not {value}")
    return value


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _size(flag: str, text: str | None, default: int) -> int:
    """Bytes: ``67108864``, ``64MiB``, ``64M`` or ``64m`` (units are powers of 1024)."""
    if text is None:
        return default
    lowered = text.strip().lower().removesuffix("b").removesuffix("i")
    digits = lowered.rstrip("kmg")
    unit = lowered[len(digits) :]
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"{flag} must be a size in bytes such as 67108864, 64MiB or 512KiB, not {text!r}"
        )
    return int(digits) * _SIZE_UNITS[unit]


def _float(flag: str, text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a number, not {text!r}") from None


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"must be true or false, not {text!r}")


def _bool(variable: str, text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise ConfigError(f"{variable} {exc}") from None
