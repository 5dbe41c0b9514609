"""The ``patio`` command: argparse subcommands, each handed to a function in patio.worker.

    patio worker MODULE:ATTR [options]   serve a registry as a mesh member
    patio call --peer HOST:PORT TASK ARG...
    patio local [--workers 3] [--calls N | --duration S] [--keep-running]
    patio keygen
    patio operator ...                    the Kubernetes operator (patio_operator)

Bad usage exits 2 with one line on stderr naming the problem.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from patio.worker.aio import run_async
from patio.worker.config import ConfigError, add_worker_arguments, config_from_namespace

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="patio",
        description="patio: distributed asyncio tasks over a broker-less TCP mesh.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    worker = sub.add_parser(
        "worker",
        help="serve a registry as a member of the mesh",
        description="Serve a patio registry as a member of the mesh. Every option also "
        "reads a PATIO_* variable (shown in brackets); a flag wins over its variable.",
    )
    add_worker_arguments(worker)

    call = sub.add_parser(
        "call",
        help="call a task on a running mesh and print the result as JSON",
        description="Call TASK with ARGs (each parsed as JSON, else sent as a string).",
    )
    call.add_argument("--peer", required=True, metavar="HOST:PORT", help="a worker to dial")
    call.add_argument("--key-file", help="file holding the shared key")
    call.add_argument("--key", help="the shared key inline")
    call.add_argument("--tls-cert", help="PEM client certificate (for a mesh with mutual TLS)")
    call.add_argument("--tls-key", help="PEM private key of --tls-cert")
    call.add_argument("--tls-ca", help="PEM CA bundle that signed the workers' certificates")
    call.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    call.add_argument(
        "--retryable",
        action="store_true",
        help="allow re-sending the call to another peer if a link drops",
    )
    call.add_argument("task", metavar="TASK")
    call.add_argument("args", nargs="*", metavar="ARG")

    local = sub.add_parser(
        "local",
        help="start a mesh of workers on this machine and run a demo workload",
        description="Start N workers on loopback, wait until they are ready, run the demo "
        "workload from examples/local through them and show results and metrics.",
    )
    local.add_argument("--workers", "-n", type=int, default=3, help="worker processes (default 3)")
    local.add_argument(
        "--calls",
        type=int,
        default=None,
        help="calls to make (default 1000 unless --duration is given)",
    )
    local.add_argument(
        "--duration", type=float, default=None, help="run the workload for this many seconds"
    )
    local.add_argument(
        "--concurrency", type=int, default=64, help="calls in flight at once (default 64)"
    )
    local.add_argument(
        "--executor",
        default="async",
        choices=["async", "thread", "process"],
        help="executor of the workers (default async)",
    )
    local.add_argument(
        "--registry", default=None, help="serve this MODULE:ATTR instead of the demo registry"
    )
    local.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the cluster up after the workload until Ctrl-C",
    )
    local.add_argument("--no-workload", action="store_true", help="start the cluster only")
    local.add_argument(
        "--event-loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop of the workers and the caller (default auto: uvloop if installed)",
    )

    sub.add_parser("keygen", help="print a new random key (for --key-file or a Secret)")

    operator = sub.add_parser("operator", help="run the Kubernetes operator", add_help=False)
    operator.add_argument("operator_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["operator"]:  # its own argument parser decides what is valid
        return run_operator(args_list[1:])
    parser = build_parser()
    command = args_list[0] if args_list else ""
    try:
        ns = parser.parse_args(args_list)
        if ns.command is None:
            parser.print_help(sys.stderr)
            return EXIT_CONFIG
        handler: Callable[[argparse.Namespace], int] = _COMMANDS[ns.command]
        return handler(ns)
    except ConfigError as exc:
        prog = f"patio {command}" if command in _COMMANDS else "patio"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def run_worker_command(ns: argparse.Namespace) -> int:
    from patio.worker.logs import setup_logging  # noqa: PLC0415 - loaded on use, keeps start-up fast
    from patio.worker.runtime import run_worker  # noqa: PLC0415 - loaded on use, keeps start-up fast

    config = config_from_namespace(ns, os.environ)
    setup_logging(config.log_level, config.log_format)
    if config.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("--event-loop uvloop: uvloop is not installed (pip install uvloop)")
    try:
        return run_async(run_worker(config), event_loop=config.event_loop)
    except ConfigError:
        raise
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception:
        logging.getLogger("patio.worker").exception("worker failed")
        return EXIT_FAILURE


def run_call_command(ns: argparse.Namespace) -> int:
    from patio.worker.client import make_request, run_call  # noqa: PLC0415 - loaded on use, keeps start-up fast

    request = make_request(
        peer=ns.peer,
        task=ns.task,
        args=list(ns.args),
        key=ns.key,
        key_file=ns.key_file,
        timeout=ns.timeout,
        retryable=ns.retryable,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_ca=ns.tls_ca,
    )
    # The broker logs each failed dial attempt; a one-off call reports the
    # outcome once, on its own line, so only errors get through.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return run_call(request)


def run_local_command(ns: argparse.Namespace) -> int:
    from patio.worker.local import LocalOptions, run_local  # noqa: PLC0415 - loaded on use, keeps start-up fast

    if ns.workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {ns.workers}")
    if ns.calls is not None and ns.calls < 0:
        raise ConfigError(f"--calls must not be negative, not {ns.calls}")
    if ns.duration is not None and ns.duration <= 0:
        raise ConfigError(f"--duration must be positive, not {ns.duration:g}")
    if ns.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, not {ns.concurrency}")
    calls = ns.calls if ns.calls is not None else (None if ns.duration else 1000)
    options = LocalOptions(
        workers=ns.workers,
        calls=0 if ns.no_workload else calls,
        duration=None if ns.no_workload else ns.duration,
        concurrency=ns.concurrency,
        executor=ns.executor,
        registry=ns.registry,
        keep_running=ns.keep_running,
        event_loop=ns.event_loop,
    )
    return run_local(options)


def run_keygen_command(ns: argparse.Namespace) -> int:
    # 32 random bytes, URL-safe base64: printable, fits a Secret and a shell.
    print(secrets.token_urlsafe(32))
    return EXIT_OK


def run_operator(argv: list[str]) -> int:
    # In a source checkout the operator lives in operator/src (not importable
    # until installed); find it there too so `python -m patio operator` works.
    source = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "operator", "src"
    )
    if os.path.isdir(os.path.join(source, "patio_operator")) and source not in sys.path:
        sys.path.append(source)
    try:
        operator = importlib.import_module("patio_operator")
    except ImportError as exc:
        print(
            f"patio operator: error: the operator is not installed ({exc}); "
            "install patio with the 'kubernetes' extra: pip install 'patio[kubernetes]'",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    entry = getattr(operator, "main", None)
    if entry is None:
        print("patio operator: error: patio_operator has no main(argv)", file=sys.stderr)
        return EXIT_CONFIG
    result: object = entry(argv)
    return int(result) if isinstance(result, int) else EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "worker": run_worker_command,
    "call": run_call_command,
    "local": run_local_command,
    "keygen": run_keygen_command,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
