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
    ready), deleted after the test; teardown waits until it is gone, so the
    pods' processes are stopped before the next test.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .controlplane import ControlPlane
from .nodeagent import NodeAgent
from .rest import ApiError, RestClient


def _workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = os.environ.get("PATIO_KUBE_WORKDIR")
    if base:
        path = Path(base) / f"session-{os.getpid()}"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("kube")


@pytest.fixture(scope="session")
def kube_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane.start(_workdir(tmp_path_factory))
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube_node(kube_control_plane: ControlPlane) -> Iterator[NodeAgent]:
    plane = kube_control_plane
    agent = NodeAgent(
        plane.server,
        plane.pki.ca.cert,
        plane.pki.admin,
        plane.workdir / "node",
        plane.log_dir,
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
        deadline = time.monotonic() + 90
        while rest.get_or_none(f"/api/v1/namespaces/{name}") is not None:
            if time.monotonic() > deadline:
                pytest.fail(f"namespace {name} was not deleted within 90s")
            time.sleep(0.25)
        rest.close()
