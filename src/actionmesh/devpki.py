"""A development certificate authority for running the mesh over mutual TLS.

``actionmesh up --tls`` and the tests need every service to hold its own
certificate signed by one CA that all the others trust. This module makes that
CA and the leaf certificates with the ``cryptography`` package, so nobody has to
drive ``openssl`` by hand. It is for development and tests only: the CA key sits
next to the certificates on disk, unencrypted.

Each leaf identifies its workload three ways: ``CN=NAME``, ``DNS:NAME`` and the
URI SAN ``actionmesh://NAME`` (the form a SPIFFE-style authorizer would check),
and carries the loopback hosts as SANs so a client connecting to
``127.0.0.1:PORT`` or ``localhost:PORT`` verifies the server. Every leaf may act
as both server and client, because every service is both in the mesh.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CA_VALIDITY = datetime.timedelta(days=365)
LEAF_VALIDITY = datetime.timedelta(days=90)
# A certificate this close to expiry is replaced rather than reused, so a mesh
# started today does not fail its handshakes tomorrow.
RENEW_BEFORE = datetime.timedelta(days=1)
# Backdated so a peer whose clock is slightly behind still accepts a fresh cert.
CLOCK_SKEW = datetime.timedelta(minutes=5)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class DevPki:
    """Where a development PKI's files are: the CA certificate and one pair per name."""

    directory: Path
    """The directory holding ``ca.pem``, ``ca-key.pem`` and ``NAME.pem``/``NAME-key.pem``."""
    names: tuple[str, ...]
    """The workload names a certificate was issued for."""

    @property
    def ca_file(self) -> Path:
        """The CA certificate every service trusts (PEM)."""
        return self.directory / CA_CERT_FILE

    @property
    def ca_key_file(self) -> Path:
        """The CA private key (PEM, mode 0600); development use only."""
        return self.directory / CA_KEY_FILE

    def files(self, name: str) -> tuple[Path, Path]:
        """``(cert_file, key_file)`` of the workload ``name``."""
        if name not in self.names:
            raise KeyError(f"no certificate was issued for {name!r}")
        return self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"


def create_dev_pki(
    directory: Path,
    names: Sequence[str],
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> DevPki:
    """Create (or reuse) a CA under ``directory`` and a certificate for each of ``names``.

    Existing files are reused while they are valid for more than a day and, for a
    leaf, still signed by the CA on disk and naming the same hosts; anything else
    is reissued. Re-running is therefore cheap and safe.
    """
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"certificate name {name!r} must be a lowercase DNS label")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pki = DevPki(directory=directory, names=tuple(dict.fromkeys(names)))
    now = datetime.datetime.now(datetime.UTC)
    ca_cert, ca_key, ca_fresh = _ensure_ca(pki, now)
    for name in pki.names:
        cert_file, key_file = pki.files(name)
        if not ca_fresh and _leaf_reusable(cert_file, key_file, ca_cert, name, hosts, now):
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue_leaf(name, hosts, key, ca_cert, ca_key, now)
        _write_key(key_file, key)
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki


def _ensure_ca(
    pki: DevPki, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    """The CA certificate and key, and whether they were just (re)made."""
    try:
        cert = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
        key = serialization.load_pem_private_key(pki.ca_key_file.read_bytes(), password=None)
        if (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and cert.not_valid_after_utc - now > RENEW_BEFORE
            and cert.public_key() == key.public_key()
        ):
            return cert, key, False
    except (OSError, ValueError):
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "actionmesh development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "actionmesh development CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(pki.ca_key_file, key)
    pki.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, True


def _sans(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in [*hosts, name]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    sans.append(x509.UniformResourceIdentifier(f"actionmesh://{name}"))
    # Duplicates (a name equal to a host) would make a malformed-looking cert.
    return list(dict.fromkeys(sans))


def _issue_leaf(
    name: str,
    hosts: Sequence[str],
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
) -> x509.Certificate:
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_sans(name, hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _leaf_reusable(
    cert_file: Path,
    key_file: Path,
    ca_cert: x509.Certificate,
    name: str,
    hosts: Sequence[str],
    now: datetime.datetime,
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        cert.public_key() == key.public_key()
        and cert.not_valid_after_utc - now > RENEW_BEFORE
        and list(sans) == _sans(name, hosts)
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key readable only by its owner, never briefly world-readable."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.replace(tmp, path)
