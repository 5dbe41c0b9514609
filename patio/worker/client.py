"""``patio call``: one call into a running mesh from the command line.

The caller connects as a client that serves nothing (``NullExecutor``) to
every ``--peer`` given, makes the call and prints the result. Arguments are
parsed as JSON so ``patio call mul 6 7`` sends integers; anything that is not
valid JSON is sent as the string it is (``patio call greet world``);
``@FILE`` reads an argument from a file and ``-`` from standard input.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import decimal
import json
import logging
import os
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from patio.broker import TCPClientBroker
from patio.errors import PeerConnectionError
from patio.executor import NullExecutor
from patio.registry import Registry
from patio.worker.config import (
    DEFAULT_PORT,
    ConfigError,
    PeerAddress,
    check_frame_mac_off,
    parse_peer_address,
)
from patio.worker.runtime import build_ssl_contexts, read_key_file

log = logging.getLogger("patio.worker.client")

DEFAULT_CALL_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class CallRequest:
    peers: tuple[PeerAddress, ...]
    key: bytes
    task: str
    args: tuple[Any, ...]
    timeout: float
    retryable: bool
    kwargs: dict[str, Any] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | None = None
    allow_weak_key: bool = False
    frame_mac: bool = True


def parse_argument(text: str) -> Any:
    """JSON if it parses, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class ArgumentReader:
    """Reads ``@FILE`` and ``-`` arguments; standard input can be read only once."""

    def __init__(self, stdin: TextIO) -> None:
        self.stdin = stdin
        self.stdin_used_by: str | None = None

    def text(self, raw: str, what: str) -> str:
        if raw == "-":
            if self.stdin_used_by is not None:
                raise ConfigError(
                    f"{what}: standard input is already read by {self.stdin_used_by}; "
                    "give at most one '-'"
                )
            self.stdin_used_by = what
            return self.stdin.read()
        if raw.startswith("@") and len(raw) > 1:
            path = raw[1:]
            try:
                with open(path, encoding="utf-8") as stream:
                    return stream.read()
            except FileNotFoundError:
                raise ConfigError(f"{what}: file {path} does not exist") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{what}: file {path} cannot be read: {exc}") from None
        return raw


