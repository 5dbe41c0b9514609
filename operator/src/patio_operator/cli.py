"""`python -m patio_operator` / `patio operator`: flags, settings, run kopf."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any

import kopf

from patio_operator import desired, handlers, kube, leader, metrics, names, resync
from patio_operator.reconciler import Config, Reconciler
from patio_operator.rotation import MODES

log = logging.getLogger("patio_operator")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patio operator",
        description="Reconcile PatioCluster resources into meshes of patio workers.",
    )
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="namespace to watch (repeatable; env PATIO_OPERATOR_NAMESPACES, comma-separated); "
        "default: all namespaces",
    )
    p.add_argument(
        "--worker-image",
        default=os.environ.get("PATIO_WORKER_IMAGE", names.DEFAULT_IMAGE),
        help="image for workers whose spec.image is empty (env PATIO_WORKER_IMAGE)",
    )
    p.add_argument(
        "--operator-namespace",
        default=os.environ.get("POD_NAMESPACE", "patio-system"),
        help="namespace the operator runs in; NetworkPolicies admit it to the metrics port",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int("PATIO_OPERATOR_METRICS_PORT", 8000),
        help="port of the operator's /metrics (0 disables)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=_env_int("PATIO_OPERATOR_HEALTH_PORT", 8080),
        help="port of kopf's liveness endpoint /healthz (0 disables)",
    )
    p.add_argument(
        "--listen-address",
        default=os.environ.get("POD_IP") or "0.0.0.0",
        help="address for /metrics and /healthz (default: $POD_IP, else all interfaces)",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="full level-based reconcile interval per cluster",
    )
    p.add_argument(
        "--rotation-check",
        choices=MODES,
        default=os.environ.get("PATIO_OPERATOR_ROTATION_CHECK", "metrics"),
        help="how a key-rotation step is confirmed before the next (see docs/kubernetes.md)",
    )
    p.add_argument(
        "--rotation-settle-seconds",
        type=float,
        default=float(os.environ.get("PATIO_OPERATOR_ROTATION_SETTLE_SECONDS", "90")),
        help="wait for rotation steps workers cannot report (every step in settle mode)",
    )
    p.add_argument(
        "--rotation-tick-seconds",
        type=float,
        default=5.0,
        help="how often a rotation in progress is re-evaluated",
    )
    p.add_argument(
        "--allow-privileged-templates",
        action="store_true",
        default=os.environ.get("PATIO_OPERATOR_ALLOW_PRIVILEGED_TEMPLATES", "") == "true",
        help="apply worker pod templates that break the Pod Security 'restricted' profile "
        "(hostPath, privileged, host namespaces, added capabilities, another "
        "ServiceAccount); by default they are refused with a condition naming the field",
    )
    p.add_argument(
        "--leader-election-lease",
        default=os.environ.get("PATIO_OPERATOR_LEADER_LEASE", ""),
        metavar="NAME",
        help="run as one of several replicas: only the holder of this coordination.k8s.io "
        "Lease in --operator-namespace reconciles (env PATIO_OPERATOR_LEADER_LEASE; "
        "default: no election, this process always reconciles)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("PATIO_OPERATOR_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the operator until SIGINT/SIGTERM; returns the exit code."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":
        # kopf logs every handler success at INFO: one line per pod event.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    namespaces = list(args.namespace or [])
    if not namespaces and os.environ.get("PATIO_OPERATOR_NAMESPACES"):
        namespaces = [
            n.strip() for n in os.environ["PATIO_OPERATOR_NAMESPACES"].split(",") if n.strip()
        ]

    kube.load_config()
    config = Config(
        settings=desired.Settings(
            default_image=args.worker_image, operator_namespace=args.operator_namespace
        ),
        rotation_mode=args.rotation_check,
        settle_seconds=args.rotation_settle_seconds,
        resync_seconds=args.resync_seconds,
        rotation_tick_seconds=args.rotation_tick_seconds,
        allow_privileged_templates=args.allow_privileged_templates,
    )
    registry = kopf.OperatorRegistry()
    client = kube.Kube()
    reconciler = Reconciler(client, config, client.post_event)
    handlers.register(registry, reconciler)

    settings = kopf.OperatorSettings()
    # Least privilege: no cluster-wide CRD/namespace scanning, so a
    # namespace-scoped install needs no ClusterRole at all.
    settings.scanning.disabled = True
    # Only watch-event handlers are registered: kopf stores no progress or
    # diff-base annotations and adds no finalizer to PatioClusters.
    # kopf turns log lines into Events only inside its own handler contexts;
    # the Reconciler posts every Event itself (kube.post_event), from
    # watch handlers and the resync alike, so kopf's posting stays off.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8

    metrics.serve(args.metrics_port, args.listen_address)
    host = f"[{args.listen_address}]" if ":" in args.listen_address else args.listen_address
    liveness = f"http://{host}:{args.health_port}/healthz" if args.health_port else None
    elector = None
    if args.leader_election_lease:
        # Unique per process, as client-go does it: a crashed leader whose
        # container restarts is a new candidate and waits like any standby.
        identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        elector = leader.Elector(
            client, args.operator_namespace, args.leader_election_lease, identity
        )
    health = (args.listen_address, args.health_port) if args.health_port else None
    return asyncio.run(
        _lead(elector, health, _run(reconciler, registry, settings, namespaces, liveness))
    )


async def _standby_health(address: tuple[str, int]) -> asyncio.Server:
    """/healthz while waiting for the lease: a standby is alive, just not leading.

    kopf serves its own liveness endpoint once this process leads, on the
    same port, so this server is closed before kopf starts.
    """

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            body = b"standby: waiting for the leader lease\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, address[0], address[1], reuse_address=True)


async def _lead(
    elector: leader.Elector | None,
    health: tuple[str, int] | None,
    work: Coroutine[Any, Any, None],
) -> int:
    """Wait for the lease (if electing), then run `work` while renewing it.

    Returns 1 when leadership is lost: the process exits and its Deployment
    restarts it as a standby, which is simpler and safer than trying to
    stop kopf's watchers half-way and resume later.
    """
    if elector is None:
        await work
        return 0
    server = await _standby_health(health) if health else None
    try:
        while True:
            if await asyncio.to_thread(elector.try_lead):
                break
            await asyncio.sleep(leader.RENEW_SECONDS)
    except BaseException:
        work.close()
        raise
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
    log.info("leading as %s", elector.identity)
    metrics.LEADER.set(1)
    running = asyncio.ensure_future(work)
    try:
        while not running.done():
            await asyncio.wait({running}, timeout=leader.RENEW_SECONDS)
            if not running.done() and not await asyncio.to_thread(elector.try_lead):
                log.error("lost the leader lease; exiting so a standby takes over")
                return 1
        running.result()
        return 0
    finally:
        metrics.LEADER.set(0)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await asyncio.to_thread(elector.release)


async def _run(
    reconciler: Reconciler,
    registry: kopf.OperatorRegistry,
    settings: kopf.OperatorSettings,
    namespaces: list[str],
    liveness: str | None,
) -> None:
    """kopf's watch loops plus the periodic resync; either ending stops both."""
    resync_task = asyncio.create_task(resync.resync_forever(reconciler, namespaces))
    try:
        await kopf.operator(
            registry=registry,
            settings=settings,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness,
        )
    finally:
        resync_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resync_task
