"""`python -m patio_operator` / `patio operator`: flags, settings, run kopf."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence

import kopf

from patio_operator import desired, handlers, kube, metrics, names, resync
from patio_operator.reconciler import Config, Reconciler
from patio_operator.rotation import MODES


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
    settings.posting.level = logging.WARNING  # only warnings become k8s Events from logs
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8

    metrics.serve(args.metrics_port, args.listen_address)
    host = f"[{args.listen_address}]" if ":" in args.listen_address else args.listen_address
    liveness = f"http://{host}:{args.health_port}/healthz" if args.health_port else None
    asyncio.run(_run(reconciler, registry, settings, namespaces, liveness))
    return 0


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
