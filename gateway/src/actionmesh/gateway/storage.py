"""Executions and the audit outbox, in one SQLAlchemy database.

An execution's state change and the audit event describing it are written in
the same transaction, so the audit trail can lag but never lose an event.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from actionmesh.gateway.model import (
    ORPHAN_MESSAGE,
    ORPHAN_OUTCOME,
    ORPHAN_REASON,
    PENDING_APPROVAL,
    RUNNING,
    ApprovalState,
    ExecutionRecord,
    ExecutionState,
    ReconcileState,
    Vote,
)
from actionmesh.gateway.notifications import (
    Delivery,
    DeliveryAttempt,
    NotificationRouter,
    NotificationState,
)
from actionmesh.rpc.outcomes import Outcome
from actionmesh.runtime.db import UTCDateTime, make_engine
from actionmesh.runtime.migrations import ServiceMigrations, prepare_schema
from actionmesh.v1 import audit_pb2, common_pb2


class Base(DeclarativeBase):
    pass


class ExecutionRow(Base):
    __tablename__ = "executions"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_execution_key"),
        # The few RUNNING rows (and pending approvals) without scanning every finished one.
        Index("ix_executions_outcome_deadline", "outcome", "dispatch_deadline"),
        # The few executions the reconciler has to ask about, by when they are due.
        Index("ix_executions_reconcile_due", "reconcile_state", "reconcile_next_at"),
    )

    execution_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    request_hash: Mapped[str] = mapped_column(String(64))
    action_id: Mapped[str] = mapped_column(String(128))
    provider_id: Mapped[str] = mapped_column(String(128))
    record_type: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[str] = mapped_column(String(256))
    actor: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(128), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    external_ref: Mapped[str] = mapped_column(String(512), default="")
    changes_json: Mapped[str] = mapped_column(Text, default="[]")
    warnings_json: Mapped[str] = mapped_column(Text, default="[]")
    trace_id: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The request exactly as authorized (ExecuteActionRequest bytes): what an
    # approver approves and what is dispatched after approval.
    request_payload: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    requester_roles_json: Mapped[str] = mapped_column(Text, default="[]")
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    approval_state: Mapped[str] = mapped_column(String(16), default="", index=True)
    approval_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    approval_decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    approver: Mapped[str] = mapped_column(String(256), default="")
    approval_comment: Mapped[str] = mapped_column(Text, default="")
    late_outcome: Mapped[str] = mapped_column(String(32), default="")
    late_result_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Set whenever the row becomes RUNNING: by then its runner has written an outcome
    # (TIMED_OUT at the latest), so a row still RUNNING well after it has lost its runner.
    # None on rows written before revision 0002.
    dispatch_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The RecordFacts (serialized) the execution was authorized on; NULL before 0003.
    facts_payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Reconciliation of unsettled outcomes (revision 0004, see model.ReconcileState).
    reconcile_state: Mapped[str] = mapped_column(
        String(16), default=ReconcileState.NONE.value, server_default=ReconcileState.NONE.value
    )
    reconcile_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reconcile_next_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Which replica is asking the provider now, and until when (a crashed one's lapses).
    reconcile_lease_owner: Mapped[str] = mapped_column(String(128), default="", server_default="")
    reconcile_lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    resolved_reason: Mapped[str] = mapped_column(String(128), default="", server_default="")
    # Long-running actions (revision 0005): accepted, followed, maybe cancelled.
    accepted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    run_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    progress_payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    cancel_requested_by: Mapped[str] = mapped_column(String(256), default="", server_default="")
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_comment: Mapped[str] = mapped_column(Text, default="", server_default="")
    # Approval quorum (revision 0006): what policy asked for when it was held, and the
    # approvals counted so far (JSON, compared whole in the compare-and-set of each vote).
    approvals_needed: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    approver_roles_json: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    votes_json: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    preview_payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class OutboxRow(Base):
    __tablename__ = "audit_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class NotificationRow(Base):
    """One notification to one subscription's webhook (revision 0007): written with its
    audit event, delivered (with retries) by the notifier, kept as the delivery log."""

    __tablename__ = "notification_outbox"
    __table_args__ = (
        Index("ix_notification_due", "state", "next_attempt_at"),
        Index("ix_notification_tenant", "tenant", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subscription_id: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    execution_id: Mapped[str] = mapped_column(String(64), default="")
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_status_code: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class NotificationAttemptRow(Base):
    """One delivery attempt: what the receiver answered (status code) or what failed."""

    __tablename__ = "notification_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(Integer, index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    status_code: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    delivered: Mapped[bool] = mapped_column(Boolean, default=False)


class ParkedEventRow(Base):
    """An event the audit log refused as invalid: kept for an operator, never dropped."""

    __tablename__ = "audit_outbox_parked"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    error: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class OrphanRule:
    """When a RUNNING execution has lost its runner (a gateway that stopped or crashed).

    A live runner writes an outcome by the row's ``dispatch_deadline`` (TIMED_OUT at the
    latest), so a row still RUNNING ``margin`` after it is an orphan, whichever replica
    ran it. Rows from before revision 0002 have no deadline: they count from when their
    dispatch started (approval decision, else start) plus ``legacy_running``.
    """

    margin: timedelta
    legacy_running: timedelta

    def orphaned_at(self, record: ExecutionRecord) -> datetime:
        """The moment ``record``, if still RUNNING, counts as orphaned."""
        if record.dispatch_deadline is not None:
            return record.dispatch_deadline + self.margin
        started = record.approval_decided_at or record.started_at
        return started + self.legacy_running + self.margin

    def condition(self, now: datetime) -> ColumnElement[bool]:
        """The same test as :meth:`orphaned_at`, in SQL, for rows at ``now``."""
        columns = _EXECUTIONS.c
        return and_(
            columns.outcome == RUNNING,
            or_(
                columns.dispatch_deadline <= now - self.margin,
                and_(
                    columns.dispatch_deadline.is_(None),
                    func.coalesce(columns.approval_decided_at, columns.started_at)
                    <= now - self.margin - self.legacy_running,
                ),
            ),
        )


class KeyConflict(Exception):
    """Another execution already holds this (tenant, idempotency key)."""

    def __init__(self, existing: ExecutionRecord) -> None:
        super().__init__(existing.execution_id)
        self.existing = existing


class GatewayStore:
    """Repository for executions and the audit outbox."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """Open the store at ``url`` and bring its schema to the latest Alembic revision.

        With ``migrate=False`` the schema must already be there (SchemaNotCurrentError).
        """
        self.engine = make_engine(url)
        try:
            prepare_schema(self.engine, MIGRATIONS, migrate=migrate)
        except BaseException:
            self.engine.dispose()
            raise
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.notifications: NotificationRouter | None = None
        """Subscriptions the events written are matched against (None: none)."""

    @contextmanager
    def _begin(self) -> Iterator[Session]:
        """A transaction whose event writes also enqueue their notifications."""
        with self._session() as session, session.begin():
            session.info[NOTIFICATIONS_KEY] = self.notifications
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def write(self, op: WriteOp[T]) -> T:
        """Run one write operation in a transaction of its own."""
        try:
            with self._begin() as session:
                return op(session)
        except IntegrityError as exc:
            if isinstance(op, InsertExecution):
                raise self._conflict(op.record, exc) from exc
            raise

    def write_group(self, ops: Sequence[WriteOp[Any]]) -> list[Any]:
        """Run several write operations in one transaction (group commit).

        Returns each operation's result, or the exception it raised. When the group
        fails (an idempotency key already taken, a lost race on another replica),
        nothing of it is kept and each operation runs again alone, so one failure
        never takes its neighbours down with it.
        """
        if len(ops) > 1:
            try:
                with self._begin() as session:
                    return [op(session) for op in ops]
            except Exception:  # retried one by one just below
                pass
        results: list[Any] = []
        for op in ops:
            try:
                results.append(self.write(op))
            except Exception as exc:  # handed to the operation's caller
                results.append(exc)
        return results

    def _conflict(self, record: ExecutionRecord, exc: IntegrityError) -> Exception:
        existing = self.find_by_key(record.tenant, record.idempotency_key)
        return exc if existing is None else KeyConflict(existing)

    def insert_execution(
        self, record: ExecutionRecord, events: Sequence[audit_pb2.AuditEvent]
    ) -> None:
        """Store a new execution with its events; KeyConflict if the key is taken."""
        self.write(InsertExecution(record, tuple(events)))

    def record_attempt(self, events: Sequence[audit_pb2.AuditEvent]) -> None:
        """Enqueue events for an attempt that never became an execution (refused early)."""
        self.write(record_attempt_op(events))

    def finish_execution(
        self, record: ExecutionRecord, events: Sequence[audit_pb2.AuditEvent]
    ) -> bool:
        return self.write(finish_execution_op(record, events))

    def decide_approval(
        self, decided: ExecutionRecord, events: Sequence[audit_pb2.AuditEvent]
    ) -> bool:
        """Move a pending execution on (to ``decided``), exactly once across replicas.

        False when it was no longer pending (another approver or the expiry
        sweep decided first); the events are then not written.
        """
        return self.write(decide_approval_op(decided, events))

    def pending_approvals(
        self,
        tenant: str,
        *,
        record: tuple[str, str] | None,
        not_expired_at: datetime,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ExecutionRecord]:
        """Pending executions of one tenant, oldest first, keyset-paged."""
        query = select(ExecutionRow).where(
            ExecutionRow.tenant == tenant,
            ExecutionRow.outcome == PENDING_APPROVAL,
            ExecutionRow.approval_expires_at > not_expired_at,
        )
        if record is not None:
            query = query.where(
                ExecutionRow.record_type == record[0], ExecutionRow.record_id == record[1]
            )
        if after is not None:
            query = query.where(
                (ExecutionRow.started_at > after[0])
                | ((ExecutionRow.started_at == after[0]) & (ExecutionRow.execution_id > after[1]))
            )
        query = query.order_by(ExecutionRow.started_at, ExecutionRow.execution_id).limit(limit)
        with self._session() as session:
            return [_from_row(row) for row in session.scalars(query)]

    def expired_approvals(self, now: datetime, limit: int) -> list[ExecutionRecord]:
        """Pending executions (any tenant) whose approval window has closed."""
        query = (
            select(ExecutionRow)
            .where(
                ExecutionRow.outcome == PENDING_APPROVAL,
                ExecutionRow.approval_expires_at <= now,
            )
            .order_by(ExecutionRow.approval_expires_at)
            .limit(limit)
        )
        with self._session() as session:
            return [_from_row(row) for row in session.scalars(query)]

    def orphaned_executions(
        self, rule: OrphanRule, now: datetime, limit: int
    ) -> list[ExecutionRecord]:
        """RUNNING executions (any tenant) that lost their runner by ``now``, oldest first."""
        query = (
            select(ExecutionRow)
            .where(rule.condition(now))
            .order_by(ExecutionRow.started_at, ExecutionRow.execution_id)
            .limit(limit)
        )
        with self._session() as session:
            return [_from_row(row) for row in session.scalars(query)]

    def resolve_orphan(
        self,
        execution_id: str,
        rule: OrphanRule,
        now: datetime,
        events: Sequence[audit_pb2.AuditEvent],
    ) -> bool:
        """Close an orphaned execution as TIMED_OUT, exactly once across replicas."""
        return self.write(resolve_orphan_op(execution_id, rule, now, events))

    def record_late_result(
        self, record: ExecutionRecord, events: Sequence[audit_pb2.AuditEvent]
    ) -> bool:
        """Attach a provider's late answer to a TIMED_OUT execution (its outcome stays)."""
        return self.write(record_late_result_op(record, events))

    def reclaim_unavailable(self, execution_id: str, dispatch_deadline: datetime) -> bool:
        """Atomically move an UNAVAILABLE execution back to RUNNING; False if another did."""
        return self.write(reclaim_unavailable_op(execution_id, dispatch_deadline))

    def due_reconciles(self, now: datetime, limit: int) -> list[ExecutionRecord]:
        """PENDING executions (any tenant) due for a reconcile and not leased, oldest due first."""
        query = (
            select(ExecutionRow)
            .where(_reconcile_due(now))
            .order_by(ExecutionRow.reconcile_next_at, ExecutionRow.execution_id)
            .limit(limit)
        )
        with self._session() as session:
            return [_from_row(row) for row in session.scalars(query)]

    def next_reconcile_at(self) -> datetime | None:
        """When the earliest PENDING execution may be asked about (its due time, or when
        another replica's lease on it lapses); None when none is PENDING."""
        columns = _EXECUTIONS.c
        actionable = case(
            (
                and_(
                    columns.reconcile_lease_until.is_not(None),
                    columns.reconcile_lease_until > columns.reconcile_next_at,
                ),
                columns.reconcile_lease_until,
            ),
            else_=columns.reconcile_next_at,
        )
        query = select(func.min(actionable, type_=UTCDateTime())).where(
            columns.reconcile_state == ReconcileState.PENDING.value,
            columns.reconcile_next_at.is_not(None),
        )
        with self._session() as session:
            found: datetime | None = session.scalar(query)
        return found

    def unresolved(self, tenant: str, limit: int) -> list[ExecutionRecord]:
        """A tenant's executions whose outcome still needs an answer, oldest first (not the
        ACCEPTED ones: a long-running execution at work is followed, its state known)."""
        query = (
            select(ExecutionRow)
            .where(
                ExecutionRow.tenant == tenant,
                ExecutionRow.reconcile_state.in_(
                    [ReconcileState.PENDING.value, ReconcileState.NEEDS_ATTENTION.value]
                ),
                # A long-running execution at work is followed, not unknown.
                ExecutionRow.outcome != ExecutionState.ACCEPTED.value,
            )
            .order_by(ExecutionRow.started_at, ExecutionRow.execution_id)
            .limit(limit)
        )
        with self._session() as session:
            return [_from_row(row) for row in session.scalars(query)]

    def unresolved_counts(self) -> dict[str, int]:
        """How many executions are PENDING and NEEDS_ATTENTION (all tenants)."""
        query = (
            select(ExecutionRow.reconcile_state, func.count())
            .where(
                ExecutionRow.reconcile_state.in_(
                    [ReconcileState.PENDING.value, ReconcileState.NEEDS_ATTENTION.value]
                ),
                ExecutionRow.outcome != ExecutionState.ACCEPTED.value,
            )
            .group_by(ExecutionRow.reconcile_state)
        )
        with self._session() as session:
            return {state: int(count) for state, count in session.execute(query).all()}

    def get(self, tenant: str, execution_id: str) -> ExecutionRecord | None:
        with self._session() as session:
            row = session.get(ExecutionRow, execution_id)
            return _from_row(row) if row is not None and row.tenant == tenant else None

    def find_by_key(self, tenant: str, idempotency_key: str) -> ExecutionRecord | None:
        with self._session() as session:
            row = session.scalars(
                select(ExecutionRow).where(
                    ExecutionRow.tenant == tenant, ExecutionRow.idempotency_key == idempotency_key
                )
            ).first()
            return _from_row(row) if row is not None else None

    def pending_events(self, limit: int) -> list[tuple[int, bytes]]:
        with self._session() as session:
            rows = session.execute(
                select(OutboxRow.id, OutboxRow.payload).order_by(OutboxRow.id).limit(limit)
            ).all()
            return [(row.id, row.payload) for row in rows]

    def delete_events(self, ids: Sequence[int]) -> None:
        self.write(delete_events_op(ids))

    def park_event(self, row_id: int, error: str) -> None:
        """Move one outbox row aside so it no longer blocks the ones behind it."""
        self.write(park_event_op(row_id, error))

    def parked_count(self) -> int:
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(ParkedEventRow)) or 0)

    def due_notifications(self, now: datetime, limit: int) -> list[int]:
        """Ids of PENDING notifications due by ``now`` and not leased, oldest first."""
        query = (
            select(NotificationRow.id)
            .where(_notification_due(now))
            .order_by(NotificationRow.next_attempt_at, NotificationRow.id)
            .limit(limit)
        )
        with self._session() as session:
            return list(session.scalars(query))

    def notifications_by_id(self, ids: Sequence[int]) -> list[Delivery]:
        query = select(NotificationRow).where(NotificationRow.id.in_(list(ids)))
        with self._session() as session:
            return [_delivery(row) for row in session.scalars(query.order_by(NotificationRow.id))]

    def notification_log(
        self,
        tenant: str,
        *,
        failed_only: bool,
        subscription_id: str,
        before_id: int | None,
        limit: int,
    ) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
        """One tenant's deliveries, newest first (keyset-paged by id), with their attempts."""
        query = select(NotificationRow).where(NotificationRow.tenant == tenant)
        if failed_only:
            # Given up, or not delivered at the last try.
            query = query.where(
                or_(
                    NotificationRow.state == NotificationState.FAILED.value,
                    and_(
                        NotificationRow.state == NotificationState.PENDING.value,
                        NotificationRow.attempts > 0,
                    ),
                )
            )
        if subscription_id:
            query = query.where(NotificationRow.subscription_id == subscription_id)
        if before_id is not None:
            query = query.where(NotificationRow.id < before_id)
        query = query.order_by(NotificationRow.id.desc()).limit(limit)
        with self._session() as session:
            deliveries = [_delivery(row) for row in session.scalars(query)]
            attempts: dict[int, list[DeliveryAttempt]] = {d.id: [] for d in deliveries}
            if deliveries:
                for row in session.scalars(
                    select(NotificationAttemptRow)
                    .where(NotificationAttemptRow.delivery_id.in_(list(attempts)))
                    .order_by(NotificationAttemptRow.id)
                ):
                    attempts[row.delivery_id].append(
                        DeliveryAttempt(
                            attempt=row.attempt,
                            at=row.at,
                            status_code=row.status_code,
                            error=row.error,
                            delivered=row.delivered,
                        )
                    )
        return [(d, attempts[d.id]) for d in deliveries]

    def notification_counts(self) -> dict[str, int]:
        """How many notifications are in each state (all tenants)."""
        query = select(NotificationRow.state, func.count()).group_by(NotificationRow.state)
        with self._session() as session:
            return {state: int(count) for state, count in session.execute(query).all()}

    def outbox_depth(self) -> int:
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(OutboxRow)) or 0)


