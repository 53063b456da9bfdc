"""Settings every provider process reads (flags, or ACTIONMESH_PROVIDER_* variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actionmesh.rpc.config import sqlite_url
from actionmesh.rpc.tls import TlsConfig

ENV_PREFIX = "ACTIONMESH_PROVIDER"
# The registry refuses shorter tokens (guessable); refusing here fails at start instead.
MIN_REGISTRATION_TOKEN_CHARS = 16


@dataclass(frozen=True)
class ProviderConfig:
    """Configuration of one provider process."""

    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = 0
    """Port to listen on; 0 picks a free port (written to the ready file)."""

    advertise_host: str | None = None
    """Host the gateway dials, registered as advertise_host:port.
    Default: host (127.0.0.1 when host is a wildcard address)."""

    registry: str = ""
    """Registry address host:port to register with; empty means do not register."""

    data_dir: str = ".actionmesh/providers"
    """Directory for the provider's local files (its SQLite database by default)."""

    database_url: str | None = None
    """SQLAlchemy URL of the provider's own store (also holds idempotency records).
    Default: a SQLite file data_dir/<provider id>.db."""

    registration_token: str | None = None
    """Secret (16 characters or more) sent to the registry as a bearer token: the provider
    id belongs to the first credential that registers it, so keep using the same one.
    Prefer registration_token_file (flags and environments are easier to leak)."""

    registration_token_file: str | None = None
    """File holding the registration token (surrounding whitespace is ignored)."""

    tls_cert_file: str = ""
    """Certificate (PEM) the provider presents to its clients (gateway, registry health
    checks) and to the registry it registers with. Set with tls_key_file and tls_ca_file
    to serve mutual TLS only; all three empty: plaintext."""

    tls_key_file: str = ""
    """Private key (PEM, unencrypted) of tls_cert_file; readable by this service only."""

    tls_ca_file: str = ""
    """CA certificates (PEM) that clients' and the registry's certificates must chain to;
    a client without a certificate is refused."""

    ready_file: str | None = None
    """Write {"pid", "port", "address"} as JSON here once serving."""

    seed_demo: bool = False
    """Load demo records into the provider's store at start (examples only)."""

    drain_timeout_s: float = 5.0
    """At shutdown, how long in-flight executions may take before they are cancelled."""

    deregister_timeout_s: float = 2.0
    """At shutdown, how long to wait for the registry to acknowledge deregistration."""

    registry_retry_max_s: float = 10.0
    """Upper bound of the backoff between attempts to reach the registry."""

    dedupe_stale_claim_s: float = 300.0
    """With ``dedupe=True``: how old a claim on an idempotency key may grow without a
    result before it counts as abandoned by a process that stopped mid-handler. An
    abandoned key runs again at its next Execute (handlers re-check their own state),
    and GetExecutionStatus answers NEVER_RECEIVED for it; until then it is RUNNING.
    Must exceed the longest handler."""

    max_long_running_executions: int = 256
    """How many long-running executions may run in this process at once; past it an
    Execute of a long-running action is UNAVAILABLE TOO_MANY_LONG_RUNNING (nothing ran)."""

    def __post_init__(self) -> None:
        if self.max_long_running_executions < 1:
            raise ValueError("max_long_running_executions must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in (
            "drain_timeout_s",
            "deregister_timeout_s",
            "registry_retry_max_s",
            "dedupe_stale_claim_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        self.tls.check(server=True)
        if self.registration_token and self.registration_token_file:
            raise ValueError("set registration_token or registration_token_file, not both")
        # Read now, so an unreadable file stops the provider at start, not in the background.
        self.registration_token_value()

    def registration_token_value(self) -> str | None:
        """The registration token to present, from the setting or its file; None if unset."""
        if self.registration_token_file:
            try:
                token = Path(self.registration_token_file).read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"registration_token_file {self.registration_token_file}: {exc.strerror or exc}"
                ) from None
            where = f"registration_token_file {self.registration_token_file}"
        else:
            token = (self.registration_token or "").strip()
            where = "registration_token"
        if not token:
            if self.registration_token_file:
                raise ValueError(f"{where} is empty")
            return None
        if len(token) < MIN_REGISTRATION_TOKEN_CHARS:
            raise ValueError(
                f"{where}: a registration token needs at least "
                f"{MIN_REGISTRATION_TOKEN_CHARS} characters"
            )
        return token

    @property
    def tls(self) -> TlsConfig:
        """The TLS files as one setting (disabled when all are empty)."""
        return TlsConfig(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)

    def database_url_for(self, provider_id: str) -> str:
        """The provider's store: ``database_url``, else ``data_dir/<provider_id>.db``."""
        if self.database_url:
            return self.database_url
        return sqlite_url(Path(self.data_dir) / f"{provider_id}.db")

    def endpoint(self, port: int) -> str:
        """The host:port the registry hands to gateways."""
        host = self.advertise_host or self.host
        if host in ("", "0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{port}"