def _plain(obj: Any) -> Any:
    """What JSON lacks, as the value a script expects (a string for a datetime...)."""
    if isinstance(obj, datetime.datetime | datetime.date | datetime.time):
        return obj.isoformat()
    if isinstance(obj, datetime.timedelta):
        return obj.total_seconds()
    if isinstance(obj, decimal.Decimal | uuid.UUID):
        return str(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return _plain_bytes(bytes(obj))
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    return repr(obj)


def _plain_bytes(data: bytes) -> str | dict[str, str]:
    """Text as text; anything else as ``{"base64": ...}``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def to_json(value: Any, *, indent: int | None = None) -> str:
    """Results can hold what JSON lacks (datetimes, Decimals, UUIDs, bytes, sets)."""
    return json.dumps(value, default=_plain, ensure_ascii=False, indent=indent)


def format_result(value: Any) -> str:
    """For people: a text result as it is, anything else as indented JSON."""
    if isinstance(value, str):
        return value
    return to_json(value, indent=2)


def make_request(
    *,
    peers: Sequence[str],
    task: str,
    args: Sequence[str],
    key: str | None,
    key_file: str | None,
    timeout: float,
    retryable: bool,
    kwargs: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    stdin: TextIO | None = None,
    allow_weak_key: bool = False,
    frame_mac: bool = True,
) -> CallRequest:
    if key is not None and key_file is not None:
        raise ConfigError("--key and --key-file are exclusive: give one of them")
    key_bytes = read_key_file(key_file) if key_file is not None else (key or "").encode()
    if timeout <= 0:
        raise ConfigError(f"--timeout must be positive, not {timeout:g}")
    addresses = {
        parse_peer_address(p, default_port=DEFAULT_PORT, what="--peer"): None for p in peers
    }
    if not addresses:
        raise ConfigError("no peer to call: give --peer HOST:PORT")
    if not frame_mac:
        check_frame_mac_off((host for host, _ in addresses), "--no-frame-mac / PATIO_NO_FRAME_MAC")
    reader = ArgumentReader(stdin if stdin is not None else sys.stdin)
    values = tuple(
        parse_argument(reader.text(raw, f"argument {n}")) for n, raw in enumerate(args, start=1)
    )
    named: dict[str, Any] = {}
    if kwargs is not None:
        text = reader.text(kwargs, "--kwargs")
        try:
            named = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--kwargs is not valid JSON: {exc}") from None
        if not isinstance(named, dict):
            raise ConfigError(
                f"--kwargs must be a JSON object like '{{\"name\": 1}}', not {type(named).__name__}"
            )
    return CallRequest(
        ssl_context=client_ssl_context(tls_cert, tls_key, tls_ca),
        peers=tuple(addresses),
        key=key_bytes,
        task=task,
        args=values,
        kwargs=named,
        timeout=timeout,
        retryable=retryable,
        allow_weak_key=allow_weak_key,
        frame_mac=frame_mac,
    )


def client_ssl_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """TLS for the caller: a certificate pair for mutual TLS, a CA to check the worker."""
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key must be given together")
    if cert is not None and key is not None:
        return build_ssl_contexts(cert, key, ca)[1]
    if ca is None:
        return None
    if not os.path.isfile(ca):
        raise ConfigError(f"TLS CA {ca} does not exist")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS CA {ca} cannot be used: {exc}") from None
    context.check_hostname = False  # workers are dialled by IP, as in the mesh
    return context


def describe_error(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text and not text.startswith(f"{name}:") else text or name


def format_peers(peers: Sequence[PeerAddress]) -> str:
    return ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in peers)


@contextlib.asynccontextmanager
async def connected_client(
    peers: Sequence[PeerAddress],
    key: bytes,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    command: str = "patio call",
    allow_weak_key: bool = False,
    frame_mac: bool = True,
) -> AsyncIterator[TCPClientBroker]:
    """A client broker that serves nothing, connected to every peer that answers.

    Every peer is dialled at once; it goes ahead with those that answered
    (a warning names the others), and fails naming every peer when none did.
    """
    async with NullExecutor(Registry()) as executor:
        broker = TCPClientBroker(
            executor,
            key=key,
            allow_empty_key=True,
            allow_weak_key=allow_weak_key,
            connect_timeout=min(CONNECT_TIMEOUT, timeout),
            ssl_context=ssl_context,
            frame_mac=frame_mac,
        )
        async with broker:
            outcomes = await asyncio.gather(
                *(broker.connect(host, port, first_attempt_only=True) for host, port in peers),
                return_exceptions=True,
            )
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            for failure in failures:
                if not isinstance(failure, Exception):
                    raise failure
            if len(failures) == len(outcomes):
                if len(failures) == 1:
                    raise failures[0]
                raise PeerConnectionError(
                    f"cannot connect to any of {format_peers(peers)}: "
                    + "; ".join(describe_error(f) for f in failures)
                )
            for failure in failures:
                print(f"{command}: warning: {describe_error(failure)}", file=sys.stderr)
            yield broker


async def call_once(request: CallRequest) -> Any:
    """Connect as a caller that serves nothing, make the call, leave.

    A client (not a mesh member) is what a one-off caller is: the worker it
    dials forwards the call to the best member if it is busier than another.
    Raises what the call raised.
    """
    async with connected_client(
        request.peers,
        request.key,
        timeout=request.timeout,
        ssl_context=request.ssl_context,
        allow_weak_key=request.allow_weak_key,
        frame_mac=request.frame_mac,
    ) as broker:
        return await broker.call(
            request.task,
            *request.args,
            timeout=request.timeout,
            retryable=request.retryable,
            **request.kwargs,
        )


def run_call(
    request: CallRequest,
    *,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    try:
        result = asyncio.run(call_once(request))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        where = format_peers(request.peers)
        remote_tb = getattr(exc, "remote_traceback", "") or ""
        if as_json:
            error = {"type": type(exc).__name__, "message": str(exc), "task": request.task,
                     "peers": where}  # fmt: skip
            if remote_tb:
                error["remote_traceback"] = remote_tb
            print(to_json({"error": error}), file=out)
        print(f"patio call {request.task} via {where} failed: {describe_error(exc)}", file=err)
        if remote_tb and not as_json:
            print(remote_tb.rstrip(), file=err)
        return 1
    print(to_json(result) if as_json else format_result(result), file=out)
    return 0