T = TypeVar("T")
# A write against an open transaction; GatewayStore.write runs one alone and
# write_group several in one transaction.
WriteOp = Callable[[Session], T]

_EXECUTIONS = cast(Table, ExecutionRow.__table__)
_OUTBOX = cast(Table, OutboxRow.__table__)
_NOTIFICATIONS = cast(Table, NotificationRow.__table__)
_ATTEMPTS = cast(Table, NotificationAttemptRow.__table__)
NOTIFICATIONS_KEY = "actionmesh.notifications"


@dataclass(frozen=True)
class InsertExecution:
    """A new execution with its first events (a taken key becomes KeyConflict)."""

    record: ExecutionRecord
    events: tuple[audit_pb2.AuditEvent, ...]

    def __call__(self, session: Session) -> None:
        session.execute(insert(_EXECUTIONS), [_row_values(self.record)])
        _enqueue(session, self.events)


def record_attempt_op(events: Sequence[audit_pb2.AuditEvent]) -> WriteOp[None]:
    def op(session: Session) -> None:
        _enqueue(session, events)

    return op


def finish_execution_op(
    record: ExecutionRecord, events: Sequence[audit_pb2.AuditEvent]
) -> WriteOp[bool]:
    """Record a RUNNING execution's outcome with its events.

    False (and no events) when the row is no longer RUNNING: this runner was so late
    that another replica resolved the row as orphaned first. LookupError if it is gone.
    """

    def op(session: Session) -> bool:
        # By primary key, no read first: this process inserted the row and runs it.
        result = session.execute(
            update(_EXECUTIONS)
            .where(
                _EXECUTIONS.c.execution_id == record.execution_id,
                _EXECUTIONS.c.outcome == RUNNING,
            )
            .values(
                outcome=record.outcome.value,
                reason=record.reason,
                message=record.message,
                external_ref=record.external_ref,
                changes_json=json.dumps(record.changes),
                warnings_json=json.dumps(record.warnings),
                finished_at=record.finished_at,
                reconcile_state=record.reconcile_state.value,
                reconcile_attempts=record.reconcile_attempts,
                reconcile_next_at=record.reconcile_next_at,
                dispatch_deadline=record.dispatch_deadline,
                **_run_values(record),
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            exists = session.scalar(
                select(_EXECUTIONS.c.outcome).where(
                    _EXECUTIONS.c.execution_id == record.execution_id
                )
            )
            if exists is None:
                raise LookupError(record.execution_id)
            return False
        _enqueue(session, events)
        return True

    return op


def votes_json(votes: Sequence[Vote]) -> str:
    """The stored form of an execution's approvals (deterministic: compared as text)."""
    return json.dumps(
        [
            {
                "approver": v.approver,
                "roles": list(v.roles),
                "comment": v.comment,
                "at": v.at.isoformat(),
            }
            for v in votes
        ],
        sort_keys=True,
    )


def votes_of(text: str) -> tuple[Vote, ...]:
    return tuple(
        Vote(v["approver"], tuple(v["roles"]), v["comment"], datetime.fromisoformat(v["at"]))
        for v in json.loads(text or "[]")
    )


def count_vote_op(
    counted: ExecutionRecord, before: ExecutionRecord, events: Sequence[audit_pb2.AuditEvent]
) -> WriteOp[bool]:
    """Add one approval to a pending execution: a compare-and-set on the approvals counted
    so far (``before``), so two approvers at once on two replicas are counted one after
    the other, each once; False when the execution moved or another approval came first."""
    columns = _EXECUTIONS.c

    def op(session: Session) -> bool:
        return _moved_with_evidence(
            session,
            [
                columns.execution_id == counted.execution_id,
                columns.outcome == PENDING_APPROVAL,
                columns.votes_json == votes_json(before.votes),
            ],
            {"votes_json": votes_json(counted.votes)},
            events,
        )

    return op


def decide_approval_op(
    decided: ExecutionRecord,
    events: Sequence[audit_pb2.AuditEvent],
    before: ExecutionRecord | None = None,
) -> WriteOp[bool]:
    """Write an approval decision (``decided``, a record just moved out of PENDING_APPROVAL);
    with ``before``, only if the approvals counted are still those it had."""
    if decided.approval_state in (None, ApprovalState.PENDING):
        raise ValueError(f"execution {decided.execution_id} carries no approval decision")
    execution_id = decided.execution_id
    values: dict[str, object] = {
        "outcome": decided.outcome.value,
        "approval_state": decided.approval_state.value,
        "approver": decided.approver,
        "approval_comment": decided.approval_comment,
        "approval_decided_at": decided.approval_decided_at,
        "votes_json": votes_json(decided.votes),
    }
    if decided.outcome is not ExecutionState.RUNNING:
        values.update(
            reason=decided.reason, message=decided.message, finished_at=decided.finished_at
        )
    else:
        values["dispatch_deadline"] = decided.dispatch_deadline

    where = [_EXECUTIONS.c.execution_id == execution_id, _EXECUTIONS.c.outcome == PENDING_APPROVAL]
    if before is not None:
        where.append(_EXECUTIONS.c.votes_json == votes_json(before.votes))

    def op(session: Session) -> bool:
        return _moved_with_evidence(session, where, values, events)

    return op


def record_late_result_op(
    record: ExecutionRecord, events: Sequence[audit_pb2.AuditEvent]
) -> WriteOp[bool]:
    def op(session: Session) -> bool:
        result = session.execute(
            update(_EXECUTIONS)
            .where(
                _EXECUTIONS.c.execution_id == record.execution_id,
                _EXECUTIONS.c.outcome == Outcome.TIMED_OUT.value,
                _EXECUTIONS.c.late_outcome == "",
            )
            .values(
                late_outcome=record.late_outcome.value if record.late_outcome else "",
                late_result_at=record.late_result_at,
                external_ref=record.external_ref,
                changes_json=json.dumps(record.changes),
                warnings_json=json.dumps(record.warnings),
                reconcile_state=ReconcileState.RESOLVED.value,
                reconcile_next_at=None,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        _enqueue(session, events)
        return True

    return op


def reclaim_unavailable_op(execution_id: str, dispatch_deadline: datetime) -> WriteOp[bool]:
    """Back to RUNNING when nothing ran: outcome UNAVAILABLE, or resolved as UNAVAILABLE."""
    columns = _EXECUTIONS.c

    def op(session: Session) -> bool:
        result = session.execute(
            update(_EXECUTIONS)
            .where(
                columns.execution_id == execution_id,
                or_(
                    columns.outcome == Outcome.UNAVAILABLE.value,
                    and_(
                        columns.reconcile_state == ReconcileState.RESOLVED.value,
                        columns.late_outcome == Outcome.UNAVAILABLE.value,
                    ),
                ),
            )
            .values(
                outcome=RUNNING.value,
                finished_at=None,
                dispatch_deadline=dispatch_deadline,
                late_outcome="",
                late_result_at=None,
                resolved_reason="",
                reconcile_state=ReconcileState.NONE.value,
                reconcile_attempts=0,
                reconcile_next_at=None,
            )
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    return op


def _reconcile_due(now: datetime, *, right_away: bool = False) -> ColumnElement[bool]:
    """PENDING, not leased (or its lease lapsed), and due (``right_away``: due or not)."""
    columns = _EXECUTIONS.c
    return and_(
        columns.reconcile_state == ReconcileState.PENDING.value,
        columns.reconcile_next_at <= now
        if not right_away
        else columns.reconcile_next_at.is_not(None),
        or_(columns.reconcile_lease_until.is_(None), columns.reconcile_lease_until <= now),
    )


def lease_reconcile_op(
    execution_id: str, owner: str, now: datetime, until: datetime, *, right_away: bool = False
) -> WriteOp[bool]:
    """Take the lease to reconcile one due execution: exactly one replica gets True.

    A lease whose holder crashed lapses at its ``until``; then another may take it.
    ``right_away`` takes it before the execution is due (a same-key retry asks now).
    """

    def op(session: Session) -> bool:
        result = session.execute(
            update(_EXECUTIONS)
            .where(
                _EXECUTIONS.c.execution_id == execution_id,
                _reconcile_due(now, right_away=right_away),
            )
            .values(reconcile_lease_owner=owner, reconcile_lease_until=until)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    return op


def reconcile_op(
    record: ExecutionRecord, owner: str, events: Sequence[audit_pb2.AuditEvent]
) -> WriteOp[bool]:
    """Write what a reconcile attempt found (``record``, moved on from PENDING) and release
    the lease; False (nothing written) unless ``owner`` still holds it on a PENDING row
    without a resolved outcome (a late answer may have come first)."""
    columns = _EXECUTIONS.c
    values: dict[str, object] = {
        "reconcile_state": record.reconcile_state.value,
        "reconcile_attempts": record.reconcile_attempts,
        "reconcile_next_at": record.reconcile_next_at,
        "reconcile_lease_owner": "",
        "reconcile_lease_until": None,
        "resolved_reason": record.resolved_reason,
    }
    if record.reconcile_state is ReconcileState.RESOLVED:
        values.update(
            late_outcome=record.late_outcome.value if record.late_outcome else "",
            late_result_at=record.late_result_at,
            external_ref=record.external_ref,
            changes_json=json.dumps(record.changes),
            warnings_json=json.dumps(record.warnings),
        )

    def op(session: Session) -> bool:
        return _moved_with_evidence(
            session,
            [
                columns.execution_id == record.execution_id,
                columns.reconcile_state == ReconcileState.PENDING.value,
                columns.reconcile_lease_owner == owner,
                columns.late_outcome == "",
            ],
            values,
            events,
        )

    return op


def resolve_by_person_op(
    record: ExecutionRecord, now: datetime, events: Sequence[audit_pb2.AuditEvent]
) -> WriteOp[bool]:
    """Write a person's finding on an unsettled execution; False (nothing written) when it
    was settled first or a replica's lease on it is live (it is being asked right now)."""
    columns = _EXECUTIONS.c

    def op(session: Session) -> bool:
        return _moved_with_evidence(
            session,
            [
                columns.execution_id == record.execution_id,
                columns.reconcile_state.in_(
                    [ReconcileState.PENDING.value, ReconcileState.NEEDS_ATTENTION.value]
                ),
                columns.late_outcome == "",
                columns.outcome != ExecutionState.ACCEPTED.value,
                or_(columns.reconcile_lease_until.is_(None), columns.reconcile_lease_until <= now),
            ],
            {
                "reconcile_state": record.reconcile_state.value,
                "reconcile_next_at": None,
                "late_outcome": record.late_outcome.value if record.late_outcome else "",
                "late_result_at": record.late_result_at,
                "resolved_reason": record.resolved_reason,
                "external_ref": record.external_ref,
            },
            events,
        )

    return op


def follow_op(
    record: ExecutionRecord, owner: str, events: Sequence[audit_pb2.AuditEvent]
) -> WriteOp[bool]:
    """Write what a question about an ACCEPTED execution found (``record``: progress, its
    final outcome, or TIMED_OUT past its maximum duration) and release the lease; False
    (nothing written) unless ``owner`` still holds it on the row, still ACCEPTED."""
    columns = _EXECUTIONS.c
    values: dict[str, object] = {
        "outcome": record.outcome.value,
        "reason": record.reason,
        "message": record.message,
        "external_ref": record.external_ref,
        "changes_json": json.dumps(record.changes),
        "warnings_json": json.dumps(record.warnings),
        "finished_at": record.finished_at,
        "reconcile_state": record.reconcile_state.value,
        "reconcile_attempts": record.reconcile_attempts,
        "reconcile_next_at": record.reconcile_next_at,
        "reconcile_lease_owner": "",
        "reconcile_lease_until": None,
        "resolved_reason": record.resolved_reason,
        "progress_payload": _progress_payload(record),
    }

    def op(session: Session) -> bool:
        return _moved_with_evidence(
            session,
            [
                columns.execution_id == record.execution_id,
                columns.outcome == ExecutionState.ACCEPTED.value,
                columns.reconcile_lease_owner == owner,
            ],
            values,
            events,
        )

    return op


def request_cancel_op(
    record: ExecutionRecord, events: Sequence[audit_pb2.AuditEvent]
) -> WriteOp[bool]:
    """Record who asked to cancel an ACCEPTED execution (due for a question now); False
    when it is no longer ACCEPTED or someone asked first."""
    columns = _EXECUTIONS.c

    def op(session: Session) -> bool:
        return _moved_with_evidence(
            session,
            [
                columns.execution_id == record.execution_id,
                columns.outcome == ExecutionState.ACCEPTED.value,
                columns.cancel_requested_by == "",
            ],
            {
                "cancel_requested_by": record.cancel_requested_by,
                "cancel_requested_at": record.cancel_requested_at,
                "cancel_comment": record.cancel_comment,
                "reconcile_next_at": record.reconcile_next_at,
            },
            events,
        )

    return op


def resolve_orphan_op(
    execution_id: str,
    rule: OrphanRule,
    now: datetime,
    events: Sequence[audit_pb2.AuditEvent],
) -> WriteOp[bool]:
    """Close an orphaned execution as TIMED_OUT (GATEWAY_STOPPED) with its events.

    A compare-and-set on RUNNING and the orphan rule at ``now``: with several replicas
    sweeping (and same-key retries resolving), exactly one writes; the others get False.
    """

    def op(session: Session) -> bool:
        result = session.execute(
            update(_EXECUTIONS)
            .where(_EXECUTIONS.c.execution_id == execution_id, rule.condition(now))
            .values(
                outcome=ORPHAN_OUTCOME.value,
                reason=ORPHAN_REASON,
                message=ORPHAN_MESSAGE,
                finished_at=now,
                # Nobody asked the provider: the reconciler will.
                reconcile_state=ReconcileState.PENDING.value,
                reconcile_attempts=0,
                reconcile_next_at=now,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        _enqueue(session, events)
        return True

    return op


def _notification_due(now: datetime) -> ColumnElement[bool]:
    columns = _NOTIFICATIONS.c
    return and_(
        columns.state == NotificationState.PENDING.value,
        columns.next_attempt_at <= now,
        or_(columns.lease_until.is_(None), columns.lease_until <= now),
    )


def claim_notifications_op(
    ids: Sequence[int], owner: str, now: datetime, until: datetime
) -> WriteOp[list[int]]:
    """Lease due notifications to ``owner`` until ``until``: each id goes to exactly one
    replica (a compare-and-set per row); the ids this one got."""

    def op(session: Session) -> list[int]:
        claimed: list[int] = []
        for row_id in ids:
            result = session.execute(
                update(_NOTIFICATIONS)
                .where(_NOTIFICATIONS.c.id == row_id, _notification_due(now))
                .values(lease_owner=owner, lease_until=until)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(row_id)
        return claimed

    return op


def notification_attempted_op(
    delivery_id: int,
    owner: str,
    attempt: DeliveryAttempt,
    state: NotificationState,
    next_attempt_at: datetime,
) -> WriteOp[bool]:
    """Record one attempt and where the delivery now stands, releasing the lease; False
    (nothing written) when ``owner`` no longer holds it."""

    def op(session: Session) -> bool:
        result = session.execute(
            update(_NOTIFICATIONS)
            .where(
                _NOTIFICATIONS.c.id == delivery_id,
                _NOTIFICATIONS.c.state == NotificationState.PENDING.value,
                _NOTIFICATIONS.c.lease_owner == owner,
            )
            .values(
                state=state.value,
                attempts=attempt.attempt,
                next_attempt_at=next_attempt_at,
                lease_owner="",
                lease_until=None,
                last_attempt_at=attempt.at,
                last_status_code=attempt.status_code,
                last_error=attempt.error,
                delivered_at=attempt.at if attempt.delivered else None,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        session.execute(
            insert(_ATTEMPTS),
            [
                {
                    "delivery_id": delivery_id,
                    "attempt": attempt.attempt,
                    "at": attempt.at,
                    "status_code": attempt.status_code,
                    "error": attempt.error,
                    "delivered": attempt.delivered,
                }
            ],
        )
        return True

    return op


def prune_notifications_op(cutoff: datetime, limit: int = 1000) -> WriteOp[int]:
    """Delete up to ``limit`` settled (DELIVERED, FAILED) notifications created before
    ``cutoff``, with their attempts; how many went."""
    columns = _NOTIFICATIONS.c

    def op(session: Session) -> int:
        ids = list(
            session.scalars(
                select(columns.id)
                .where(
                    columns.state != NotificationState.PENDING.value,
                    columns.created_at < cutoff,
                )
                .order_by(columns.id)
                .limit(limit)
            )
        )
        if ids:
            session.execute(delete(_ATTEMPTS).where(_ATTEMPTS.c.delivery_id.in_(ids)))
            session.execute(delete(_NOTIFICATIONS).where(columns.id.in_(ids)))
        return len(ids)

    return op


def _delivery(row: NotificationRow) -> Delivery:
    return Delivery(
        id=row.id,
        subscription_id=row.subscription_id,
        tenant=row.tenant,
        event_id=row.event_id,
        event_type=row.event_type,
        execution_id=row.execution_id,
        payload=row.payload,
        state=NotificationState(row.state),
        attempts=row.attempts,
        created_at=row.created_at,
        next_attempt_at=row.next_attempt_at,
        last_attempt_at=row.last_attempt_at,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        delivered_at=row.delivered_at,
    )


def delete_events_op(ids: Sequence[int]) -> WriteOp[None]:
    def op(session: Session) -> None:
        session.execute(delete(_OUTBOX).where(_OUTBOX.c.id.in_(list(ids))))

    return op


def park_event_op(row_id: int, error: str) -> WriteOp[None]:
    def op(session: Session) -> None:
        row = session.get(OutboxRow, row_id)
        if row is None:
            return
        session.add(ParkedEventRow(event_id=row.event_id, payload=row.payload, error=error))
        session.delete(row)

    return op


def _moved_with_evidence(
    session: Session,
    where: Sequence[ColumnElement[bool]],
    values: Mapping[str, object],
    events: Sequence[audit_pb2.AuditEvent],
) -> bool:
    """One execution's conditional move (a compare-and-set: exactly one row matches
    ``where``) with its events, in one transaction; False, nothing written, otherwise."""
    result = session.execute(update(_EXECUTIONS).where(*where).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _enqueue(session, events)
    return True


def _enqueue(session: Session, events: Sequence[audit_pb2.AuditEvent]) -> None:
    if events:
        session.execute(
            insert(_OUTBOX),
            [{"event_id": e.event_id, "payload": e.SerializeToString()} for e in events],
        )
        router: NotificationRouter | None = session.info.get(NOTIFICATIONS_KEY)
        if router is not None:
            # Just rows, in the same transaction: delivery happens later, elsewhere.
            rows = router.rows(events, datetime.now(UTC))
            if rows:
                session.execute(insert(_NOTIFICATIONS), rows)


def _row_values(record: ExecutionRecord) -> dict[str, Any]:
    return {
        "execution_id": record.execution_id,
        "tenant": record.tenant,
        "idempotency_key": record.idempotency_key,
        "request_hash": record.request_hash,
        "action_id": record.action_id,
        "provider_id": record.provider_id,
        "record_type": record.record_type,
        "record_id": record.record_id,
        "actor": record.actor,
        "outcome": record.outcome.value,
        "reason": record.reason,
        "message": record.message,
        "external_ref": record.external_ref,
        "changes_json": json.dumps(record.changes),
        "warnings_json": json.dumps(record.warnings),
        "trace_id": record.trace_id,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "request_payload": record.request_payload,
        "requester_roles_json": json.dumps(list(record.requester_roles)),
        "sensitive": record.sensitive,
        "approval_state": record.approval_state.value if record.approval_state else "",
        "approval_expires_at": record.approval_expires_at,
        "approval_decided_at": record.approval_decided_at,
        "approver": record.approver,
        "approval_comment": record.approval_comment,
        "late_outcome": record.late_outcome.value if record.late_outcome else "",
        "late_result_at": record.late_result_at,
        "dispatch_deadline": record.dispatch_deadline,
        "facts_payload": record.facts.SerializeToString() if record.facts is not None else None,
        "reconcile_state": record.reconcile_state.value,
        "reconcile_attempts": record.reconcile_attempts,
        "reconcile_next_at": record.reconcile_next_at,
        "resolved_reason": record.resolved_reason,
        **_run_values(record),
        "approvals_needed": record.approvals_needed,
        "approver_roles_json": json.dumps(list(record.approver_roles_needed)),
        "votes_json": votes_json(record.votes),
        "preview_payload": (
            record.preview.SerializeToString() if record.preview is not None else None
        ),
    }


def _progress_payload(record: ExecutionRecord) -> bytes | None:
    return record.progress.SerializeToString() if record.progress is not None else None


def _run_values(record: ExecutionRecord) -> dict[str, Any]:
    """The columns a long-running execution's moves write (besides the reconcile ones)."""
    return {
        "accepted_at": record.accepted_at,
        "run_deadline": record.run_deadline,
        "progress_payload": _progress_payload(record),
        "cancel_requested_by": record.cancel_requested_by,
        "cancel_requested_at": record.cancel_requested_at,
        "cancel_comment": record.cancel_comment,
    }


def _from_row(row: ExecutionRow) -> ExecutionRecord:
    return ExecutionRecord(
        execution_id=row.execution_id,
        tenant=row.tenant,
        idempotency_key=row.idempotency_key,
        request_hash=row.request_hash,
        action_id=row.action_id,
        provider_id=row.provider_id,
        record_type=row.record_type,
        record_id=row.record_id,
        actor=row.actor,
        outcome=ExecutionState(row.outcome),
        reason=row.reason,
        message=row.message,
        external_ref=row.external_ref,
        changes=tuple((c[0], c[1], c[2]) for c in json.loads(row.changes_json)),
        warnings=tuple(json.loads(row.warnings_json)),
        trace_id=row.trace_id,
        started_at=row.started_at,
        finished_at=row.finished_at,
        request_payload=row.request_payload,
        requester_roles=tuple(json.loads(row.requester_roles_json)),
        sensitive=row.sensitive,
        approval_state=ApprovalState(row.approval_state) if row.approval_state else None,
        approval_expires_at=row.approval_expires_at,
        approval_decided_at=row.approval_decided_at,
        approver=row.approver,
        approval_comment=row.approval_comment,
        late_outcome=Outcome(row.late_outcome) if row.late_outcome else None,
        late_result_at=row.late_result_at,
        dispatch_deadline=row.dispatch_deadline,
        facts=common_pb2.RecordFacts.FromString(row.facts_payload) if row.facts_payload else None,
        reconcile_state=ReconcileState(row.reconcile_state),
        reconcile_attempts=row.reconcile_attempts,
        reconcile_next_at=row.reconcile_next_at,
        resolved_reason=row.resolved_reason,
        accepted_at=row.accepted_at,
        run_deadline=row.run_deadline,
        progress=(
            common_pb2.ExecutionProgress.FromString(row.progress_payload)
            if row.progress_payload
            else None
        ),
        cancel_requested_by=row.cancel_requested_by,
        cancel_requested_at=row.cancel_requested_at,
        cancel_comment=row.cancel_comment,
        approvals_needed=row.approvals_needed,
        approver_roles_needed=tuple(json.loads(row.approver_roles_json or "[]")),
        votes=votes_of(row.votes_json),
        preview=(
            common_pb2.ActionPreview.FromString(row.preview_payload)
            if row.preview_payload
            else None
        ),
    )


MIGRATIONS = ServiceMigrations.beside("gateway", __file__, Base.metadata)
"""The gateway's schema: its migrations (``migrations/`` beside this file) and models."""
