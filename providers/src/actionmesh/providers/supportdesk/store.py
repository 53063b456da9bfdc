"""The support platform's own store: escalations, each under its tenant's idempotency key.

Creation is idempotent by construction: (tenant, idempotency key) is unique in
the database, so two concurrent requests with one key cannot both insert; the
loser reads the winner's row and either replays it (same request) or reports
a conflict (the key was used for a different request).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import String, Text, UniqueConstraint, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from actionmesh.runtime.db import SqlStore, UTCDateTime

Severity = Literal["low", "medium", "high", "critical"]
SEVERITIES: tuple[str, ...] = ("low", "medium", "high", "critical")
DEFAULT_QUEUE = "general"


class Base(DeclarativeBase):
    pass


class EscalationRow(Base):
    __tablename__ = "escalations"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_tenant_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(255))
    # sha256 of the canonical request: what a repeated key must match to be a replay.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    source_type: Mapped[str] = mapped_column(String(64))
    source_id: Mapped[str] = mapped_column(String(128))
    source_status: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(64))
    requested_by: Mapped[str] = mapped_column(String(256))
    trace_id: Mapped[str] = mapped_column(String(32))
    correlation_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Who of the support team acknowledged it and when (status "acknowledged").
    acknowledged_by: Mapped[str] = mapped_column(String(256), default="")
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the requester withdrew it, and why (status "withdrawn").
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    withdrawn_reason: Mapped[str] = mapped_column(Text, default="")


# Columns added after the first release: added to an older file when it is opened.
_LATER_COLUMNS = {
    "acknowledged_by": "VARCHAR(256) NOT NULL DEFAULT ''",
    "acknowledged_at": "TIMESTAMP",
    "withdrawn_at": "TIMESTAMP",
    "withdrawn_reason": "TEXT NOT NULL DEFAULT ''",
}
OPEN, ACKNOWLEDGED, WITHDRAWN = "open", "acknowledged", "withdrawn"


@dataclass(frozen=True)
class NewEscalation:
    """A validated create request (see :mod:`actionmesh.providers.supportdesk.api`)."""

    tenant: str
    source_type: str
    source_id: str
    source_status: str
    summary: str
    severity: str
    queue: str
    requested_by: str
    trace_id: str = ""
    correlation_id: str = ""


@dataclass(frozen=True)
class Escalation:
    """One stored escalation, as the API returns it."""

    id: str
    tenant: str
    idempotency_key: str
    status: str
    source_type: str
    source_id: str
    source_status: str
    summary: str
    severity: str
    queue: str
    requested_by: str
    trace_id: str
    correlation_id: str
    created_at: datetime
    acknowledged_by: str = ""
    acknowledged_at: datetime | None = None
    withdrawn_at: datetime | None = None
    withdrawn_reason: str = ""

    @classmethod
    def from_row(cls, row: EscalationRow) -> Escalation:
        return cls(
            id=row.id,
            tenant=row.tenant,
            idempotency_key=row.idempotency_key,
            status=row.status,
            source_type=row.source_type,
            source_id=row.source_id,
            source_status=row.source_status,
            summary=row.summary,
            severity=row.severity,
            queue=row.queue,
            requested_by=row.requested_by,
            trace_id=row.trace_id,
            correlation_id=row.correlation_id,
            created_at=row.created_at,
            acknowledged_by=row.acknowledged_by or "",
            acknowledged_at=row.acknowledged_at,
            withdrawn_at=row.withdrawn_at,
            withdrawn_reason=row.withdrawn_reason or "",
        )

    def to_json(self) -> Mapping[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "tenant": self.tenant,
            "source": {
                "type": self.source_type,
                "id": self.source_id,
                "status": self.source_status,
            },
            "summary": self.summary,
            "severity": self.severity,
            "queue": self.queue,
            "requested_by": self.requested_by,
            "trace": {"trace_id": self.trace_id, "correlation_id": self.correlation_id},
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at.isoformat(),
            "acknowledged_by": self.acknowledged_by or None,
            "acknowledged_at": _iso(self.acknowledged_at),
            "withdrawn_at": _iso(self.withdrawn_at),
            "withdrawn_reason": self.withdrawn_reason or None,
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True)
class Created:
    """The key was new: this escalation was opened now."""

    escalation: Escalation


@dataclass(frozen=True)
class Replayed:
    """The key was seen before for the same request: the escalation it opened then."""

    escalation: Escalation


@dataclass(frozen=True)
class StateConflict:
    """The escalation is not in a state that allows the change (e.g. withdrawing an
    acknowledged one); nothing changed."""

    escalation: Escalation


@dataclass(frozen=True)
class KeyConflict:
    """The key was used before for a different request; nothing was created."""

    existing_id: str


def new_escalation_id() -> str:
    # Opaque and unguessable, like a SaaS's public ids; not a tenant-wide counter.
    return "SD-" + secrets.token_hex(6).upper()


class EscalationStore(SqlStore):
    """Escalations in a SQLAlchemy database (sync; the HTTP server calls it per request thread)."""

    metadata = Base.metadata

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        present = {c["name"] for c in inspect(engine).get_columns(EscalationRow.__tablename__)}
        with engine.begin() as connection:
            for name, ddl in _LATER_COLUMNS.items():
                if name not in present:
                    connection.execute(
                        text(f"ALTER TABLE {EscalationRow.__tablename__} ADD COLUMN {name} {ddl}")
                    )

    def acknowledge(self, escalation_id: str, by: str) -> Escalation | StateConflict | None:
        """The support team took the escalation on (idempotent); None if there is none."""
        return self._move(escalation_id, ACKNOWLEDGED, by=by)

    def withdraw(self, escalation_id: str, reason: str) -> Escalation | StateConflict | None:
        """The requester withdrew it before anyone acknowledged it (idempotent)."""
        return self._move(escalation_id, WITHDRAWN, reason=reason)

    def _move(
        self, escalation_id: str, to: str, *, by: str = "", reason: str = ""
    ) -> Escalation | StateConflict | None:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            row = session.get(EscalationRow, escalation_id, with_for_update=True)
            if row is None:
                return None
            if row.status == to:
                return Escalation.from_row(row)
            if row.status != OPEN:
                return StateConflict(Escalation.from_row(row))
            row.status = to
            if to == ACKNOWLEDGED:
                row.acknowledged_by = by
                row.acknowledged_at = datetime.now(UTC)
            else:
                row.withdrawn_at = datetime.now(UTC)
                row.withdrawn_reason = reason
            session.flush()
            return Escalation.from_row(row)

    def create(
        self, new: NewEscalation, *, idempotency_key: str, fingerprint: str
    ) -> Created | Replayed | KeyConflict:
        """Open an escalation once per (tenant, idempotency key)."""
        existing = self._by_key(new.tenant, idempotency_key)
        if existing is None:
            row = EscalationRow(
                id=new_escalation_id(),
                tenant=new.tenant,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
                status="open",
                source_type=new.source_type,
                source_id=new.source_id,
                source_status=new.source_status,
                summary=new.summary,
                severity=new.severity,
                queue=new.queue,
                requested_by=new.requested_by,
                trace_id=new.trace_id,
                correlation_id=new.correlation_id,
                created_at=datetime.now(UTC),
            )
            try:
                with Session(self.engine) as session, session.begin():
                    session.add(row)
                    session.flush()
                    created = Escalation.from_row(row)
                return Created(created)
            except IntegrityError:
                # A concurrent request with the same key won the insert: answer as a repeat.
                existing = self._by_key(new.tenant, idempotency_key)
                if existing is None:
                    raise
        if existing.fingerprint != fingerprint:
            return KeyConflict(existing.id)
        return Replayed(Escalation.from_row(existing))

    def _by_key(self, tenant: str, idempotency_key: str) -> EscalationRow | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.scalars(
                select(EscalationRow).where(
                    EscalationRow.tenant == tenant,
                    EscalationRow.idempotency_key == idempotency_key,
                )
            ).one_or_none()

    def get(self, escalation_id: str) -> Escalation | None:
        with Session(self.engine) as session:
            row = session.get(EscalationRow, escalation_id)
            return None if row is None else Escalation.from_row(row)

    def find(self, tenant: str, *, idempotency_key: str | None = None) -> list[Escalation]:
        """A tenant's escalations, oldest first (optionally the one under a key)."""
        query = select(EscalationRow).where(EscalationRow.tenant == tenant)
        if idempotency_key is not None:
            query = query.where(EscalationRow.idempotency_key == idempotency_key)
        with Session(self.engine) as session:
            rows = session.scalars(query.order_by(EscalationRow.created_at, EscalationRow.id))
            return [Escalation.from_row(row) for row in rows]

    def count(self) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.count()).select_from(EscalationRow)) or 0)
