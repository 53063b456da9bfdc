"""Settings of the registry process, read once from flags and the environment."""

from __future__ import annotations

from dataclasses import dataclass

from actionmesh.registry.endpoints import DEFAULT_ALLOWED_ENDPOINTS, EndpointAllowList
from actionmesh.rpc.tls import TlsConfig

ENV_PREFIX = "ACTIONMESH_REGISTRY"


@dataclass(frozen=True)
class RegistryConfig:
    """Run the actionmesh registry (RegistryService)."""

    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = 0
    """Port to listen on; 0 picks a free port (see --ready-file to learn which)."""

    database_url: str = "sqlite:///.actionmesh/registry.db"
    """SQLAlchemy URL of the provider store (SQLite file or PostgreSQL)."""

    migrate_on_start: bool = True
    """Apply the schema migrations at start; when false, refuse to start unless the
    database is already at the latest revision (run `actionmesh db upgrade` first)."""

    lease_ttl_s: float = 10.0
    """Seconds a registration lives without a RenewLease."""

    health_check_interval_s: float = 2.0
    """Seconds between grpc.health.v1 checks of every registered provider."""

    health_check_timeout_s: float = 1.0
    """Deadline in seconds of one provider health check."""

    max_request_bytes: int = 4 * 1024 * 1024
    """Largest request message accepted, in bytes (a registration with all its action
    descriptors); bigger ones are refused with RESOURCE_EXHAUSTED before decoding."""

    allowed_endpoints: tuple[str, ...] = DEFAULT_ALLOWED_ENDPOINTS
    """Comma-separated endpoints providers may register (the gateways dial them); others
    are refused with PERMISSION_DENIED ENDPOINT_NOT_ALLOWED. Each is HOST or HOST:PORT:
    HOST a CIDR network or IP (matches IP hosts only), or a host name glob such as
    *.svc.cluster.local; PORT a number, a range N-M or *. Default: loopback only."""

    require_registration_credential: bool = False
    """Refuse RegisterProvider, RenewLease and DeregisterProvider without a credential (a
    verified client certificate or a bearer registration token) as UNAUTHENTICATED. When
    false, such calls act as the one shared identity "anonymous": an id first registered
    anonymously can be taken over by any other anonymous caller (never by, nor from, a
    credential). Turn it on wherever the registry port is reachable from more than the
    providers you trust."""

    metrics_port: int = -1
    """Port of the Prometheus /metrics endpoint on the same host; -1 turns it off, 0 picks
    a free port (written to the ready file as metrics_port)."""

    tls_cert_file: str = ""
    """Certificate (PEM) the registry presents to its clients and to the providers it
    health-checks. Set with tls_key_file and tls_ca_file to serve mutual TLS only;
    all three empty: plaintext."""

    tls_key_file: str = ""
    """Private key (PEM, unencrypted) of tls_cert_file; readable by this service only."""

    tls_ca_file: str = ""
    """CA certificates (PEM) that clients' and providers' certificates must chain to; a
    client without a certificate is refused."""

    ready_file: str | None = None
    """Write a JSON file with pid, port and address here once listening."""

    def __post_init__(self) -> None:
        # Fail at start-up rather than with a busy loop or an instantly expiring lease.
        for name in ("lease_ttl_s", "health_check_interval_s", "health_check_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        # Parsed here so a typo stops the registry at start, not every registration.
        try:
            self.allowed_endpoint_list()
        except ValueError as exc:
            raise ValueError(f"allowed_endpoints: {exc}") from None
        self.tls.check(server=True)

    def allowed_endpoint_list(self) -> EndpointAllowList:
        """The parsed allowed_endpoints."""
        return EndpointAllowList(self.allowed_endpoints)

    @property
    def tls(self) -> TlsConfig:
        """The TLS files as one setting (disabled when all are empty)."""
        return TlsConfig(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
