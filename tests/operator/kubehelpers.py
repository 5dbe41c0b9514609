"""Helpers for the operator tests on the real control plane (tests/kube):
the CRD, PatioCluster objects, conditions, and the operator as a subprocess
with the chart's namespaced RBAC (a ServiceAccount token, not admin).

Shared by test_operator_on_kube.py, test_autoscaling.py and test_operator_ha.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from chart_tools import CHART, CRD_FILE, ROOT, helm

from tests.kube.controlplane import ControlPlane
from tests.kube.helpers import wait_until

REGISTRY = "examples.k8s.tasks:rpc"


def install_crd(plane: ControlPlane) -> None:
    """Apply the chart's CRD, forced, and wait until it is served.

    Forced: a test that re-creates the CRD through Helm leaves Helm's field
    manager owning its fields.
    """
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    plane.kubectl(
        "wait", "--for=condition=Established", "crd/patioclusters.patio.dev", "--timeout=60s"
    )


def get(plane: ControlPlane, ns: str, *what: str) -> Any:
    res = plane.kubectl("get", "-n", ns, *what, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def cluster_obj(name: str, **spec: Any) -> dict[str, Any]:
    body = {"registry": REGISTRY, "replicas": 2, "drainTimeoutSeconds": 2}
    body.update(spec)
    return {
        "apiVersion": "patio.dev/v1alpha1",
        "kind": "PatioCluster",
        "metadata": {"name": name},
        "spec": body,
    }


def apply_obj(
    plane: ControlPlane, ns: str, obj: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj), check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return dict(c)
    return {}


def wait_condition(
    plane: ControlPlane, ns: str, name: str, ctype: str, status: str = "True", timeout: float = 90
) -> dict[str, Any]:
    """Wait until the cluster's condition has `status`; return the cluster."""

    def check() -> dict[str, Any] | None:
        obj = get(plane, ns, "ptc", name)
        return obj if condition(obj, ctype).get("status") == status else None

    return wait_until(check, timeout=timeout, what=f"{name} {ctype}={status}")


def secret_keys(plane: ControlPlane, ns: str, name: str) -> dict[str, str] | None:
    sec = get(plane, ns, "secret", name)
    if not sec:
        return None
    return {k: base64.b64decode(v).decode() for k, v in (sec.get("data") or {}).items()}


class Operator:
    """`python -m patio_operator` as a subprocess with the chart's namespaced RBAC."""

    def __init__(self, plane: ControlPlane, ns: str, workdir: Path, *extra: str) -> None:
        self.plane, self.ns, self.extra = plane, ns, extra
        self.log = workdir / f"operator-{ns}.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # RBAC exactly as the chart renders it for watchNamespace=ns.
        rendered = helm(
            "template",
            "patio",
            str(CHART),
            "--namespace",
            ns,
            "--set",
            f"watchNamespace={ns}",
            "--set",
            "crds.install=false",
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ).stdout
        plane.kubectl("apply", "-n", ns, "-f", "-", input=rendered)
        token = plane.kubectl("create", "token", "patio-operator", "-n", ns, "--duration=2h").stdout
        self.kubeconfig = plane.token_kubeconfig(token.strip(), f"operator-{ns}")

    def start(self) -> None:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator" / "src"), str(ROOT)])
        env.pop("KUBERNETES_SERVICE_HOST", None)  # not in-cluster: use the kubeconfig
        cmd = [
            sys.executable,
            "-m",
            "patio_operator",
            "--namespace",
            self.ns,
            "--operator-namespace",
            self.ns,
            "--listen-address",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
            "--resync-seconds",
            "5",
            "--rotation-tick-seconds",
            "1",
            *self.extra,
        ]
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        out.close()
        wait_until(self.healthy, timeout=30, what="operator /healthz")

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited {self.proc.returncode}:\n{self.logs()}")
        try:
            with socket.create_connection(("127.0.0.1", self.health_port), timeout=1):
                return True
        except OSError:
            return False

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


@contextlib.contextmanager
def running_operator(
    plane: ControlPlane, ns: str, workdir: Path, *extra: str
) -> Iterator[Operator]:
    """An operator for `ns` for the duration of the block; on the way out the
    clusters are deleted before the namespace, so their workers drain in time."""
    op = Operator(plane, ns, workdir, *extra)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        plane.kubectl("delete", "patioclusters", "--all", "-n", ns, "--wait=false", check=False)
        print(op.logs())
