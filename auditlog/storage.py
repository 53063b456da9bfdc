"""The audit event store: SQLAlchemy 2.x models and the repository.

Each event is kept twice: as the serialized ``AuditEvent`` (the evidence, read
back verbatim) and as a few indexed columns that exist only to find it. The
repository is synchronous; async callers run it with ``asyncio.to_thread``.
Only portable SQL is used, so the same code runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from actionmesh.rpc.convert import from_timestamp
from actionmesh.v1 import audit_pb2, common_pb2

log = logging.getLogger(__name__)

# Widths of the key columns. PostgreSQL enforces VARCHAR lengths (SQLite does
# not), so the domain validates against these same numbers before anything
# reaches the store. action_id and actor are unbounded TEXT on purpose: the
# gateway files refused attempts with whatever the caller sent, and an overlong
# value there must not make a whole batch of evidence unstorable.
EVENT_ID_MAX = 128
TENANT_MAX = 128
RECORD_TYPE_MAX = 128
RECORD_ID_MAX = 256
EXECUTION_ID_MAX = 128
TRACE_ID_MAX = 64
_ENUM_NAME_MAX = 64

# Stable constraint names, so that later Alembic migrations can refer to them.
_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}


class AuditBase(DeclarativeBase):
    """Declarative base of the audit log tables (its own metadata, its own database)."""

    metadata = MetaData(naming_convention=_NAMING)


class AuditEventRow(AuditBase):
    """One stored event; ``sequence`` is its position in the store and the timeline order."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_record", "tenant", "record_type", "record_id", "sequence"),
        Index("ix_audit_events_trace", "tenant", "trace_id"),
        Index("ix_audit_events_execution", "tenant", "execution_id"),
        # SQLite would otherwise reuse the highest rowid after a delete (retention),
        # which would break "sequence only grows". PostgreSQL ignores the option.
        {"sqlite_autoincrement": True},
    )

    # BIGINT on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the autoincrementing rowid.
    sequence: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_MAX), unique=True)
    tenant: Mapped[str] = mapped_column(String(TENANT_MAX))
    record_type: Mapped[str] = mapped_column(String(RECORD_TYPE_MAX))
    record_id: Mapped[str] = mapped_column(String(RECORD_ID_MAX))
    execution_id: Mapped[str] = mapped_column(String(EXECUTION_ID_MAX))
    action_id: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(_ENUM_NAME_MAX))
    outcome: Mapped[str] = mapped_column(String(_ENUM_NAME_MAX))
    occurred_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trace_id: Mapped[str] = mapped_column(String(TRACE_ID_MAX))
    payload: Mapped[bytes] = mapped_column(LargeBinary)


@dataclass(frozen=True)
class AppendResult:
    """How many events of one batch were newly stored and how many were already known."""

    stored: int
    duplicates: int


def _first_occurrences(events: Iterable[audit_pb2.AuditEvent]) -> list[audit_pb2.AuditEvent]:
    """The batch without repeated event ids; the first occurrence wins."""
    seen: set[str] = set()
    unique: list[audit_pb2.AuditEvent] = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            unique.append(event)
    return unique


def _row(event: audit_pb2.AuditEvent) -> dict[str, Any]:
    evidence = audit_pb2.AuditEvent()
    evidence.CopyFrom(event)
    # The sender cannot choose a position in the store.
    evidence.ClearField("sequence")
    return {
        "event_id": event.event_id,
        "tenant": event.tenant,
        "record_type": event.record.type,
        "record_id": event.record.id,
        "execution_id": event.execution_id,
        "action_id": event.action_id,
        "actor": event.actor,
        "type": audit_pb2.AuditEventType.Name(event.type),
        "outcome": common_pb2.Outcome.Name(event.outcome),
        "occurred_at": from_timestamp(event.occurred_at) if event.HasField("occurred_at") else None,
        "trace_id": event.trace_id,
        # Deterministic bytes (sorted map entries), so a later hash chain is reproducible.
        "payload": evidence.SerializeToString(deterministic=True),
    }


def _event(sequence: int, payload: bytes) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent.FromString(payload)
    event.sequence = sequence
    return event


