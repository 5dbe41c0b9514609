"""Fresh certificates for one control plane (made with ``cryptography``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=2)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass
class Pki:
    """A CA, the API server's serving cert, an admin client cert and the
    service-account signing key, all under ``directory``."""

    directory: Path
    ca: CertPair
    serving: CertPair
    admin: CertPair
    sa_private: Path
    sa_public: Path
    _ca_key: ec.EllipticCurvePrivateKey
    _ca_cert: x509.Certificate

    @classmethod
    def create(cls, directory: Path, hosts: tuple[str, ...] = ("127.0.0.1",)) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        ca_key = _key()
        ca_name = _name("patio-test-ca")
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        ca = CertPair(
            _write(directory / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
            _write(directory / "ca.key", _key_pem(ca_key), private=True),
        )
        sa_key = _key()
        sa_private = _write(directory / "sa.key", _key_pem(sa_key), private=True)
        sa_public = _write(
            directory / "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        pki = cls(
            directory=directory,
            ca=ca,
            serving=ca,  # replaced just below
            admin=ca,
            sa_private=sa_private,
            sa_public=sa_public,
            _ca_key=ca_key,
            _ca_cert=ca_cert,
        )
        sans: list[x509.GeneralName] = [
            x509.DNSName(n)
            for n in (
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            )
        ]
        ips = dict.fromkeys((*hosts, "10.0.0.1"))
        sans += [x509.IPAddress(ipaddress.ip_address(h)) for h in ips]
        pki.serving = pki.issue("kube-apiserver", server_sans=sans, name="apiserver")
        pki.admin = pki.issue("admin", orgs=("system:masters",), name="admin")
        return pki

    def issue(
        self,
        common_name: str,
        orgs: tuple[str, ...] = (),
        *,
        server_sans: list[x509.GeneralName] | None = None,
        name: str | None = None,
    ) -> CertPair:
        """Issue a client certificate (user ``common_name``, groups ``orgs``) or,
        with ``server_sans``, a serving certificate, signed by this CA."""
        key = _key()
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_sans else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, orgs))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
        )
        if server_sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(server_sans), critical=False
            )
        cert = builder.sign(self._ca_key, hashes.SHA256())
        stem = name or common_name.replace(":", "_").replace("/", "_")
        return CertPair(
            _write(self.directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            _write(self.directory / f"{stem}.key", _key_pem(key), private=True),
        )
