"""``patio call``: one call into a running mesh from the command line.

The caller joins as a member that serves nothing (``NullExecutor``), dials the
given peer, makes the call and prints the result as JSON. Arguments are
parsed as JSON so ``patio call mul 6 7`` sends integers; anything that is not
valid JSON is sent as the string it is (``patio call greet world``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from patio.broker import TCPClientBroker
from patio.executor import NullExecutor
from patio.registry import Registry
from patio.worker.config import ConfigError, parse_peer_address
from patio.worker.runtime import build_ssl_contexts, read_key_file

log = logging.getLogger("patio.worker.client")

DEFAULT_CALL_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class CallRequest:
    peer: tuple[str, int]
    key: bytes
    task: str
    args: tuple[Any, ...]
    timeout: float
    retryable: bool
    ssl_context: ssl.SSLContext | None = None


def parse_argument(text: str) -> Any:
    """JSON if it parses, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def to_json(value: Any) -> str:
    """Results can hold what JSON lacks (bytes, sets); show them rather than fail."""

    def fallback(obj: Any) -> Any:
        if isinstance(obj, bytes | bytearray):
            try:
                return bytes(obj).decode("utf-8")
            except UnicodeDecodeError:
                return {"base64": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, set | frozenset):
            return sorted(obj, key=repr)
        return repr(obj)

    return json.dumps(value, default=fallback, ensure_ascii=False)


def make_request(
    *,
    peer: str,
    task: str,
    args: list[str],
    key: str | None,
    key_file: str | None,
    timeout: float,
    retryable: bool,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> CallRequest:
    if key is not None and key_file is not None:
        raise ConfigError("--key and --key-file are exclusive: give one of them")
    key_bytes = read_key_file(key_file) if key_file is not None else (key or "").encode()
    if timeout <= 0:
        raise ConfigError(f"--timeout must be positive, not {timeout:g}")
    return CallRequest(
        ssl_context=client_ssl_context(tls_cert, tls_key, tls_ca),
        peer=parse_peer_address(peer, default_port=15383, what="--peer"),
        key=key_bytes,
        task=task,
        args=tuple(parse_argument(a) for a in args),
        timeout=timeout,
        retryable=retryable,
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


async def call_once(request: CallRequest) -> Any:
    """Connect as a caller that serves nothing, make the call, leave.

    A client (not a mesh member) is what a one-off caller is: the worker it
    dials forwards the call to the best member if it is busier than another.
    Raises what the call raised.
    """
    host, port = request.peer
    async with NullExecutor(Registry()) as executor:
        broker = TCPClientBroker(
            executor,
            key=request.key,
            allow_empty_key=True,
            connect_timeout=min(CONNECT_TIMEOUT, request.timeout),
            ssl_context=request.ssl_context,
        )
        async with broker:
            await broker.connect(host, port)
            return await broker.call(
                request.task, *request.args, timeout=request.timeout, retryable=request.retryable
            )


def run_call(request: CallRequest, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        result = asyncio.run(call_once(request))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        host, port = request.peer
        print(
            f"patio call {request.task} via {host}:{port} failed: {describe_error(exc)}", file=err
        )
        remote_tb = getattr(exc, "remote_traceback", "")
        if remote_tb:
            print(remote_tb.rstrip(), file=err)
        return 1
    print(to_json(result), file=out)
    return 0
