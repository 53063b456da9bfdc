"""The audit event store: SQLAlchemy 2.x models and the repository.

Each event is kept twice: as the serialized ``AuditEvent`` (the evidence, read
back verbatim) and as a few indexed columns that exist only to find it. Every
event is also a link of its tenant's hash chain (:mod:`auditlog.chain`), and
the events of an execution are folded into one ``audit_executions`` summary row
(:mod:`auditlog.summaries`) in the same transaction.

The repository is synchronous; async callers run it with ``asyncio.to_thread``.
Only portable SQL is used, so the same code runs on SQLite and PostgreSQL.

Chains and concurrency: a tenant's chain head (``audit_chain_heads``) is read,
the batch is linked after it, and the head moves with a compare-and-set
``UPDATE ... WHERE head_index = <read>``. A concurrent writer (another thread,
another audit log replica) makes that update miss, and the batch is retried
from scratch. On PostgreSQL the head row is also locked ``FOR UPDATE`` so
writers queue instead of retrying. ``(tenant, chain_index)`` is unique, so a
forked chain cannot be stored whatever happens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
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
    UniqueConstraint,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from actionmesh.auditlog import chain as audit_chain
from actionmesh.auditlog.summaries import SUMMARY_FIELDS, Summary, fold, to_message
from actionmesh.rpc.convert import from_timestamp
from actionmesh.runtime.db import UTCDateTime
from actionmesh.runtime.migrations import ServiceMigrations, prepare_schema
from actionmesh.v1 import audit_pb2

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
ACTOR_MAX = 256
_ENUM_NAME_MAX = 64
_HASH_CHARS = 64
# A batch that keeps losing the chain head race gives up (UNAVAILABLE upstream,
# the outbox retries) rather than spinning.
_MAX_APPEND_ATTEMPTS = 50
_VERIFY_BATCH = 1000

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
        UniqueConstraint("tenant", "chain_index", name="uq_audit_events_tenant_chain_index"),
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
    chain_index: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(_HASH_CHARS))
    chain_hash: Mapped[str] = mapped_column(String(_HASH_CHARS))


class ChainHeadRow(AuditBase):
    """The end of one tenant's hash chain: the index and hash of its newest event."""

    __tablename__ = "audit_chain_heads"

    tenant: Mapped[str] = mapped_column(String(TENANT_MAX), primary_key=True)
    head_index: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str] = mapped_column(String(_HASH_CHARS))


class ExecutionSummaryRow(AuditBase):
    """One execution folded from its events (see :mod:`auditlog.summaries`); derived data."""

    __tablename__ = "audit_executions"
    __table_args__ = (
        Index("ix_audit_executions_recent", "tenant", "first_sequence"),
        Index("ix_audit_executions_actor", "tenant", "actor"),
        Index("ix_audit_executions_approver", "tenant", "approver"),
        Index("ix_audit_executions_action", "tenant", "action_id"),
        Index("ix_audit_executions_record", "tenant", "record_type", "record_id"),
    )

    tenant: Mapped[str] = mapped_column(String(TENANT_MAX), primary_key=True)
    execution_id: Mapped[str] = mapped_column(String(EXECUTION_ID_MAX), primary_key=True)
    first_sequence: Mapped[int] = mapped_column(BigInteger)
    record_type: Mapped[str] = mapped_column(String(RECORD_TYPE_MAX))
    record_id: Mapped[str] = mapped_column(String(RECORD_ID_MAX))
    action_id: Mapped[str] = mapped_column(Text)
    provider_id: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    approver: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(_ENUM_NAME_MAX))
    reason: Mapped[str] = mapped_column(Text)
    external_ref: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    trace_id: Mapped[str] = mapped_column(String(TRACE_ID_MAX))
    late_outcome: Mapped[str] = mapped_column(String(_ENUM_NAME_MAX))
    last_event_type: Mapped[str] = mapped_column(String(_ENUM_NAME_MAX))
    last_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    state_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    event_count: Mapped[int] = mapped_column(Integer)


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
    """The row of a new event; the sender cannot choose its position in store or chain."""
    return {
        **audit_chain.indexed_columns(event),
        "occurred_at": from_timestamp(event.occurred_at) if event.HasField("occurred_at") else None,
        "payload": audit_chain.stored_bytes(event),
    }


