"""Gateway settings, read once from flags and ACTIONMESH_GATEWAY_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from limits import RateLimitItem, parse

from actionmesh.rpc.identifiers import RECORD_TYPE
from actionmesh.rpc.tls import TlsConfig

DEFAULT_POLICY_FILE = str(Path(__file__).parent / "policies" / "default.cedar")
# Signature algorithms a JWKS or PEM key may be used with. HS256 is not among them: a
# shared secret is for development only (jwt_secret_file with jwt_dev_mode).
JWT_ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
# A wider clock-skew window would keep expired tokens alive for minutes.
MAX_JWT_LEEWAY_S = 300.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_rate(text: str) -> RateLimitItem | None:
    """``"200/second"`` (limits notation) as a rate item; empty means no rate limit."""
    if not text.strip():
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(
            f"tenant_rate_limit {text!r} is not a rate such as '200/second' or '5000/minute'"
        ) from exc


def parse_trusted_callers(text: str) -> dict[str, frozenset[str]]:
    """`client-id=type,type;client-id=type` as {client id: record types}."""
    trusted: dict[str, frozenset[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, types = part.partition("=")
        record_types = frozenset(filter(None, (t.strip() for t in types.split(","))))
        if not name.strip() or not record_types:
            raise ValueError(
                f"trusted_callers entry {part!r} is not `client-id=record_type[,record_type]`"
            )
        bad = sorted(t for t in record_types if not RECORD_TYPE.valid(t))
        if bad:
            raise ValueError(f"trusted_callers entry {part!r}: invalid record types {bad}")
        trusted[name.strip()] = trusted.get(name.strip(), frozenset()) | record_types
    return trusted


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
    """Required `iss` claim of caller tokens (your identity provider's issuer)."""
    jwt_audience: str = "actionmesh"
    """Required `aud` claim of caller tokens."""
    jwt_jwks_file: str = ""
    """JSON Web Key Set file with the public keys that sign caller tokens; tokens name
    their key with `kid`. Re-read when a token names an unknown key and every
    jwt_jwks_refresh_s, so keys rotate without a restart."""
    jwt_jwks_url: str = ""
    """URL of the identity provider's JSON Web Key Set (https; plain http only for
    127.0.0.1/localhost). Fetched at start, then re-read like jwt_jwks_file."""
    jwt_public_key_file: str = ""
    """PEM public key (RSA, EC or Ed25519) that signs caller tokens: one key, no `kid`
    needed, rotation means a restart."""
    jwt_secret_file: str = ""
    """File with an HS256 shared secret (at least 32 bytes); accepted only with
    jwt_dev_mode."""
    jwt_dev_mode: bool = False
    """Development mode: verify HS256 tokens with jwt_secret_file (what `actionmesh up`
    does). Never in production: whoever reads the secret can mint any identity."""
    jwt_algorithms: str = "RS256,ES256"
    """Comma-separated signature algorithms accepted with a JWKS or public key
    (asymmetric only: RS*, PS*, ES*, EdDSA); a token's own `alg` never widens it."""
    jwt_leeway_s: float = 30.0
    """Clock skew tolerated on exp/nbf/iat, in seconds (at most 300)."""
    jwt_jwks_refresh_s: float = 300.0
    """How often the JWKS is re-read in the background: a key removed from the set is
    refused within this time. 0: re-read only when a token names an unknown key."""
    jwt_jwks_min_reload_interval_s: float = 30.0
    """Least time between two JWKS re-reads caused by tokens naming an unknown `kid`
    (a new key is picked up without a restart; made-up key ids cannot hammer the
    file or the identity provider)."""
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
    """How often pending approvals past their window are expired and audited, and RUNNING
    executions a stopped gateway left past their dispatch deadline are closed as TIMED_OUT."""
    reconcile_interval_s: float = 5.0
    """How often the reconciler looks for unsettled executions (TIMED_OUT, orphans included,
    and PARTIAL `DOWNSTREAM_OUTCOME_UNKNOWN`) that are due, and asks their provider
    (GetExecutionStatus) what became of them. It is also the first backoff: an execution
    still RUNNING at the provider (or whose provider cannot be reached) is asked again
    after this, then twice as long each time up to `reconcile_max_backoff_s`."""
    reconcile_max_backoff_s: float = 300.0
    """The longest pause between two questions about one unsettled execution."""
    reconcile_max_attempts: int = 50
    """After this many questions without a final answer the execution NEEDS_ATTENTION
    (`RECONCILE_GAVE_UP`): a person must find out what happened."""
    reconcile_max_age_s: float = 86400.0
    """An unsettled execution older than this (from when it ended) is no longer asked
    about: it NEEDS_ATTENTION (`RECONCILE_GAVE_UP`)."""
    reconcile_status_timeout_s: float = 5.0
    """Deadline of one GetExecutionStatus call to a provider."""
    reconcile_lease_s: float = 30.0
    """How long one replica holds an execution it reconciles; a crashed replica's lease
    lapses after this and another replica asks. Must exceed `reconcile_status_timeout_s`."""
    long_running_poll_interval_s: float = 5.0
    """How often the gateway asks the provider of an ACCEPTED (long-running) execution how
    it goes (GetExecutionStatus), when the action declares no poll interval."""
    long_running_max_duration_s: float = 604800.0
    """The longest any long-running action may run (a week), whatever it declares; past
    its maximum duration an execution ends TIMED_OUT `MAX_DURATION_EXCEEDED`."""
    tenant_rate_limit: str = "200/second"
    """Requests per tenant, counted separately for ExecuteAction and DiscoverActions, in
    `limits` notation (`200/second`, `5000/minute`); over it a call gets
    RESOURCE_EXHAUSTED `TENANT_RATE_LIMITED` with RetryInfo. Empty turns it off. Per
    gateway replica."""
    tenant_max_concurrent_executions: int = 64
    """Executions one tenant may have in flight on this replica; more get
    RESOURCE_EXHAUSTED `TENANT_CONCURRENCY_LIMITED`. 0 turns it off."""
    provider_max_concurrent_executions: int = 128
    """Executions one provider may have in flight from this replica, across tenants; more
    get RESOURCE_EXHAUSTED `PROVIDER_CONCURRENCY_LIMITED`. 0 turns it off."""
    trusted_callers: str = ""
    """Backend services that vouch for the facts of record types without a system of record
    of their own: `client-id=type,type;client-id=type`. Such a service sends its own token
    (client id in its `client_id` claim, else `sub`) in `actionmesh-service-authorization`
    next to the operator's; its request's record facts then count as verified for those
    types. Anything else a caller says about a record is unverified."""
    record_source_timeout_s: float = 2.0
    """Deadline of one ResolveRecord call to a record type's system of record."""
    record_facts_cache_ttl_s: float = 2.0
    """How long discovery reuses a source's answer for a record (never for the version the
    caller says it saw if that differs); execution and approval always ask afresh. 0: never."""
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
    audit_linger_s: float = 0.02
    """How long the outbox shipper waits after new events before it reads them, so one
    delivery carries the events of many calls; the audit timeline lags by this much more.
    0 ships at once."""
    notifications_file: str = ""
    """JSON file of webhook subscriptions (per tenant: id, tenant, url, events,
    secret_file), checked at start (an invalid one stops the gateway) and re-read with
    its secret files every `policy_reload_interval_s` (an invalid edit is refused and
    the previous subscriptions stay). See the README's Governance. Empty: none."""
    notification_poll_interval_s: float = 1.0
    """How often the notifier looks for notifications due (new ones wake it at once)."""
    notification_timeout_s: float = 5.0
    """Deadline of one webhook POST; no answer by then counts as a failed attempt."""
    notification_retry_initial_s: float = 1.0
    """Wait after a notification's first failed attempt; twice as long after each next
    one, up to `notification_retry_max_s`."""
    notification_retry_max_s: float = 300.0
    """The longest wait between two attempts at one notification."""
    notification_max_attempts: int = 30
    """After this many failed attempts a notification is FAILED (kept in the log)."""
    notification_max_age_s: float = 86400.0
    """A notification still undelivered this long after its event is FAILED."""
    notification_lease_s: float = 30.0
    """How long one replica holds the notifications it is delivering; a crashed one's
    lapse after this and another replica delivers them. Must exceed
    `notification_timeout_s`."""
    notification_retention_s: float = 604800.0
    """How long delivered and failed notifications stay in the delivery log (a week);
    older ones are deleted with their attempts."""
    notification_log_roles: str = "supervisor,admin"
    """Comma-separated roles that may read their tenant's notification delivery log
    (ListNotificationDeliveries); any one of them is enough."""
    max_request_bytes: int = 1024 * 1024
    """Largest request message accepted, in bytes; bigger ones are refused with
    RESOURCE_EXHAUSTED before they are decoded. The largest valid ExecuteAction (32
    inputs of 4096 characters) is about 0.5 MiB even in 4-byte UTF-8."""
    metrics_port: int = -1
    """Port of the Prometheus /metrics endpoint on the same host; -1 turns it off, 0 picks
    a free port (written to the ready file as metrics_port)."""
    tls_cert_file: str = ""
    """Certificate (PEM) the gateway presents to its clients and on its calls to the
    registry, the audit log and providers. Set with tls_key_file and tls_ca_file to serve
    TLS only; all three empty: plaintext."""
    tls_key_file: str = ""
    """Private key (PEM, unencrypted) of tls_cert_file; readable by this service only."""
    tls_ca_file: str = ""
    """CA certificates (PEM) that the registry's, audit log's and providers' certificates
    (and clients' ones, with tls_require_client_cert) must chain to."""
    tls_require_client_cert: bool = False
    """Refuse clients without a certificate from tls_ca_file (mutual TLS). Off by default:
    the gateway's callers are backend services identified by their operators' JWTs."""
    ready_file: str | None = None
    """Where to write {"port": ...} once serving (used by supervisors and tests)."""

    def __post_init__(self) -> None:
        self._check_token_settings()
        self.tls.check(server=True)
        if self.tls_require_client_cert and not self.tls.enabled:
            raise ValueError(
                "tls_require_client_cert needs tls_cert_file, tls_key_file and tls_ca_file"
            )
        if self.discover_timeout_s <= 0 or self.default_execute_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.approval_ttl_s <= 0 or self.approval_sweep_interval_s <= 0:
            raise ValueError("approval_ttl_s and approval_sweep_interval_s must be positive")
        if (
            min(
                self.reconcile_interval_s,
                self.reconcile_max_backoff_s,
                self.reconcile_max_age_s,
                self.reconcile_status_timeout_s,
                self.long_running_poll_interval_s,
                self.long_running_max_duration_s,
            )
            <= 0
            or self.reconcile_max_attempts < 1
        ):
            raise ValueError("the reconcile_* and long_running_* settings must be positive")
        if self.reconcile_lease_s <= self.reconcile_status_timeout_s:
            raise ValueError("reconcile_lease_s must exceed reconcile_status_timeout_s")
        if (
            min(
                self.notification_poll_interval_s,
                self.notification_timeout_s,
                self.notification_retry_initial_s,
                self.notification_retry_max_s,
                self.notification_max_age_s,
                self.notification_retention_s,
            )
            <= 0
            or self.notification_max_attempts < 1
        ):
            raise ValueError("the notification_* settings must be positive")
        if self.notification_lease_s <= self.notification_timeout_s:
            raise ValueError("notification_lease_s must exceed notification_timeout_s")
        parse_trusted_callers(self.trusted_callers)
        parse_rate(self.tenant_rate_limit)  # refuse a malformed rate at start, not per call
        if min(self.tenant_max_concurrent_executions, self.provider_max_concurrent_executions) < 0:
            raise ValueError("concurrency limits must be 0 (off) or positive")
        if (
            min(
                self.late_result_grace_s,
                self.discover_cache_ttl_s,
                self.policy_reload_interval_s,
                self.audit_linger_s,
            )
            < 0
        ):
            raise ValueError("grace, linger, cache and reload intervals cannot be negative")

    @property
    def tls(self) -> TlsConfig:
        """The TLS files as one setting (disabled when all are empty)."""
        return TlsConfig(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)

    @property
    def notification_log_role_set(self) -> frozenset[str]:
        """notification_log_roles as a set."""
        return frozenset(r.strip() for r in self.notification_log_roles.split(",") if r.strip())

    @property
    def jwt_algorithm_list(self) -> tuple[str, ...]:
        """jwt_algorithms as a tuple, in the configured order."""
        return tuple(a.strip() for a in self.jwt_algorithms.split(",") if a.strip())

    def _check_token_settings(self) -> None:
        sources = [
            name
            for name in ("jwt_jwks_file", "jwt_jwks_url", "jwt_public_key_file", "jwt_secret_file")
            if getattr(self, name)
        ]
        if not sources:
            raise ValueError(
                "set jwt_jwks_file, jwt_jwks_url or jwt_public_key_file to verify caller "
                "tokens (or jwt_secret_file with jwt_dev_mode=true for development)"
            )
        if len(sources) > 1:
            raise ValueError(f"set only one source of token keys, not {' and '.join(sources)}")
        if self.jwt_secret_file and not self.jwt_dev_mode:
            raise ValueError(
                "jwt_secret_file (an HS256 shared secret) is accepted only with "
                "jwt_dev_mode=true; in production set jwt_jwks_file, jwt_jwks_url or "
                "jwt_public_key_file"
            )
        if self.jwt_jwks_url:
            url = urlsplit(self.jwt_jwks_url)
            loopback = url.scheme == "http" and url.hostname in LOOPBACK_HOSTS
            if not (url.scheme == "https" or loopback) or not url.hostname:
                raise ValueError(
                    "jwt_jwks_url must be an https URL (plain http only for 127.0.0.1/localhost)"
                )
        algorithms = self.jwt_algorithm_list
        refused = [a for a in algorithms if a not in JWT_ASYMMETRIC_ALGORITHMS]
        if not algorithms or refused:
            raise ValueError(
                "jwt_algorithms accepts asymmetric algorithms only "
                f"({', '.join(JWT_ASYMMETRIC_ALGORITHMS)}); HS256 is for development "
                "(jwt_secret_file with jwt_dev_mode=true) and 'none' is never accepted"
            )
        if not self.jwt_issuer or not self.jwt_audience:
            raise ValueError("jwt_issuer and jwt_audience are required (tokens must carry both)")
        if not 0 <= self.jwt_leeway_s <= MAX_JWT_LEEWAY_S:
            raise ValueError(f"jwt_leeway_s must be between 0 and {MAX_JWT_LEEWAY_S:g} seconds")
        if self.jwt_jwks_refresh_s < 0 or self.jwt_jwks_min_reload_interval_s < 0:
            raise ValueError(
                "jwt_jwks_refresh_s and jwt_jwks_min_reload_interval_s cannot be negative"
            )
