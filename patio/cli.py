"""The ``patio`` command: argparse subcommands, each handed to a function in patio.worker.

    patio worker MODULE:ATTR [options]   serve a registry as a mesh member
    patio call --peer HOST:PORT TASK ARG...
    patio status --peer HOST:PORT [--json] [--watch]
    patio local [--workers 3] [--calls N | --duration S] [--keep-running]
    patio keygen
    patio operator ...                    the Kubernetes operator (patio_operator)

Every option of every subcommand can also come from a ``PATIO_*`` variable
(``--key-file`` -> ``PATIO_KEY_FILE``); a flag on the command line wins.
Values are checked by the option's type whichever way they came, and an
error names where the bad value came from (the flag or the variable).

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from patio import __version__
from patio.worker.aio import run_async
from patio.worker.config import (
    ConfigError,
    add_worker_arguments,
    config_from_namespace,
    parse_bool,
    resolve_key_source,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
VERSION = f"patio {__version__}"
ENV_PREFIX = "PATIO_"
# Loopback addresses patio local hands out: 127.0.0.2 ... 127.0.0.254.
MAX_LOCAL_WORKERS = 253
KUBERNETES_MODULES = ("kopf", "kubernetes", "prometheus_client")
WORKER_MODULES = ("prometheus_client",)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # An abbreviation (--key for --key-file) would change meaning when an
        # option is added; the variables are named after full flags only.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


class Repeatable(argparse.Action):
    """A list option: repeat it or give a comma list; the command line replaces the default.

    argparse's ``append`` adds to its default, so a list coming from a
    ``PATIO_*`` variable would be extended by the flag instead of replaced.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        items = [] if current is self.default or current is None else list(current)
        items.extend(split_list(str(values)))
        setattr(namespace, self.dest, items)


def split_list(text: str) -> list[str]:
    return [item for item in text.replace(",", " ").split() if item]


# help/version are not options; the two key sources are resolved together by
# patio.worker.config.resolve_key_source (a flag for either one overrides both
# variables, so a PATIO_KEY in the shell does not clash with --key-file).
_NOT_FROM_ENVIRONMENT = frozenset({"help", "version", "key", "key_file"})


