"""pytest plugin: a real Kubernetes control plane and a node that runs pods.

Register it once for the whole suite, in ``tests/conftest.py``::

    pytest_plugins = ["tests.kube.plugin"]

Fixtures:

``kube_control_plane`` (session)
    A running :class:`tests.kube.controlplane.ControlPlane`: ``.kubeconfig``,
    ``.api_client`` (admin ``kubernetes.client.ApiClient``), ``.kubectl(...)``,
    ``.helm(...)``, ``.binaries``, ``.log_dir``, ``.server``, ``.env()``,
    ``.user_kubeconfig(user, groups)``, ``.token_kubeconfig(token, name)``.
    Fails (does not skip) if the binaries are not built.
``kube_node`` (session)
    A :class:`tests.kube.nodeagent.NodeAgent` registered as Node
    ``patio-node``, running the pods scheduled to it.
``kube_namespace`` (function)
    The name of a fresh namespace (with its ``default`` ServiceAccount
    ready), deleted after the test; teardown waits until its pods are gone,
    so their processes are stopped before the next test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from cryptography import x509

from .controlplane import ControlPlane
from .nodeagent import NodeAgent
from .rest import ApiError, RestClient


def _workdir() -> Path:
    """A fresh folder for this session's control plane, never under /tmp.

    Worker pods mount an emptyDir at /tmp in their private mount namespace,
    and the node agent bind-mounts each pod's Secret/ConfigMap volumes from
    this folder: under /tmp the pods' own /tmp would hide them.
    """
    base = os.environ.get("PATIO_KUBE_WORKDIR") or f"/var/tmp/patio-kube-{os.getuid()}"
    path = Path(base) / f"session-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def kube_control_plane() -> Iterator[ControlPlane]:
    # A SIGTERM to the test process runs the teardowns (like Ctrl-C) instead
    # of leaving the control plane and the pods' processes behind.
    previous = None
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        workdir = _workdir()
        plane = ControlPlane.start(workdir)
        try:
            yield plane
        finally:
            plane.stop()
            if not os.environ.get("PATIO_KEEP_KUBE_WORKDIR"):
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def kube_node(kube_control_plane: ControlPlane) -> Iterator[NodeAgent]:
    plane = kube_control_plane
    agent = NodeAgent(
        plane.server,
        plane.pki.ca.cert,
        plane.pki.admin,
        plane.workdir / "node",
        plane.log_dir,
        serving_cert=plane.pki.issue(
            "patio-node",
            server_sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            name="kubelet",
        ),
    )
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()


def _rest(plane: ControlPlane) -> RestClient:
    return RestClient(plane.server, str(plane.pki.ca.cert), plane.pki.admin)


@pytest.fixture
def kube_namespace(
    kube_control_plane: ControlPlane, request: pytest.FixtureRequest
) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:6]}"
    rest = _rest(kube_control_plane)
    rest.post(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    deadline = time.monotonic() + 30
    while rest.get_or_none(f"/api/v1/namespaces/{name}/serviceaccounts/default") is None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"ServiceAccount default never appeared in {name}; read "
                f"{kube_control_plane.log_dir / 'kube-controller-manager.log'}"
            )
        time.sleep(0.1)
    try:
        yield name
    finally:
        try:
            rest.delete(f"/api/v1/namespaces/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
        # The namespace controller deletes the pods too, after a discovery pass
        # of a few seconds; deleting them now (gracefully) saves that wait.
        with contextlib.suppress(ApiError):
            rest.delete(f"/api/v1/namespaces/{name}/pods")
        # Wait until every pod of the namespace is gone (so their processes
        # are stopped); the namespace object itself may finish later.
        deadline = time.monotonic() + 90
        while True:
            left = rest.get(f"/api/v1/namespaces/{name}/pods").get("items", [])
            if not left:
                break
            if time.monotonic() > deadline:
                names = [p["metadata"]["name"] for p in left]
                pytest.fail(f"pods {names} of namespace {name} were not deleted within 90s")
            time.sleep(0.2)
        rest.close()
