"""Settings of the audit log process, read from flags and ACTIONMESH_AUDITLOG_* variables."""

from __future__ import annotations

from dataclasses import dataclass


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

    ready_file: str | None = None
    """When set, a JSON file written once the server listens (pid, port, address)."""
