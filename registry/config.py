"""Settings of the registry process, read once from flags and the environment."""

from __future__ import annotations

from dataclasses import dataclass

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

    metrics_port: int = -1
    """Port of the Prometheus /metrics endpoint on the same host; -1 turns it off, 0 picks
    a free port (written to the ready file as metrics_port)."""

    ready_file: str | None = None
    """Write a JSON file with pid, port and address here once listening."""

    def __post_init__(self) -> None:
        # Fail at start-up rather than with a busy loop or an instantly expiring lease.
        for name in ("lease_ttl_s", "health_check_interval_s", "health_check_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