def env_variable(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def _int_at_least(low: int, high: int | None = None, why: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {value}{why}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value:g}")
    return value


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Turn each ``PATIO_<FLAG>`` that is set into that option's default.

    The variable's text goes through the option's own type and choices, so it
    is checked exactly like the flag would be; an error names the variable.
    An empty variable means "not set", as in pod specs.
    """
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_FROM_ENVIRONMENT:
            continue
        variable = env_variable(action)
        text = environ.get(variable, "")
        if not text:
            continue
        value: Any
        if action.nargs == 0:  # store_true
            try:
                value = parse_bool(text)
            except ValueError as exc:
                raise ConfigError(f"{variable}: {exc}") from None
        elif isinstance(action, Repeatable):
            value = split_list(text)
        elif callable(action.type):
            try:
                value = action.type(text)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                raise ConfigError(f"{variable}: {exc}") from None
        else:
            value = text
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ConfigError(f"{variable}: must be one of {choices}, not {text!r}")
        action.default = value
        action.required = False


def _help_variables(parser: argparse.ArgumentParser) -> None:
    """Show each option's variable in --help, as the worker's options do."""
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version") and action.help:
            action.help += f" [${env_variable(action)}]"


def _add_connection_options(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    """How a command outside the mesh reaches it: peers, key, TLS, a time limit."""
    parser.add_argument(
        "--peer",
        action=Repeatable,
        default=None,
        metavar="HOST:PORT",
        help="a worker to dial; repeat it or give a comma list (any one that answers serves)",
    )
    parser.add_argument("--key-file", help="file holding the shared key")
    parser.add_argument("--key", help="the shared key inline")
    parser.add_argument(
        "--allow-weak-key",
        action="store_true",
        help="dial a non-loopback worker with a key under 128 bits (make one with `patio keygen`)",
    )
    parser.add_argument(
        "--no-frame-mac",
        action="store_true",
        help="reach workers run with --no-frame-mac (frames without MAC; loopback only)",
    )
    parser.add_argument("--tls-cert", help="PEM client certificate (for a mesh with mutual TLS)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", help="PEM CA bundle that signed the workers' certificates")
    parser.add_argument(
        "--timeout", type=_positive_float, default=timeout, help=f"seconds (default {timeout:g})"
    )


def _subparser(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    parser.add_argument("--version", action="version", version=VERSION)
    return parser


def build_parser(
    environ: Mapping[str, str] | None = None, command: str = ""
) -> argparse.ArgumentParser:
    """The whole CLI; with ``environ``, ``command``'s ``PATIO_*`` variables become its defaults.

    Only the command being run reads the variables: a PATIO_EXECUTOR meant
    for ``patio worker`` is no concern of ``patio local``'s choices.
    """
    parser = _Parser(
        prog="patio",
        description="patio: distributed asyncio tasks over a broker-less TCP mesh.",
    )
    parser.add_argument("--version", action="version", version=VERSION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    worker = _subparser(
        sub,
        "worker",
        help="serve a registry as a member of the mesh",
        description="Serve a patio registry as a member of the mesh. Every option also "
        "reads a PATIO_* variable (shown in brackets); a flag wins over its variable.",
    )
    add_worker_arguments(worker)

    call = _subparser(
        sub,
        "call",
        help="call a task on a running mesh and print its result",
        description="Call TASK with ARGs. Each ARG is parsed as JSON, else sent as a "
        "string; @FILE reads the argument from FILE and - from standard input. "
        "Every option also reads a PATIO_* variable (shown in brackets).",
    )
    _add_connection_options(call, timeout=30.0)
    call.add_argument(
        "--kwargs",
        metavar="JSON",
        help="keyword arguments as a JSON object, e.g. '{\"delay_ms\": 5}' (or @FILE, or -)",
    )
    call.add_argument(
        "--json",
        action="store_true",
        help='print one line of JSON: the result, or {"error": ...} on failure',
    )
    call.add_argument(
        "--retryable",
        action="store_true",
        help="allow re-sending the call to another peer if a link drops",
    )
    call.add_argument("task", metavar="TASK")
    call.add_argument("args", nargs="*", metavar="ARG")
    _help_variables(call)

    status = _subparser(
        sub,
        "status",
        help="show every member of a running mesh: load, calls, links, tasks",
        description="Ask any one member for the status of every member of its mesh (over "
        "the mesh protocol, authenticated like a call). Every option also reads a PATIO_* "
        "variable (shown in brackets).",
    )
    _add_connection_options(status, timeout=5.0)
    status.add_argument(
        "--json", action="store_true", help="print one JSON object (per refresh) for scripts"
    )
    status.add_argument(
        "--watch",
        type=_positive_float,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    _help_variables(status)

    local = _subparser(
        sub,
        "local",
        help="start a mesh of workers on this machine and run a demo workload",
        description="Start N workers on loopback, wait until they are ready, run the demo "
        "workload (patio.worker.demo) through them and show results and metrics. "
        "Every option also reads a PATIO_* variable (shown in brackets).",
    )
    local.add_argument(
        "--workers",
        "-n",
        type=_int_at_least(
            1, MAX_LOCAL_WORKERS, " (one loopback address each: 127.0.0.2 to 127.0.0.254)"
        ),
        default=3,
        help=f"worker processes, 1 to {MAX_LOCAL_WORKERS} (default 3)",
    )
    local.add_argument(
        "--calls",
        type=_int_at_least(0),
        default=None,
        help="calls to make (default 1000 unless --duration is given)",
    )
    local.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        help="run the workload for this many seconds",
    )
    local.add_argument(
        "--concurrency",
        type=_int_at_least(1),
        default=64,
        help="calls in flight at once (default 64)",
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
        "--key-file",
        default=None,
        help="the workers' key (default: a fresh key in a private temporary directory)",
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
    _help_variables(local)

    _subparser(sub, "keygen", help="print a new random key (for --key-file or a Secret)")

    operator = sub.add_parser("operator", help="run the Kubernetes operator", add_help=False)
    operator.add_argument("operator_args", nargs=argparse.REMAINDER)

    # The worker's variables are resolved by patio.worker.config.
    if environ is not None and command in sub.choices and command != "worker":
        apply_environment(sub.choices[command], environ)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if args_list[:1] == ["operator"]:  # its own argument parser decides what is valid
        return run_operator(args_list[1:])
    command = args_list[0] if args_list else ""
    prog = f"patio {command}" if command in _COMMANDS else "patio"
    try:
        parser = build_parser(env, command)
        ns = parser.parse_args(args_list)
        if ns.command is None:
            parser.print_help(sys.stderr)
            return EXIT_CONFIG
        handler: Handler = _COMMANDS[ns.command]
        return handler(ns, env)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def require_modules(modules: Sequence[str], extra: str) -> None:
    """A clear line instead of a ModuleNotFoundError deep in an import."""
    missing = [m for m in modules if _missing(m)]
    if missing:
        raise ConfigError(
            f"this command needs {', '.join(missing)}, which is not installed: "
            f"pip install 'patio[{extra}]'"
        )


def run_worker_command(ns: argparse.Namespace, environ: Mapping[str, str]) -> int:
    require_modules(WORKER_MODULES, "worker")
    from patio.worker.logs import setup_logging  # noqa: PLC0415 - loaded on use, keeps start-up fast
    from patio.worker.runtime import run_worker  # noqa: PLC0415 - loaded on use, keeps start-up fast

    config = config_from_namespace(ns, environ)
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


def _prepare_client(command: str, *, has_key: bool) -> None:
    """What a one-off client command (call, status) does before it dials.

    It warns when it will use the empty key, and lets only errors through the
    log: the broker logs each failed dial attempt, while a one-off command
    reports its outcome once, on its own line.
    """
    if not has_key:
        print(
            f"patio {command}: warning: no key given (--key-file, --key, PATIO_KEY_FILE or "
            "PATIO_KEY); using the empty key, which only a worker without a key accepts",
            file=sys.stderr,
        )
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")


def run_call_command(ns: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from patio.worker.client import make_request, run_call  # noqa: PLC0415 - loaded on use, keeps start-up fast

    if not ns.peer:
        raise ConfigError("no peer to call: give --peer HOST:PORT (or set PATIO_PEER)")
    key_file, key = resolve_key_source(ns.key_file, ns.key, environ)
    request = make_request(
        peers=ns.peer,
        task=ns.task,
        args=list(ns.args),
        kwargs=ns.kwargs,
        key=key,
        key_file=key_file,
        timeout=ns.timeout,
        retryable=ns.retryable,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_ca=ns.tls_ca,
        allow_weak_key=ns.allow_weak_key,
        frame_mac=not ns.no_frame_mac,
    )
    _prepare_client("call", has_key=bool(request.key))
    return run_call(request, as_json=ns.json)


def run_status_command(ns: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from patio.worker.client import make_request  # noqa: PLC0415 - loaded on use, keeps start-up fast
    from patio.worker.status import StatusRequest, run_status  # noqa: PLC0415 - loaded on use

    if not ns.peer:
        raise ConfigError("no member to ask: give --peer HOST:PORT (or set PATIO_PEER)")
    key_file, key = resolve_key_source(ns.key_file, ns.key, environ)
    # The same checks and files as a call: peers, key, TLS.
    target = make_request(
        peers=ns.peer, task="", args=[], key=key, key_file=key_file, timeout=ns.timeout,
        retryable=False, tls_cert=ns.tls_cert, tls_key=ns.tls_key, tls_ca=ns.tls_ca,
        frame_mac=not ns.no_frame_mac,
    )  # fmt: skip
    _prepare_client("status", has_key=bool(target.key))
    return run_status(
        StatusRequest(
            peers=target.peers,
            key=target.key,
            timeout=ns.timeout,
            as_json=ns.json,
            watch=ns.watch,
            ssl_context=target.ssl_context,
            allow_weak_key=ns.allow_weak_key,
            frame_mac=target.frame_mac,
        )
    )


def run_local_command(ns: argparse.Namespace, environ: Mapping[str, str]) -> int:
    require_modules(WORKER_MODULES, "worker")
    from patio.worker.local import LocalOptions, run_local  # noqa: PLC0415 - loaded on use, keeps start-up fast

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
        key_file=resolve_key_source(ns.key_file, None, environ, inline_allowed=False)[0],
    )
    if options.key_file is not None:
        from patio.worker.runtime import read_key_file  # noqa: PLC0415 - loaded on use

        read_key_file(options.key_file)  # a missing or empty file: exit 2 before starting
    return run_local(options)


def run_keygen_command(ns: argparse.Namespace, environ: Mapping[str, str]) -> int:
    # 32 random bytes, URL-safe base64: printable, fits a Secret and a shell.
    print(secrets.token_urlsafe(32))
    return EXIT_OK


def run_operator(argv: list[str]) -> int:
    if argv[:1] == ["--version"]:
        print(VERSION)
        return EXIT_OK
    # In a source checkout the operator lives in operator/src (not importable
    # until installed); find it there too so `python -m patio operator` works.
    source = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "operator", "src"
    )
    if os.path.isdir(os.path.join(source, "patio_operator")) and source not in sys.path:
        sys.path.append(source)
    missing = [m for m in KUBERNETES_MODULES if _missing(m)]
    if importlib.util.find_spec("patio_operator") is None:
        missing.insert(0, "patio_operator")
    if missing:
        hint = (
            f"the operator needs {', '.join(missing)}, which this installation lacks; "
            "install patio with the 'kubernetes' extra: pip install 'patio[kubernetes]'"
        )
        if any(a in ("-h", "--help") for a in argv):
            print(f"usage: patio operator [options]\n\nRun the Kubernetes operator.\n{hint}")
            return EXIT_OK
        print(f"patio operator: error: {hint}", file=sys.stderr)
        return EXIT_CONFIG
    operator = importlib.import_module("patio_operator")
    result: object = operator.main(argv)
    return int(result) if isinstance(result, int) else EXIT_OK


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a broken or blocked package counts as missing
        return True


Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]
_COMMANDS: dict[str, Handler] = {
    "worker": run_worker_command,
    "call": run_call_command,
    "status": run_status_command,
    "local": run_local_command,
    "keygen": run_keygen_command,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
