"""``patio worker``: a registry served as a member of the mesh, until SIGTERM.

Order of a worker's life, and why:

1. Everything that can be checked before touching the network is checked
   first (registry import, key files, TLS files, peers file), each failure a
   :class:`ConfigError` -> exit 2 with one line. A pod that cannot start
   should say why in ``kubectl logs`` without a traceback to dig through.
2. Executor, then broker, then the mesh listener, then the HTTP server; a
   port in use is a :class:`ConfigError` too.
3. Peers are added (static list, file and DNS watchers), key and TLS files are
   watched, and the worker logs where it listens and where its metrics are.
4. The first SIGTERM/SIGINT starts a graceful drain: ``/readyz`` turns 503,
   ``broker.drain(timeout)`` stops taking new work and waits for what is
   running; then everything closes and the exit code is 0 (1 if the drain
   timed out with work still running). A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import inspect
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import prometheus_client

from patio import __version__
from patio import executor as executors
from patio.broker import TCPMeshBroker
from patio.errors import WeakKeyError
from patio.registry import Registry
from patio.worker.config import ConfigError, PeerAddress, WorkerConfig
from patio.worker.files import watch_files
from patio.worker.health import HealthServer, Heartbeat, Readiness, readiness
from patio.worker.metrics import WorkerMetrics
from patio.worker.peers import PeersFileError, read_peers_file

log = logging.getLogger("patio.worker")

LIVENESS_STALE_AFTER = 5.0


# --------------------------------------------------------------------------
# Things checked before the network: registry, keys, TLS
# --------------------------------------------------------------------------


def load_registry(spec: str) -> Any:
    """Import ``module:attribute`` and check it is a ``patio.Registry``."""
    module_name, _, attribute = spec.partition(":")
    # `python -m patio` puts the current directory on sys.path, the `patio`
    # console script does not; users expect `patio worker myapp:rpc` to find
    # ./myapp.py either way (as uvicorn and celery do).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"cannot import registry module {module_name!r}: no such module"
            ) from None
        raise ConfigError(
            f"cannot import registry module {module_name!r}: it imports {exc.name!r}, "
            "which is not installed"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"cannot import registry module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(obj, Registry):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not a patio.Registry")
    return obj


class EmptyKeyFileError(ConfigError):
    """The key file exists but holds no key."""


def read_key_file(path: str, *, what: str = "key file") -> bytes:
    """The key in ``path``; surrounding whitespace (a trailing newline) is not part of it."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    key = data.strip()
    if not key:
        raise EmptyKeyFileError(f"{what} {path} is empty")
    return key


class KeySource:
    """The key a worker presents and the keys it accepts, from flags and files."""

    def __init__(self, config: WorkerConfig) -> None:
        self.key_file = config.key_file
        self.inline_key = (config.key or "").encode()
        self.next_key_file = config.next_key_file

    @property
    def paths(self) -> list[str]:
        return [p for p in (self.key_file, self.next_key_file) if p is not None]

    def load(self) -> tuple[bytes, tuple[bytes, ...]]:
        key = read_key_file(self.key_file) if self.key_file is not None else self.inline_key
        accepted: tuple[bytes, ...] = ()
        # The next key is optional by design: at step 3 of a rotation the
        # operator removes it from the Secret, so "missing" means "none".
        if self.next_key_file is not None and os.path.exists(self.next_key_file):
            try:
                next_key = read_key_file(self.next_key_file, what="next key file")
            except EmptyKeyFileError:
                pass
            else:
                if next_key != key:
                    accepted = (next_key,)
        return key, accepted


