"""Gateway settings, read once from flags and ACTIONMESH_GATEWAY_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_POLICY_FILE = str(Path(__file__).parent / "policies" / "default.cedar")


@dataclass(frozen=True)
class GatewayConfig:
    """ActionGatewayService settings."""

    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 0
    """TCP port; 0 picks a free one."""
    registry: str = "127.0.0.1:50051"
    """Address (host:port) of the RegistryService."""
    auditlog: str = "127.0.0.1:50052"
    """Address (host:port) of the AuditService."""
    database_url: str = "sqlite:///.actionmesh/gateway.db"
    """SQLAlchemy URL for executions and the audit outbox."""
    policy_file: str = DEFAULT_POLICY_FILE
    """Cedar policy file the operator edits."""
    jwt_issuer: str = "actionmesh-dev"
    """Required `iss` claim of caller tokens."""
    jwt_audience: str = "actionmesh"
    """Required `aud` claim of caller tokens."""
    jwt_secret_file: str = ""
    """File with the HS256 shared secret (development signing key)."""
    jwt_public_key_file: str = ""
    """PEM public key for RS256/ES256 tokens; used instead of the secret when set."""
    jwt_leeway_s: float = 30.0
    """Clock skew tolerated on exp/nbf/iat, in seconds."""
    discover_timeout_s: float = 0.5
    """Deadline of each provider's Discover call during fan-out."""
    default_execute_timeout_s: float = 10.0
    """Execute deadline for actions that declare none."""
    max_execute_timeout_s: float = 60.0
    """Upper bound on any action's declared Execute deadline."""
    audit_batch_size: int = 200
    """Most audit events the outbox shipper sends in one AppendEvents call."""
    audit_retry_max_s: float = 5.0
    """Longest backoff between failed audit deliveries."""
    ready_file: str | None = None
    """Where to write {"port": ...} once serving (used by supervisors and tests)."""

    def __post_init__(self) -> None:
        if not (self.jwt_secret_file or self.jwt_public_key_file):
            raise ValueError("set jwt_secret_file or jwt_public_key_file to verify caller tokens")
        if self.discover_timeout_s <= 0 or self.default_execute_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
