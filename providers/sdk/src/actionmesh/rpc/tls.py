"""Transport security: TLS and mutual TLS between actionmesh services, from PEM files.

Every service takes the same three settings (``tls_cert_file``, ``tls_key_file``,
``tls_ca_file``): all empty means plaintext (the loopback development default),
all set means the service serves TLS with its certificate, verifies peers against
the CA, and presents its certificate on its own outbound calls. Anything in
between is a configuration error caught at start, with the offending setting
named, rather than a handshake failure minutes later.

A client (the CLI, a health probe) may set just the CA to verify a server that
does not ask for client certificates (the gateway, by default), or all three.

With ``cryptography`` installed (the SDK's ``tls`` extra; every platform service has
it) the files are parsed at start: expiry, key match and PEM content are checked.
Without it only the PEM markers are, and grpc's handshake judges the rest.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    HAVE_CRYPTOGRAPHY = True
except ImportError:  # actionmesh-sdk without its tls extra
    HAVE_CRYPTOGRAPHY = False

# The fields' names as services spell them, so errors point at the flag to fix.
_FIELDS = {"cert_file": "tls_cert_file", "key_file": "tls_key_file", "ca_file": "tls_ca_file"}
_SERVICE_ENV = re.compile(r"^ACTIONMESH_([A-Z0-9_]+?)_TLS_(CERT|KEY|CA)_FILE$")


class TlsConfigError(ValueError):
    """The TLS settings are incomplete, or a file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class TlsConfig:
    """Paths of the PEM files one process uses for TLS; empty strings mean unset."""

    cert_file: str = ""
    """Certificate chain (PEM) this process presents, as a server and as a client."""
    key_file: str = ""
    """Private key (PEM, unencrypted) of cert_file."""
    ca_file: str = ""
    """CA certificates (PEM) that peers' certificates must chain to."""

    @property
    def enabled(self) -> bool:
        """Whether any TLS setting is given (then TLS is used, or start fails)."""
        return bool(self.cert_file or self.key_file or self.ca_file)

    @property
    def has_identity(self) -> bool:
        """Whether this process has a certificate of its own to present."""
        return bool(self.cert_file and self.key_file)

    def check(self, *, server: bool) -> None:
        """Refuse incomplete settings and unusable files with one clear message.

        A server (every service: each one also dials its peers) needs all three
        files; a client needs at least the CA, and a certificate only with its key.
        """
        if not self.enabled:
            return
        if bool(self.cert_file) != bool(self.key_file):
            given, missing = (
                ("cert_file", "key_file") if self.cert_file else ("key_file", "cert_file")
            )
            raise TlsConfigError(
                f"{_FIELDS[given]} is set but {_FIELDS[missing]} is not; TLS needs both"
            )
        if server and not self.cert_file:
            raise TlsConfigError(
                "tls_ca_file is set but tls_cert_file and tls_key_file are not; "
                "a service needs its own certificate and key to serve TLS"
            )
        if not self.ca_file:
            raise TlsConfigError(
                "tls_ca_file is not set; TLS needs the CA that peers' certificates chain to "
                "(set tls_cert_file, tls_key_file and tls_ca_file together)"
            )
        self._load()

    def server_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; with ``require_client_cert``, mutual TLS."""
        self.check(server=True)
        ca, cert, key = self._load()
        assert cert is not None and key is not None
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=ca if require_client_cert else None,
            require_client_auth=require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a client channel: verify the server, present our cert if any."""
        self.check(server=False)
        ca, cert, key = self._load()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def _load(self) -> tuple[bytes, bytes | None, bytes | None]:
        """The CA, certificate and key bytes, each parsed once to prove it usable."""
        ca = _read(self.ca_file, "ca_file")
        _require_pem(ca, b"CERTIFICATE", f"tls_ca_file {self.ca_file} holds no PEM certificate")
        cert = key = None
        if self.has_identity:
            cert = _read(self.cert_file, "cert_file")
            key = _read(self.key_file, "key_file")
            _require_pem(
                cert, b"CERTIFICATE", f"tls_cert_file {self.cert_file} holds no PEM certificate"
            )
            _require_pem(
                key,
                b"PRIVATE KEY",
                f"tls_key_file {self.key_file} is not an unencrypted PEM private key",
            )
        if HAVE_CRYPTOGRAPHY:
            self._inspect(ca, cert, key)
        return ca, cert, key

    def _inspect(self, ca: bytes, cert: bytes | None, key: bytes | None) -> None:
        """Parse the files: a CA and a certificate that are current, the key of the cert."""
        try:
            cas = x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise TlsConfigError(f"tls_ca_file {self.ca_file} holds no PEM certificate") from None
        _check_current(cas[0], self.ca_file, "ca_file")
        if cert is None or key is None:
            return
        try:
            leaf = x509.load_pem_x509_certificates(cert)[0]
        except ValueError:
            raise TlsConfigError(
                f"tls_cert_file {self.cert_file} holds no PEM certificate"
            ) from None
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsConfigError(
                f"tls_key_file {self.key_file} is not an unencrypted PEM private key ({exc})"
            ) from None
        if leaf.public_key() != private.public_key():
            raise TlsConfigError(
                f"tls_key_file {self.key_file} is not the key of tls_cert_file {self.cert_file}"
            )
        _check_current(leaf, self.cert_file, "cert_file")

    @classmethod
    def from_service_env(cls, environ: Mapping[str, str] | None = None) -> TlsConfig:
        """The TLS settings of the one service configured in the environment.

        A container runs one service, so its ``ACTIONMESH_<SVC>_TLS_*_FILE``
        variables name one prefix; a health probe inside it reuses them and needs
        no settings of its own. No such variables: plaintext.
        """
        env = os.environ if environ is None else environ
        found: dict[str, dict[str, str]] = {}
        for name, value in env.items():
            match = _SERVICE_ENV.match(name)
            if match and value:
                found.setdefault(match.group(1), {})[match.group(2).lower()] = value
        if not found:
            return cls()
        if len(found) > 1:
            raise TlsConfigError(
                "TLS settings of several services in the environment "
                f"({', '.join(sorted(found))}); pass --tls-ca/--tls-cert/--tls-key"
            )
        (files,) = found.values()
        return cls(
            cert_file=files.get("cert", ""),
            key_file=files.get("key", ""),
            ca_file=files.get("ca", ""),
        )


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{_FIELDS[field]} {path}: {exc.strerror or exc}") from None


def _require_pem(data: bytes, label: bytes, message: str) -> None:
    if b"-----BEGIN " not in data or label + b"-----" not in data:
        raise TlsConfigError(message)


def _check_current(cert: x509.Certificate, path: str, field: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise TlsConfigError(
            f"{_FIELDS[field]} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if cert.not_valid_before_utc > now:
        raise TlsConfigError(
            f"{_FIELDS[field]} {path} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
