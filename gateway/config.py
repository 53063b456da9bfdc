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
    migrate_on_start: bool = True
    """Apply the schema migrations at start; when false, refuse to start unless the
    database is already at the latest revision (run `actionmesh db upgrade` first)."""
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
    late_result_grace_s: float = 60.0
    """How long after an action's deadline the gateway still waits for the provider's
    answer, to record it on the TIMED_OUT execution; 0 stops listening at the deadline."""
    approval_ttl_s: float = 86400.0
    """How long an execution may wait for approval before it expires (DENIED)."""
    approval_sweep_interval_s: float = 30.0
    """How often pending approvals past their window are expired and audited."""
    discover_cache_ttl_s: float = 5.0
    """How long a provider's Discover answer is reused for the same record state and
    caller roles; 0 turns the cache off."""
    discover_cache_max_entries: int = 10000
    """Most cached Discover answers kept (least recently used are dropped)."""
    policy_reload_interval_s: float = 2.0
    """How often the policy file is checked for changes; 0 turns hot reload off."""
    redaction_key_file: str = ""
    """Key for HMAC digests of sensitive records' inputs in audit events; without it
    the digests are plain SHA-256."""
    audit_batch_size: int = 200
    """Most audit events the outbox shipper sends in one AppendEvents call."""
    audit_retry_max_s: float = 5.0
    """Longest backoff between failed audit deliveries."""
    metrics_port: int = -1
    """Port of the Prometheus /metrics endpoint on the same host; -1 turns it off, 0 picks
    a free port (written to the ready file as metrics_port)."""
    ready_file: str | None = None
    """Where to write {"port": ...} once serving (used by supervisors and tests)."""

    def __post_init__(self) -> None:
        if not (self.jwt_secret_file or self.jwt_public_key_file):
            raise ValueError("set jwt_secret_file or jwt_public_key_file to verify caller tokens")
        if self.discover_timeout_s <= 0 or self.default_execute_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.approval_ttl_s <= 0 or self.approval_sweep_interval_s <= 0:
            raise ValueError("approval_ttl_s and approval_sweep_interval_s must be positive")
        if (
            min(self.late_result_grace_s, self.discover_cache_ttl_s, self.policy_reload_interval_s)
            < 0
        ):
            raise ValueError("grace, cache and reload intervals cannot be negative")
