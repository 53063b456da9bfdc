"""Settings of the audit log process, read from flags and ACTIONMESH_AUDITLOG_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from actionmesh.rpc.tls import TlsConfig


@dataclass(frozen=True)
class AuditLogConfig:
    """AuditService: stores execution events and answers record timelines."""

    host: str = "127.0.0.1"
    """Interface the gRPC server binds to."""

    port: int = 0
    """TCP port of the gRPC server; 0 picks a free port (announced in the ready file)."""

    database_url: str = "sqlite:///.actionmesh/audit.db"
    """SQLAlchemy URL of the event store: a SQLite file locally, PostgreSQL in production."""

    migrate_on_start: bool = True
    """Apply the schema migrations at start; when false, refuse to start unless the
    database is already at the latest revision (run `actionmesh db upgrade` first)."""

    max_request_bytes: int = 16 * 1024 * 1024
    """Largest request message accepted, in bytes; bigger ones are refused with
    RESOURCE_EXHAUSTED before decoding. AppendEvents batches (up to the gateway's
    audit_batch_size events, each with its inputs) must fit."""

    metrics_port: int = -1
    """Port of the Prometheus /metrics endpoint on the same host; -1 turns it off, 0 picks
    a free port (written to the ready file as metrics_port)."""

    tls_cert_file: str = ""
    """Certificate (PEM) the audit log presents to its clients. Set with tls_key_file and
    tls_ca_file to serve mutual TLS only; all three empty: plaintext."""

    tls_key_file: str = ""
    """Private key (PEM, unencrypted) of tls_cert_file; readable by this service only."""

    tls_ca_file: str = ""
    """CA certificates (PEM) that clients' certificates must chain to; a client without a
    certificate is refused."""

    ready_file: str | None = None
    """When set, a JSON file written once the server listens (pid, port, address)."""

    def __post_init__(self) -> None:
        # Incomplete TLS settings fail at start, not as handshake errors on the first call.
        self.tls.check(server=True)

    @property
    def tls(self) -> TlsConfig:
        """The TLS files as one setting (disabled when all are empty)."""
        return TlsConfig(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