def build_ssl_contexts(
    cert: str, key: str, ca: str | None
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for mesh links.

    With a CA both sides must present a certificate signed by it (mutual TLS).
    Peers are dialled by IP address, which certificates issued for pods rarely
    name, so the client checks the chain but not the host name; authorization
    is the CA plus the shared key. Without a CA the link is encrypted and the
    shared-key handshake is what authenticates the peer: it is bound to the
    server's certificate (a relay terminating TLS fails it) and every frame
    after it carries a MAC under keys derived from it (docs/protocol.md).
    """
    for path, what in ((cert, "TLS certificate"), (key, "TLS key"), (ca, "TLS CA")):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{what} {path} does not exist")
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert, key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        client.check_hostname = False
        client.load_cert_chain(cert, key)
        if ca is not None:
            server.load_verify_locations(cafile=ca)
            server.verify_mode = ssl.CERT_REQUIRED
            client.load_verify_locations(cafile=ca)
            client.verify_mode = ssl.CERT_REQUIRED
        else:
            client.verify_mode = ssl.CERT_NONE
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":  # OpenSSL's code for a key of another certificate
            raise ConfigError(f"TLS key {key} does not match certificate {cert}") from None
        raise ConfigError(f"TLS files cannot be used ({cert}, {key}, {ca}): {reason}") from None
    except OSError as exc:
        raise ConfigError(f"TLS files cannot be read: {exc}") from None
    return server, client


def make_executor(kind: str, registry: Any, max_workers: int | None) -> Any:

    classes = {
        "async": "AsyncExecutor",
        "thread": "ThreadPoolExecutor",
        "process": "ProcessPoolExecutor",
        "null": "NullExecutor",
    }
    cls = getattr(executors, classes[kind])
    if kind == "null" or max_workers is None:
        return cls(registry)
    return cls(registry, max_workers=max_workers)


def _default_broker_factory(executor: Any, **kwargs: Any) -> Any:
    return TCPMeshBroker(executor, **kwargs)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------


class Worker:
    """One ``patio worker`` process (``run()`` returns the exit code)."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        broker_factory: Callable[..., Any] | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        self.config = config
        self.broker_factory = broker_factory or _default_broker_factory
        self.install_signal_handlers = install_signal_handlers
        self.keys = KeySource(config)
        self.broker: Any = None
        self.executor: Any = None
        self.metrics: WorkerMetrics | None = None
        self.heartbeat = Heartbeat()
        self.health: HealthServer | None = None
        self.metrics_url: str | None = None
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self._signals = 0
        self._server_ssl: ssl.SSLContext | None = None
        self._tasks: list[asyncio.Future[Any]] = []
        self._cleanups: list[Callable[[], Awaitable[None] | None]] = []

    # -- checks before the network ------------------------------------------

    def preflight(self) -> tuple[Any, bytes, tuple[bytes, ...], Any, Any, frozenset[PeerAddress]]:
        config = self.config
        registry = load_registry(config.registry)
        key, accepted = self.keys.load()
        server_ctx = client_ctx = None
        if config.tls_cert is not None and config.tls_key is not None:
            server_ctx, client_ctx = build_ssl_contexts(
                config.tls_cert, config.tls_key, config.tls_ca
            )
        file_peers: frozenset[PeerAddress] = frozenset()
        if config.peers_file is not None:
            try:
                file_peers = read_peers_file(config.peers_file, default_port=config.port)
            except PeersFileError as exc:
                raise ConfigError(str(exc)) from None
        return registry, key, accepted, server_ctx, client_ctx, file_peers

    # -- life -----------------------------------------------------------------

    async def run(self) -> int:
        config = self.config
        # `_created` series double every counter and histogram on the page and
        # nothing here uses them.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        registry, key, accepted, server_ctx, client_ctx, file_peers = self.preflight()
        self._server_ssl = server_ctx
        self.executor = make_executor(config.executor, registry, config.max_workers)
        async with self.executor:
            self.broker = self.broker_factory(
                self.executor,
                key=key,
                accepted_keys=accepted,
                ssl_context=server_ctx,
                client_ssl_context=client_ctx,
                node_id=config.node_id,
                allow_empty_key=config.allow_empty_key,
                allow_weak_key=config.allow_weak_key,
                max_frame_size=config.max_frame_size,
                max_buffered_output=config.max_buffered_output,
                max_peer_call_bytes=config.max_peer_call_bytes,
                frame_mac=config.frame_mac,
            )
            self.metrics = WorkerMetrics(self.broker, version=__version__, executor=self.executor)
            if config.metrics_enabled:  # nobody can read the histograms otherwise
                self.metrics.install(self.broker.stats)
            async with self.broker:
                try:
                    return await self._serve(registry, file_peers)
                finally:
                    await self._stop_background()

    async def _serve(self, registry: Any, file_peers: frozenset[PeerAddress]) -> int:
        config = self.config
        broker = self.broker
        # Signals first: a SIGTERM during start-up (a pod deleted right after
        # it was scheduled) then drains a worker that has not served anything.
        if self.install_signal_handlers:
            self._install_signals()
        # The HTTP port before the mesh port: if it is taken, fail before
        # joining the mesh (peers would otherwise see a member appear and vanish).
        self.heartbeat.start()
        self._cleanups.append(self.heartbeat.stop)
        if config.metrics_enabled:
            await self._start_health()
        try:
            await broker.listen(config.listen, config.port)
        except OSError as exc:
            raise ConfigError(_bind_error("mesh", config.listen, config.port, exc)) from None
        except ValueError as exc:  # the broker refusing an empty key on this address
            raise ConfigError(str(exc)) from None

        self._start_membership(file_peers)
        if self.keys.paths:
            self._spawn(
                watch_files(self.keys.paths, self._reload_keys, what="key files"), "patio-keys"
            )
        if config.tls_cert is not None and config.tls_key is not None:
            tls_paths = [p for p in (config.tls_cert, config.tls_key, config.tls_ca) if p]
            self._spawn(watch_files(tls_paths, self._reload_tls, what="TLS files"), "patio-tls")

        self._log_startup(registry)
        self.started.set()

        closed = asyncio.ensure_future(broker.join())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if closed.done():
            log.error("the broker closed by itself; exiting")
            return 1
        closed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closed

        log.info("draining: no new calls, waiting up to %gs for running ones", config.drain_timeout)
        drained = await broker.drain(timeout=config.drain_timeout)
        if drained:
            log.info("drained cleanly; exiting")
            return 0
        log.warning(
            "drain timed out after %gs with calls still running; exiting", config.drain_timeout
        )
        return 1

    async def _start_health(self) -> None:
        config = self.config
        assert self.metrics is not None
        metrics = self.metrics
        self.health = HealthServer(
            live=lambda: self.heartbeat.check(LIVENESS_STALE_AFTER),
            ready=self.readiness,
            metrics=metrics.render,
        )
        try:
            host, port = await self.health.start(config.metrics_address, config.metrics_port)
        except OSError as exc:
            raise ConfigError(
                _bind_error("metrics", config.metrics_address, config.metrics_port, exc)
            ) from None
        self.metrics_url = f"http://{format_address(host, port)}"
        self._cleanups.append(self.health.stop)

    def readiness(self) -> Readiness:
        broker = self.broker
        executor = self.executor
        up, known, missing = broker.membership_links()
        return readiness(
            listening=bool(broker.listening),
            draining=bool(broker.draining) or self.stopping.is_set(),
            # A null executor serves nothing by configuration; it still
            # forwards outside callers' calls, which is its job.
            accepting=not executor.is_closed,
            known=known,
            connected=up,
            missing=tuple(f"{name} ({why})" for name, why in missing),
            ratio=self.config.ready_peer_ratio,
            node_id=broker.node_id,
        )

    # -- membership ------------------------------------------------------------

    def _not_self(self, peers: Iterable[PeerAddress]) -> set[PeerAddress]:
        """Peer lists usually include this worker (a Service's endpoints, the
        operator's file); dialling ourselves is pointless, so drop our address."""
        own = {(self.config.listen, self.config.port)}
        for host, port in list(getattr(self.broker, "listening", None) or ()):
            own.add((str(host), int(port)))
        return {peer for peer in peers if peer not in own}

    def _start_membership(self, file_peers: frozenset[PeerAddress]) -> None:
        """Static peers directly; the peers file and DNS through the broker's watchers
        (patio.broker.membership), which keep the last good set when a source breaks."""
        config = self.config
        broker = self.broker
        for host, port in sorted(self._not_self(config.peers)):
            broker.add_peer(host, port)
        if config.peers_file is not None:
            # Checked at start-up already; hand the set over now so dialling
            # starts before the watcher's first poll.
            broker.set_peers(f"file:{config.peers_file}", self._not_self(file_peers))
            broker.watch_peers_file(config.peers_file, default_port=config.port)
        if config.peers_dns is not None:
            name, port = config.peers_dns
            broker.watch_dns(name, port)

    # -- reloads -----------------------------------------------------------------

    def _reload_keys(self) -> None:
        try:
            key, accepted = self.keys.load()
        except ConfigError as exc:
            log.error("key reload failed: %s; keeping the previous keys", exc)
            return
        try:
            self.broker.set_keys(key, accepted_keys=accepted)
        except WeakKeyError as exc:
            log.error("key reload refused: %s; keeping the previous keys", exc)
            return
        log.info(
            "auth keys reloaded: fingerprint %s (%d extra accepted key%s)",
            self.broker.key_fingerprint,
            len(accepted),
            "" if len(accepted) == 1 else "s",
        )

    def _reload_tls(self) -> None:
        """Validate the new files on fresh contexts, then load them into the live
        server context: the running listener keeps the context it was created
        with, so replacing the object would only affect listeners started later.
        Dialled links get the new client context. Links already up keep theirs."""
        config = self.config
        assert config.tls_cert is not None and config.tls_key is not None
        try:
            _, client_ctx = build_ssl_contexts(config.tls_cert, config.tls_key, config.tls_ca)
            server_ctx = self._server_ssl
            if server_ctx is not None:
                server_ctx.load_cert_chain(config.tls_cert, config.tls_key)
                if config.tls_ca is not None:
                    # OpenSSL can add CAs to a context, not remove them: a CA
                    # dropped from the bundle stays trusted until a restart.
                    server_ctx.load_verify_locations(cafile=config.tls_ca)
        except (ConfigError, ssl.SSLError, OSError) as exc:
            log.error("TLS reload failed: %s; keeping the previous certificates", exc)
            return
        self.broker.set_ssl_contexts(server_ctx, client_ctx)
        log.info("TLS certificates reloaded (new connections use them)")

    # -- signals and background tasks ----------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

        def restore() -> None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

        self._cleanups.append(restore)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s received: draining (send it again to exit at once)", sig.name)
            self.request_stop()
            return
        log.warning("%s received again: exiting without waiting for running calls", sig.name)
        logging.shutdown()
        os._exit(1)

    def request_stop(self) -> None:
        self.stopping.set()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(_log_task_failure)
        self._tasks.append(task)

    async def _stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for cleanup in reversed(self._cleanups):
            try:
                result = cleanup()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("cleanup failed")
        self._cleanups.clear()

    def _log_startup(self, registry: Any) -> None:
        config = self.config
        broker = self.broker
        try:
            names = sorted(str(name) for name in registry)
        except TypeError:
            names = []
        listening = ", ".join(format_address(str(h), int(p)) for h, p in broker.listening)
        log.info(
            "patio worker %s: node %s serving %s (%d tasks: %s) on the %s executor",
            __version__,
            broker.node_id,
            config.registry,
            len(names),
            ", ".join(names[:10]) + (", ..." if len(names) > 10 else ""),
            config.executor,
        )
        log.info(
            "listening on %s (%s), key fingerprint %s",
            listening,
            "TLS" if config.tls_enabled else "plaintext",
            broker.key_fingerprint,
        )
        sources = []
        if config.peers:
            sources.append("static " + ", ".join(format_address(h, p) for h, p in config.peers))
        if config.peers_file:
            sources.append(f"file {config.peers_file}")
        if config.peers_dns:
            sources.append(f"dns {format_address(*config.peers_dns)}")
        log.info("peers: %s", "; ".join(sources) if sources else "none (single worker)")
        if self.metrics_url:
            log.info(
                "metrics: %s/metrics  health: %s/livez %s/readyz",
                self.metrics_url,
                self.metrics_url,
                self.metrics_url,
            )
        else:
            log.info("metrics: disabled (--metrics-port 0)")


def _log_task_failure(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error(
            "background task %s failed: %r",
            getattr(task, "get_name", lambda: "?")(),
            exc,
            exc_info=exc,
        )


def _bind_error(what: str, host: str, port: int, exc: OSError) -> str:
    where = format_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        return f"{what} port {where} is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where} for {what}: the address is not on this machine"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where} for {what}: permission denied"
    return f"cannot listen on {where} for {what}: {exc.strerror or exc}"


async def run_worker(config: WorkerConfig) -> int:
    return await Worker(config).run()