def _event(
    sequence: int, payload: bytes, chain_index: int, prev_hash: str, chain_hash: str
) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent.FromString(payload)
    event.sequence = sequence
    event.chain_index = chain_index
    event.prev_chain_hash = prev_hash
    event.chain_hash = chain_hash
    return event


_EVENT_COLUMNS = (
    AuditEventRow.sequence,
    AuditEventRow.payload,
    AuditEventRow.chain_index,
    AuditEventRow.prev_hash,
    AuditEventRow.chain_hash,
)


class _ChainMoved(Exception):
    """Another writer extended a chain between our read of its head and our update."""


@dataclass(frozen=True)
class SummaryFilter:
    """What ListExecutionSummaries narrows to; empty values mean "any"."""

    actor: str = ""
    action_id: str = ""
    outcomes: tuple[str, ...] = ()
    record_type: str = ""
    record_id: str = ""
    started_after: datetime | None = None
    started_before: datetime | None = None


class AuditRepository:
    """Reads and writes ``audit_events``. Every query is scoped to one tenant."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._append_lock = threading.Lock()

    def create_schema(self, *, migrate: bool = True) -> None:
        """Bring the tables to the latest Alembic revision (auditlog/migrations).

        With ``migrate=False`` only check they are there: SchemaNotCurrentError otherwise.
        """
        prepare_schema(self._engine, MIGRATIONS, migrate=migrate)

    def close(self) -> None:
        self._engine.dispose()

    def append(self, events: Sequence[audit_pb2.AuditEvent]) -> AppendResult:
        """Store the events not stored yet, all in one transaction, in the given order.

        Events whose id is already stored, or repeats an earlier event of the same
        batch, are counted as duplicates. Stored events extend their tenant's
        chain and their executions' summaries in the same transaction. When a
        concurrent writer stored one of the ids or moved a chain head first, the
        whole batch is checked and written again (bounded); an integrity error
        that no concurrent write explains is raised, not retried.
        """
        unique = _first_occurrences(events)
        ids = [event.event_id for event in unique]
        for attempt in range(_MAX_APPEND_ATTEMPTS):
            # One writer per process at a time: threads of this process never race
            # each other for a chain head, only other processes can.
            with self._append_lock, self._sessions() as session:
                existing = self._existing_ids(session, ids)
                fresh = [event for event in unique if event.event_id not in existing]
                try:
                    if fresh:
                        self._store(session, fresh)
                    session.commit()
                except (IntegrityError, _ChainMoved) as exc:
                    session.rollback()
                    concurrent = isinstance(exc, _ChainMoved)
                    if not concurrent and not self._explained(session, ids, existing):
                        raise
                    log.info("a concurrent writer stored events first; appending again")
                    time.sleep(min(0.001 * (attempt + 1), 0.05))
                    continue
            return AppendResult(stored=len(fresh), duplicates=len(events) - len(fresh))
        raise RuntimeError(f"gave up appending after {_MAX_APPEND_ATTEMPTS} concurrent conflicts")

    def _explained(self, session: Session, ids: Sequence[str], existing: set[str]) -> bool:
        """Whether an integrity error came from a concurrent writer of the same event ids."""
        return bool(self._existing_ids(session, ids) - existing)

    def _store(self, session: Session, fresh: Sequence[audit_pb2.AuditEvent]) -> None:
        rows = [_row(event) for event in fresh]
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_tenant.setdefault(row["tenant"], []).append(row)
        # A fixed order of head locks, so two writers of several tenants cannot deadlock.
        for tenant in sorted(by_tenant):
            self._link(session, tenant, by_tenant[tenant])
        # RETURNING gives the assigned positions without reading the rows back.
        stored = session.execute(
            insert(AuditEventRow).returning(AuditEventRow.event_id, AuditEventRow.sequence), rows
        )
        sequences = {event_id: sequence for event_id, sequence in stored}
        self._fold_summaries(session, fresh, sequences)

    def _link(self, session: Session, tenant: str, rows: list[dict[str, Any]]) -> None:
        """Give the rows the next links of the tenant's chain and move its head."""
        head = session.execute(
            select(ChainHeadRow.head_index, ChainHeadRow.head_hash)
            .where(ChainHeadRow.tenant == tenant)
            .with_for_update()
        ).one_or_none()
        if head is None:
            try:
                session.execute(
                    insert(ChainHeadRow),
                    [{"tenant": tenant, "head_index": 0, "head_hash": audit_chain.GENESIS_HASH}],
                )
            except IntegrityError as exc:
                # Two first writers of a tenant: the loser retries behind the new head.
                raise _ChainMoved(tenant) from exc
            head_index, head_hash = 0, audit_chain.GENESIS_HASH
        else:
            head_index, head_hash = int(head.head_index), str(head.head_hash)
        links = audit_chain.chain(tenant, head_index, head_hash, (row["payload"] for row in rows))
        last_index, last_hash = head_index, head_hash
        for row, (index, prev_hash, current) in zip(rows, links, strict=True):
            row.update(chain_index=index, prev_hash=prev_hash, chain_hash=current)
            last_index, last_hash = index, current
        moved = session.execute(
            update(ChainHeadRow)
            .where(ChainHeadRow.tenant == tenant, ChainHeadRow.head_index == head_index)
            .values(head_index=last_index, head_hash=last_hash)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            raise _ChainMoved(tenant)

    def _fold_summaries(
        self,
        session: Session,
        fresh: Sequence[audit_pb2.AuditEvent],
        sequences: dict[str, int],
    ) -> None:
        """Fold the new events (``sequences``: event id -> position) into their summaries."""
        with_execution = [event for event in fresh if event.execution_id]
        if not with_execution:
            return
        keys = {(event.tenant, event.execution_id) for event in with_execution}
        summaries = self._summaries(session, keys)
        for event in with_execution:
            key = (event.tenant, event.execution_id)
            summary = summaries.get(key)
            if summary is None:
                sequence = sequences[event.event_id]
                summary = summaries[key] = Summary(event.tenant, event.execution_id, sequence)
            fold(summary, event, sequences[event.event_id])
        new = [_summary_row(summary) for summary in summaries.values() if not summary.stored]
        old = [_summary_row(summary) for summary in summaries.values() if summary.stored]
        if new:
            session.execute(insert(ExecutionSummaryRow), new)
        if old:
            # Bulk UPDATE by primary key (tenant, execution_id).
            session.execute(update(ExecutionSummaryRow), old)

    @staticmethod
    def _summaries(session: Session, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Summary]:
        found: dict[tuple[str, str], Summary] = {}
        by_tenant: dict[str, list[str]] = {}
        for tenant, execution_id in keys:
            by_tenant.setdefault(tenant, []).append(execution_id)
        for tenant, execution_ids in by_tenant.items():
            rows = session.scalars(
                select(ExecutionSummaryRow).where(
                    ExecutionSummaryRow.tenant == tenant,
                    ExecutionSummaryRow.execution_id.in_(execution_ids),
                )
            )
            for row in rows:
                found[(row.tenant, row.execution_id)] = _summary(row, stored=True)
        return found

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
            select(*_EVENT_COLUMNS)
            .where(AuditEventRow.tenant == tenant, *conditions)
            .where(AuditEventRow.sequence > after_sequence)
            .order_by(AuditEventRow.sequence)
            .limit(limit)
        )
        with self._sessions() as session:
            return [_event(*row) for row in session.execute(query)]

    # -- execution summaries -------------------------------------------------------
    def list_summaries(
        self, tenant: str, where: SummaryFilter, *, before_sequence: int = 0, limit: int = 100
    ) -> list[tuple[int, audit_pb2.ExecutionSummary]]:
        """One tenant's execution summaries, newest first, as (position, summary).

        ``before_sequence`` (a position from the previous page) continues a listing.
        """
        query = select(ExecutionSummaryRow).where(ExecutionSummaryRow.tenant == tenant)
        if before_sequence:
            query = query.where(ExecutionSummaryRow.first_sequence < before_sequence)
        if where.actor:
            query = query.where(
                or_(
                    ExecutionSummaryRow.actor == where.actor,
                    ExecutionSummaryRow.approver == where.actor,
                )
            )
        if where.action_id:
            query = query.where(ExecutionSummaryRow.action_id == where.action_id)
        if where.outcomes:
            query = query.where(ExecutionSummaryRow.outcome.in_(where.outcomes))
        if where.record_type:
            query = query.where(ExecutionSummaryRow.record_type == where.record_type)
        if where.record_id:
            query = query.where(ExecutionSummaryRow.record_id == where.record_id)
        if where.started_after is not None:
            query = query.where(ExecutionSummaryRow.started_at >= where.started_after)
        if where.started_before is not None:
            query = query.where(ExecutionSummaryRow.started_at < where.started_before)
        query = query.order_by(ExecutionSummaryRow.first_sequence.desc()).limit(limit)
        with self._sessions() as session:
            rows = session.scalars(query).all()
        return [(row.first_sequence, to_message(_summary(row))) for row in rows]

    # -- the hash chain ------------------------------------------------------------
    def chain_tenants(self) -> list[str]:
        """Every tenant that has a chain (operations, not callers)."""
        with self._sessions() as session:
            return list(session.scalars(select(ChainHeadRow.tenant).order_by(ChainHeadRow.tenant)))

    def verify_chain(self, tenant: str) -> audit_chain.Verification:
        """Walk the tenant's chain from its first event and report the first broken link."""
        with self._sessions() as session:
            head = session.execute(
                select(ChainHeadRow.head_index, ChainHeadRow.head_hash).where(
                    ChainHeadRow.tenant == tenant
                )
            ).one_or_none()
        head_index, head_hash = (
            (int(head.head_index), str(head.head_hash))
            if head is not None
            else (0, audit_chain.GENESIS_HASH)
        )
        return audit_chain.verify_links(
            tenant, self._links(tenant), head_index=head_index, head_hash=head_hash
        )

    def _links(self, tenant: str) -> Iterator[audit_chain.StoredLink]:
        """The tenant's stored links in chain order, read in bounded batches."""
        names = tuple(audit_chain.indexed_columns(audit_pb2.AuditEvent()))
        columns = [getattr(AuditEventRow, name) for name in names]
        after = 0
        while True:
            query = (
                select(
                    AuditEventRow.sequence,
                    AuditEventRow.chain_index,
                    AuditEventRow.prev_hash,
                    AuditEventRow.chain_hash,
                    AuditEventRow.payload,
                    *columns,
                )
                .where(AuditEventRow.tenant == tenant, AuditEventRow.chain_index > after)
                .order_by(AuditEventRow.chain_index)
                .limit(_VERIFY_BATCH)
            )
            with self._sessions() as session:
                rows = session.execute(query).all()
            for sequence, index, prev_hash, chain_hash, payload, *values in rows:
                yield audit_chain.StoredLink(
                    sequence=sequence,
                    event_id=str(values[0]),
                    tenant=str(values[1]),
                    chain_index=index,
                    prev_hash=prev_hash,
                    chain_hash=chain_hash,
                    payload=payload,
                    columns=dict(zip(names, (str(v) for v in values), strict=True)),
                )
            if len(rows) < _VERIFY_BATCH:
                return
            after = rows[-1][1]


def _summary_row(summary: Summary) -> dict[str, Any]:
    row = {name: getattr(summary, name) for name in SUMMARY_FIELDS}
    row.update(tenant=summary.tenant, execution_id=summary.execution_id)
    return row


def _summary(row: ExecutionSummaryRow, *, stored: bool = False) -> Summary:
    summary = Summary(
        row.tenant, row.execution_id, **{name: getattr(row, name) for name in SUMMARY_FIELDS}
    )
    summary.stored = stored
    return summary


MIGRATIONS = ServiceMigrations.beside("auditlog", __file__, AuditBase.metadata)
"""The audit log's schema: its migrations (``migrations/`` beside this file) and models."""