class AuditRepository:
    """Reads and writes ``audit_events``. Every query is scoped to one tenant."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create missing tables and indexes (until Alembic migrations take over)."""
        AuditBase.metadata.create_all(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    def append(self, events: Sequence[audit_pb2.AuditEvent]) -> AppendResult:
        """Store the events not stored yet, all in one transaction, in the given order.

        Events whose id is already stored, or repeats an earlier event of the same
        batch, are counted as duplicates. Two writers may check the same new id at
        once; the loser's insert then violates the unique event id, and the whole
        batch is checked and written again. A retry happens only when the recheck
        finds more stored ids than before, so it ends, and any other integrity
        error is raised, not retried.
        """
        unique = _first_occurrences(events)
        ids = [event.event_id for event in unique]
        while True:
            with self._sessions() as session:
                existing = self._existing_ids(session, ids)
                fresh = [event for event in unique if event.event_id not in existing]
                try:
                    if fresh:
                        session.execute(insert(AuditEventRow), [_row(event) for event in fresh])
                    session.commit()
                except IntegrityError:
                    session.rollback()
                    if self._existing_ids(session, ids) <= existing:
                        raise
                    log.info("event ids of a batch were stored concurrently; appending again")
                    continue
            return AppendResult(stored=len(fresh), duplicates=len(events) - len(fresh))

    @staticmethod
    def _existing_ids(session: Session, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        found = session.scalars(
            select(AuditEventRow.event_id).where(AuditEventRow.event_id.in_(ids))
        )
        return set(found)

    def timeline(
        self,
        tenant: str,
        record_type: str,
        record_id: str,
        *,
        after_sequence: int = 0,
        limit: int = 100,
        types: Sequence[str] = (),
    ) -> list[audit_pb2.AuditEvent]:
        """One record's events after ``after_sequence``, oldest first, ``sequence`` set.

        ``types`` (AuditEventType names) narrows the events; empty means all.
        """
        conditions = [
            AuditEventRow.record_type == record_type,
            AuditEventRow.record_id == record_id,
        ]
        if types:
            conditions.append(AuditEventRow.type.in_(types))
        return self._list(tenant, conditions, after_sequence=after_sequence, limit=limit)

    def list_by_execution(
        self, tenant: str, execution_id: str, *, after_sequence: int = 0, limit: int = 500
    ) -> list[audit_pb2.AuditEvent]:
        """The events of one execution (started, finished, ...), oldest first."""
        return self._list(
            tenant,
            [AuditEventRow.execution_id == execution_id],
            after_sequence=after_sequence,
            limit=limit,
        )

    def list_by_trace(
        self, tenant: str, trace_id: str, *, after_sequence: int = 0, limit: int = 500
    ) -> list[audit_pb2.AuditEvent]:
        """The events carrying one OpenTelemetry trace id, oldest first."""
        return self._list(
            tenant,
            [AuditEventRow.trace_id == trace_id],
            after_sequence=after_sequence,
            limit=limit,
        )

    def count(
        self,
        tenant: str,
        *,
        record_type: str | None = None,
        record_id: str | None = None,
        execution_id: str | None = None,
    ) -> int:
        """How many events one tenant has, optionally narrowed to a record or an execution."""
        query = select(func.count()).select_from(AuditEventRow)
        query = query.where(AuditEventRow.tenant == tenant)
        if record_type is not None:
            query = query.where(AuditEventRow.record_type == record_type)
        if record_id is not None:
            query = query.where(AuditEventRow.record_id == record_id)
        if execution_id is not None:
            query = query.where(AuditEventRow.execution_id == execution_id)
        with self._sessions() as session:
            return int(session.scalar(query) or 0)

    def count_all(self) -> int:
        """How many events the store holds across every tenant (operations, not callers)."""
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(AuditEventRow)) or 0)

    def _list(
        self,
        tenant: str,
        conditions: Sequence[ColumnElement[bool]],
        *,
        after_sequence: int,
        limit: int,
    ) -> list[audit_pb2.AuditEvent]:
        query = (
            select(AuditEventRow.sequence, AuditEventRow.payload)
            .where(AuditEventRow.tenant == tenant, *conditions)
            .where(AuditEventRow.sequence > after_sequence)
            .order_by(AuditEventRow.sequence)
            .limit(limit)
        )
        with self._sessions() as session:
            return [_event(sequence, payload) for sequence, payload in session.execute(query)]
