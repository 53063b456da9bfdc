"""The escalation provider's own state: a log of the hand-offs it made.

One row per (tenant, idempotency key): the escalation the platform opened for
it, or ``outcome_unknown`` when the platform did not answer after the request
was sent. The log is the provider's write-back; the platform stays the system
of record for the escalation itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import String, Text, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from actionmesh.runtime.db import SqlStore, UTCDateTime

State = Literal["opened", "outcome_unknown", "acknowledged", "withdrawn"]


class Base(DeclarativeBase):
    pass


class EscalationLogRow(Base):
    __tablename__ = "escalation_log"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    external_ref: Mapped[str] = mapped_column(String(64))
    record_type: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(128), index=True)
    severity: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(256))
    request_id: Mapped[str] = mapped_column(String(128))
    trace_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class LoggedEscalation:
    tenant: str
    idempotency_key: str
    state: str
    external_ref: str
    record_type: str
    record_id: str
    severity: str
    queue: str
    summary: str
    actor: str
    request_id: str
    trace_id: str
    at: datetime

    @classmethod
    def from_row(cls, row: EscalationLogRow) -> LoggedEscalation:
        return cls(
            tenant=row.tenant,
            idempotency_key=row.idempotency_key,
            state=row.state,
            external_ref=row.external_ref,
            record_type=row.record_type,
            record_id=row.record_id,
            severity=row.severity,
            queue=row.queue,
            summary=row.summary,
            actor=row.actor,
            request_id=row.request_id,
            trace_id=row.trace_id,
            at=row.at,
        )


class EscalationLog(SqlStore):
    """The log in a SQLAlchemy database (sync; call via ``asyncio.to_thread``)."""

    metadata = Base.metadata

    def record(
        self,
        *,
        tenant: str,
        idempotency_key: str,
        state: State,
        external_ref: str,
        record_type: str,
        record_id: str,
        severity: str,
        queue: str,
        summary: str,
        actor: str,
        request_id: str,
        trace_id: str,
    ) -> LoggedEscalation:
        """Write (or overwrite) the entry of one idempotency key."""
        row = EscalationLogRow(
            tenant=tenant,
            idempotency_key=idempotency_key,
            state=state,
            external_ref=external_ref,
            record_type=record_type,
            record_id=record_id,
            severity=severity,
            queue=queue,
            summary=summary,
            actor=actor,
            request_id=request_id,
            trace_id=trace_id,
            at=datetime.now(UTC),
        )
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            # merge: a retry that resolves an earlier "outcome_unknown" replaces it.
            merged = session.merge(row)
        return LoggedEscalation.from_row(merged)

    def set_state(self, tenant: str, idempotency_key: str, state: State) -> None:
        """Move the entry of one key on (acknowledged, withdrawn); no entry: nothing."""
        with Session(self.engine) as session, session.begin():
            row = session.get(EscalationLogRow, (tenant, idempotency_key))
            if row is not None:
                row.state = state
                row.at = datetime.now(UTC)

    def for_record(self, tenant: str, record_type: str, record_id: str) -> list[LoggedEscalation]:
        with Session(self.engine) as session:
            rows = session.scalars(
                select(EscalationLogRow)
                .where(
                    EscalationLogRow.tenant == tenant,
                    EscalationLogRow.record_type == record_type,
                    EscalationLogRow.record_id == record_id,
                )
                .order_by(EscalationLogRow.at)
            )
            return [LoggedEscalation.from_row(row) for row in rows]

    def entries(self) -> list[LoggedEscalation]:
        with Session(self.engine) as session:
            rows = session.scalars(select(EscalationLogRow).order_by(EscalationLogRow.at))
            return [LoggedEscalation.from_row(row) for row in rows]
