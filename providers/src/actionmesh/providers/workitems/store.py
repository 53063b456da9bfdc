"""The work item provider's own state: work items, the log of attempts, stuck emails.

A retry (or an email reprocessed into a ticket) is an optimistic, conditional
update: read the item, then update it only if it is still in the state that
was read, in the same transaction as the attempt log entry (and the created
ticket). Two attempts on one item therefore never both succeed, and no
transaction upgrades a read to a write (which SQLite refuses under
concurrency). Both actions count against the same ``max_attempts``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import Integer, String, Text, and_, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from actionmesh.runtime.db import SqlStore, UTCDateTime

Kind = Literal["inbound_email", "customer_update"]
Status = Literal["failed", "stuck", "processed"]
RETRYABLE: frozenset[str] = frozenset({"failed", "stuck"})
DEFAULT_MAX_ATTEMPTS = 3
# Optimistic retries of the conditional update before giving up on a hot item.
_UPDATE_TRIES = 5


class Base(DeclarativeBase):
    pass


class WorkItemRow(Base):
    __tablename__ = "workitems"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=DEFAULT_MAX_ATTEMPTS)
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WorkItemSensitivityRow(Base):
    """How sensitive a work item is; items without a row are normal (a table of its
    own, so databases made before it only gain a table)."""

    __tablename__ = "workitem_sensitivity"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    sensitivity: Mapped[str] = mapped_column(String(16))


class InboundEmailRow(Base):
    """The original message of an ``inbound_email`` work item, kept for reprocessing."""

    __tablename__ = "inbound_emails"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    sender: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(Text)


class EmailTicketRow(Base):
    """A ticket created by reprocessing an inbound email."""

    __tablename__ = "email_tickets"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(128), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(32))
    sender: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AttemptRow(Base):
    __tablename__ = "workitem_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    item_id: Mapped[str] = mapped_column(String(128), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str] = mapped_column(String(256))
    action_id: Mapped[str] = mapped_column(String(128))
    actor: Mapped[str] = mapped_column(String(256))
    trace_id: Mapped[str] = mapped_column(String(32))
    status_before: Mapped[str] = mapped_column(String(16))
    status_after: Mapped[str] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class WorkItem:
    tenant: str
    item_id: str
    kind: str
    status: str
    attempts: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    last_error: str = ""
    updated_at: datetime | None = None
    # "normal", "sensitive" or "restricted" (kept in workitem_sensitivity).
    sensitivity: str = "normal"

    @classmethod
    def from_row(cls, row: WorkItemRow) -> WorkItem:
        return cls(
            tenant=row.tenant,
            item_id=row.item_id,
            kind=row.kind,
            status=row.status,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            last_error=row.last_error,
            updated_at=row.updated_at,
        )


@dataclass(frozen=True)
class Attempt:
    tenant: str
    item_id: str
    attempt: int
    request_id: str
    idempotency_key: str
    action_id: str
    actor: str
    trace_id: str
    status_before: str
    status_after: str
    priority: str
    reason: str
    at: datetime

    @classmethod
    def from_row(cls, row: AttemptRow) -> Attempt:
        return cls(
            tenant=row.tenant,
            item_id=row.item_id,
            attempt=row.attempt,
            request_id=row.request_id,
            idempotency_key=row.idempotency_key,
            action_id=row.action_id,
            actor=row.actor,
            trace_id=row.trace_id,
            status_before=row.status_before,
            status_after=row.status_after,
            priority=row.priority,
            reason=row.reason,
            at=row.at,
        )


@dataclass(frozen=True)
class InboundEmail:
    tenant: str
    item_id: str
    sender: str
    subject: str


@dataclass(frozen=True)
class EmailTicket:
    tenant: str
    ticket_id: str
    item_id: str
    attempt: int
    queue: str
    sender: str
    subject: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: EmailTicketRow) -> EmailTicket:
        return cls(
            tenant=row.tenant,
            ticket_id=row.ticket_id,
            item_id=row.item_id,
            attempt=row.attempt,
            queue=row.queue,
            sender=row.sender,
            subject=row.subject,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class Retried:
    """The item was reprocessed (into ``ticket``, for an email reprocessed into a ticket)."""

    before: WorkItem
    after: WorkItem
    ticket: EmailTicket | None = None


@dataclass(frozen=True)
class Refused:
    """The item cannot be retried; ``reason`` is UPPER_SNAKE."""

    reason: Literal[
        "UNKNOWN_ITEM",
        "NOT_FAILED",
        "NOT_INBOUND_EMAIL",
        "EMAIL_MISSING",
        "MAX_ATTEMPTS_REACHED",
        "CONCURRENT_UPDATE",
    ]
    item: WorkItem | None = None


DEMO_ITEMS: tuple[WorkItem, ...] = (
    WorkItem("acme", "wi-1001", "inbound_email", "failed", 1, last_error="mail parser timeout"),
    WorkItem(
        "acme",
        "wi-1002",
        "customer_update",
        "stuck",
        1,
        last_error="CRM did not acknowledge the update",
    ),
    WorkItem("acme", "wi-1003", "inbound_email", "processed", 1),
    # Sensitive (personal data in the email): operators may not act on it, supervisors may.
    WorkItem(
        "acme",
        "wi-1006",
        "inbound_email",
        "failed",
        1,
        last_error="mail parser timeout",
        sensitivity="sensitive",
    ),
    WorkItem(
        "globex", "wi-2001", "customer_update", "failed", 1, last_error="postcode rejected by CRM"
    ),
    WorkItem(
        "acme",
        "wi-1004",
        "inbound_email",
        "stuck",
        1,
        last_error="ticket routing rules timed out",
    ),
    WorkItem(
        "acme",
        "wi-1005",
        "inbound_email",
        "failed",
        3,
        last_error="attachment exceeds the size limit",
    ),
)
DEMO_EMAILS: tuple[InboundEmail, ...] = (
    InboundEmail("acme", "wi-1001", "ops@acme.example", "Order 5521 arrived damaged"),
    InboundEmail("acme", "wi-1003", "jo@acme.example", "Thanks for the quick fix"),
    InboundEmail("acme", "wi-1004", "dana@acme.example", "Cannot log in to the portal"),
    InboundEmail("acme", "wi-1005", "lee@acme.example", "Signed contract attached"),
    InboundEmail("acme", "wi-1006", "hr@acme.example", "Medical certificate for J. Doe"),
)


def _set_sensitivity(session: Session, item: WorkItem) -> None:
    label = session.get(WorkItemSensitivityRow, (item.tenant, item.item_id))
    if label is not None:
        label.sensitivity = item.sensitivity
    elif item.sensitivity != "normal":
        session.add(
            WorkItemSensitivityRow(
                tenant=item.tenant, item_id=item.item_id, sensitivity=item.sensitivity
            )
        )


class WorkItemStore(SqlStore):
    """Work items and retry attempts in a SQLAlchemy database (sync; call via to_thread)."""

    metadata = Base.metadata

    @staticmethod
    def _row(item: WorkItem) -> WorkItemRow:
        return WorkItemRow(
            tenant=item.tenant,
            item_id=item.item_id,
            kind=item.kind,
            status=item.status,
            attempts=item.attempts,
            max_attempts=item.max_attempts,
            last_error=item.last_error,
            updated_at=item.updated_at or datetime.now(UTC),
        )

    def put(self, item: WorkItem) -> None:
        """Insert or replace one work item (seeding, tests)."""
        with Session(self.engine) as session, session.begin():
            session.merge(self._row(item))
            _set_sensitivity(session, item)

    def seed(self, items: Iterable[WorkItem], emails: Iterable[InboundEmail] = ()) -> int:
        """Insert the items (and emails) that do not exist yet (idempotent).

        Returns how many work items were added.
        """
        added = 0
        with Session(self.engine) as session, session.begin():
            for item in items:
                if session.get(WorkItemRow, (item.tenant, item.item_id)) is None:
                    session.add(self._row(item))
                    _set_sensitivity(session, item)
                    added += 1
            for email in emails:
                if session.get(InboundEmailRow, (email.tenant, email.item_id)) is None:
                    session.add(
                        InboundEmailRow(
                            tenant=email.tenant,
                            item_id=email.item_id,
                            sender=email.sender,
                            subject=email.subject,
                        )
                    )
        return added

    def seed_demo(self) -> int:
        return self.seed(DEMO_ITEMS, DEMO_EMAILS)

    def put_email(self, email: InboundEmail) -> None:
        """Insert or replace the message of an inbound email item (seeding, tests)."""
        with Session(self.engine) as session, session.begin():
            session.merge(
                InboundEmailRow(
                    tenant=email.tenant,
                    item_id=email.item_id,
                    sender=email.sender,
                    subject=email.subject,
                )
            )

    def email(self, tenant: str, item_id: str) -> InboundEmail | None:
        with Session(self.engine) as session:
            row = session.get(InboundEmailRow, (tenant, item_id))
            if row is None:
                return None
            return InboundEmail(row.tenant, row.item_id, row.sender, row.subject)

    def tickets(self, tenant: str, item_id: str) -> list[EmailTicket]:
        """Tickets created from this item's email, oldest first."""
        with Session(self.engine) as session:
            rows = session.scalars(
                select(EmailTicketRow)
                .where(EmailTicketRow.tenant == tenant, EmailTicketRow.item_id == item_id)
                .order_by(EmailTicketRow.created_at, EmailTicketRow.ticket_id)
            )
            return [EmailTicket.from_row(row) for row in rows]

    def get(self, tenant: str, item_id: str) -> WorkItem | None:
        with Session(self.engine) as session:
            row = session.get(WorkItemRow, (tenant, item_id))
            if row is None:
                return None
            label = session.get(WorkItemSensitivityRow, (tenant, item_id))
            item = WorkItem.from_row(row)
            return item if label is None else replace(item, sensitivity=label.sensitivity)

    def attempts(self, tenant: str, item_id: str) -> list[Attempt]:
        with Session(self.engine) as session:
            rows = session.scalars(
                select(AttemptRow)
                .where(AttemptRow.tenant == tenant, AttemptRow.item_id == item_id)
                .order_by(AttemptRow.id)
            )
            return [Attempt.from_row(row) for row in rows]

    def retry(
        self,
        tenant: str,
        item_id: str,
        *,
        request_id: str,
        idempotency_key: str,
        action_id: str,
        actor: str,
        trace_id: str,
        priority: str,
        reason: str,
    ) -> Retried | Refused:
        """Reprocess a failed or stuck item: status -> processed, one more attempt, logged."""
        return self._process(
            tenant,
            item_id,
            _Attempting(request_id, idempotency_key, action_id, actor, trace_id, priority, reason),
        )

    def reprocess_email(
        self,
        tenant: str,
        item_id: str,
        *,
        request_id: str,
        idempotency_key: str,
        action_id: str,
        actor: str,
        trace_id: str,
        queue: str,
        reason: str,
    ) -> Retried | Refused:
        """Turn a failed or stuck inbound email into a ticket in ``queue``; one more attempt."""
        return self._process(
            tenant,
            item_id,
            _Attempting(request_id, idempotency_key, action_id, actor, trace_id, "normal", reason),
            ticket_queue=queue,
        )

    def _process(
        self, tenant: str, item_id: str, attempt: _Attempting, ticket_queue: str | None = None
    ) -> Retried | Refused:
        for _ in range(_UPDATE_TRIES):
            before = self.get(tenant, item_id)
            if before is None:
                return Refused("UNKNOWN_ITEM")
            if ticket_queue is not None and before.kind != "inbound_email":
                return Refused("NOT_INBOUND_EMAIL", before)
            if before.status not in RETRYABLE:
                return Refused("NOT_FAILED", before)
            if before.attempts >= before.max_attempts:
                return Refused("MAX_ATTEMPTS_REACHED", before)
            email = None
            if ticket_queue is not None:
                email = self.email(tenant, item_id)
                if email is None:
                    return Refused("EMAIL_MISSING", before)
            now = datetime.now(UTC)
            after = WorkItem(
                tenant=tenant,
                item_id=item_id,
                kind=before.kind,
                status="processed",
                attempts=before.attempts + 1,
                max_attempts=before.max_attempts,
                last_error="",
                updated_at=now,
            )
            ticket = None
            if email is not None and ticket_queue is not None:
                ticket = EmailTicket(
                    tenant=tenant,
                    ticket_id=f"t-{secrets.token_hex(5)}",
                    item_id=item_id,
                    attempt=after.attempts,
                    queue=ticket_queue,
                    sender=email.sender,
                    subject=email.subject,
                    created_at=now,
                )
            with Session(self.engine) as session, session.begin():
                changed = session.execute(
                    update(WorkItemRow)
                    .where(
                        and_(
                            WorkItemRow.tenant == tenant,
                            WorkItemRow.item_id == item_id,
                            WorkItemRow.status == before.status,
                            WorkItemRow.attempts == before.attempts,
                        )
                    )
                    .values(
                        status=after.status,
                        attempts=after.attempts,
                        last_error=after.last_error,
                        updated_at=now,
                    )
                )
                if getattr(changed, "rowcount", 0) != 1:
                    # Someone else changed the item since we read it: read again.
                    continue
                session.add(
                    AttemptRow(
                        tenant=tenant,
                        item_id=item_id,
                        attempt=after.attempts,
                        request_id=attempt.request_id,
                        idempotency_key=attempt.idempotency_key,
                        action_id=attempt.action_id,
                        actor=attempt.actor,
                        trace_id=attempt.trace_id,
                        status_before=before.status,
                        status_after=after.status,
                        priority=attempt.priority,
                        reason=attempt.reason,
                        at=now,
                    )
                )
                if ticket is not None:
                    session.add(
                        EmailTicketRow(
                            tenant=ticket.tenant,
                            ticket_id=ticket.ticket_id,
                            item_id=ticket.item_id,
                            attempt=ticket.attempt,
                            queue=ticket.queue,
                            sender=ticket.sender,
                            subject=ticket.subject,
                            created_at=ticket.created_at,
                        )
                    )
            return Retried(before=before, after=after, ticket=ticket)
        return Refused("CONCURRENT_UPDATE")


@dataclass(frozen=True)
class _Attempting:
    """Who asks for an attempt and why: copied onto its log entry."""

    request_id: str
    idempotency_key: str
    action_id: str
    actor: str
    trace_id: str
    priority: str
    reason: str
