"""pytest plugin: a real node (containerd, kubelet, kube-proxy, CoreDNS) with
a control plane of its own whose API server listens on the node's bridge.

Fixtures:

``real_node`` (session)
    A :class:`RealCluster`: ``.plane`` (a
    :class:`tests.kube.controlplane.ControlPlane`, ``kubectl``/``helm``/...),
    ``.node`` (:class:`tests.realnode.node.RealNode`: ``crictl``, ``ctr``,
    ``log_dir``, ``timings``), ``.image`` (the project's image, imported into
    containerd as ``patio:dev``).
``real_namespace`` (function)
    A fresh namespace on it, deleted after the test (teardown waits for its pods).

Tests using them are marked ``realnode`` automatically.

The machine is recorded before anything starts (saved to a file, so a session
killed hard is cleaned up by the next one) and restored at the end; teardown
fails naming whatever it could not undo.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.image.runc import Image, ImageMissingError
from tests.kube.controlplane import ControlPlane
from tests.kube.pki import Pki

from . import node as rn
from .hoststate import HostState

STATE_FILE = Path("/var/tmp/patio-realnode-host.json")


@dataclass
class RealCluster:
    plane: ControlPlane
    node: rn.RealNode
    image: Image


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"real_node", "real_namespace"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realnode)


def _restore(state: HostState) -> list[str]:
    left = state.restore()
    if not left:
        STATE_FILE.unlink(missing_ok=True)
    return left


@pytest.fixture(scope="session")
def real_node() -> Iterator[RealCluster]:
    try:
        image = Image.find()
        bins = rn.NodeBinaries.find()
    except (ImageMissingError, rn.NodeError) as exc:
        pytest.fail(str(exc))
    base = Path(os.environ.get("PATIO_KUBE_WORKDIR") or f"/var/tmp/patio-kube-{os.getuid()}")
    work = base / f"realnode-{os.getpid()}"
    with rn.machine_lock():
        if STATE_FILE.exists():
            # A session that was killed before its teardown: undo its changes.
            left = _restore(HostState.load(STATE_FILE))
            if left:
                pytest.fail(f"a previous real node left {left}; see {STATE_FILE}")
        rn.check_range_unused()
        state = HostState.record(work, rn.BRIDGE, rn.RANGE_PREFIX)
        state.save(STATE_FILE)
        work.mkdir(parents=True, exist_ok=True)
        log_dir = work / "logs"
        log_dir.mkdir(exist_ok=True)
        plane: ControlPlane | None = None
        node: rn.RealNode | None = None
        problems: list[str] = []
        try:
            rn.bridge_up()
            pki = Pki.create(work / "pki", (rn.NODE_IP, rn.network().kubernetes_service_ip))
            kubelet_client = pki.issue(
                "kube-apiserver-kubelet-client", ("system:masters",), name="apiserver-kubelet"
            )
            net = rn.network(kubelet_client)
            plane = ControlPlane.start(work / "plane", network=net, pki=pki)
            node = rn.RealNode(plane, work, bins, log_dir)
            node.start(image.archive)
            yield RealCluster(plane, node, image)
        finally:
            if node is not None:
                problems += node.stop()
            if plane is not None:
                plane.stop()
            problems += _restore(state)
            if not problems and not os.environ.get("PATIO_KEEP_KUBE_WORKDIR"):
                shutil.rmtree(work, ignore_errors=True)
        if problems:
            pytest.fail(f"the real node left these behind: {problems}")


@pytest.fixture
def real_namespace(real_node: RealCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    plane = real_node.plane
    slug = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"r-{slug}-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 30
    while plane.kubectl("get", "sa", "-n", name, "default", check=False).returncode != 0:
        assert time.monotonic() < deadline, f"ServiceAccount default never appeared in {name}"
        time.sleep(0.2)
    try:
        yield name
    finally:
        plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
        plane.kubectl("delete", "pods", "--all", "-n", name, "--grace-period=5", check=False)
        deadline = time.monotonic() + 120
        while plane.kubectl_json("get", "pods", "-n", name)["items"]:
            assert time.monotonic() < deadline, f"pods of {name} not gone within 120 s"
            time.sleep(0.5)
