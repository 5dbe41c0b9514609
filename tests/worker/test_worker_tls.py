"""Workers on mutual TLS: the mesh forms, `patio call` needs a certificate, and
certificates are reloaded from files without a restart (bad files are refused)."""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from .conftest import Spawner
from .helpers import free_port, run_patio
from .test_worker_cluster import kube_secret


def issue(ca: trustme.CA, directory: Path, version: int) -> None:
    """Publish a fresh certificate pair (and the CA) as a Kubernetes TLS Secret would."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {
        "tls.crt": b"".join(blob.bytes() for blob in cert.cert_chain_pems).decode(),
        "tls.key": cert.private_key_pem.bytes().decode(),
        "ca.crt": ca.cert_pem.bytes().decode(),
    }
    kube_secret(directory, version, files, names=("tls.crt", "tls.key", "ca.crt"))


def tls_args(directory: Path) -> list[str]:
    return ["--tls-cert", str(directory / "tls.crt"), "--tls-key", str(directory / "tls.key"),
            "--tls-ca", str(directory / "ca.crt")]  # fmt: skip


def served_certificate(host: str, port: int, client: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(client / "ca.crt"))
    context.check_hostname = False
    context.load_cert_chain(str(client / "tls.crt"), str(client / "tls.key"))
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def pem_to_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text().split("-----END CERTIFICATE-----")[0]
                                    + "-----END CERTIFICATE-----\n")  # fmt: skip


def wait_for_log(worker: object, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, worker.log()  # type: ignore[attr-defined]
        time.sleep(0.1)


@pytest.mark.slow
def test_mutual_tls_mesh_call_and_certificate_reload(spawn: Spawner, tmp_path: Path) -> None:
    ca = trustme.CA()
    dirs = {name: tmp_path / name for name in ("a", "b", "client")}
    for directory in dirs.values():
        issue(ca, directory, 1)
    pa, pb = free_port(), free_port()
    a = spawn.worker("--key", "k", "--peers", f"127.0.0.1:{pb}", *tls_args(dirs["a"]),
                     port=pa, node_id="tls-a")  # fmt: skip
    b = spawn.worker("--key", "k", "--peers", f"127.0.0.1:{pa}", *tls_args(dirs["b"]),
                     port=pb, node_id="tls-b")  # fmt: skip
    a.wait_ready()  # ready = connected to b: the mesh link is mutual TLS
    b.wait_ready()
    assert f"listening on 127.0.0.1:{pa} (TLS)" in a.log()

    def call(*tls: str) -> tuple[int, str]:
        result = run_patio("call", "--peer", a.address, "--key", "k", "--timeout", "3", *tls,
                           "mul", "6", "7")  # fmt: skip
        return result.returncode, result.stdout.strip() or result.stderr.strip()

    assert call(*tls_args(dirs["client"])) == (0, "42")
    assert call()[0] == 1  # plaintext to a TLS listener
    other = tmp_path / "other-ca"
    issue(trustme.CA(), other, 1)
    assert call(*tls_args(other))[0] == 1  # a certificate from a CA the mesh does not trust

    # Rotate a's certificate: the running listener serves the new one.
    before = served_certificate(a.host, a.port, dirs["client"])
    issue(ca, dirs["a"], 2)
    wait_for_log(a, "TLS certificates reloaded")
    after = served_certificate(a.host, a.port, dirs["client"])
    assert after != before
    assert after == pem_to_der(dirs["a"] / "tls.crt")
    assert call(*tls_args(dirs["client"])) == (0, "42")

    # A key that does not match the certificate is refused; the old pair stays.
    mismatched = ca.issue_cert("127.0.0.1")
    kube_secret(dirs["a"], 3, {
        "tls.crt": (dirs["a"] / "tls.crt").read_text(),
        "tls.key": mismatched.private_key_pem.bytes().decode(),
        "ca.crt": ca.cert_pem.bytes().decode(),
    }, names=("tls.crt", "tls.key", "ca.crt"))  # fmt: skip
    wait_for_log(a, "TLS reload failed")
    assert "does not match certificate" in a.log()
    assert served_certificate(a.host, a.port, dirs["client"]) == after
    assert call(*tls_args(dirs["client"])) == (0, "42")
    assert os.path.islink(dirs["a"] / "tls.crt")
