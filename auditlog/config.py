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

    ready_file: str | None = None
    """When set, a JSON file written once the server listens (pid, port, address)."""
