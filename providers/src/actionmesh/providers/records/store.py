"""The records provider's own state: tickets, their links, and a log of reversible changes.

Every change to a ticket is an optimistic, conditional update: read the ticket,
then bump its ``version`` only if it is still the version that was read, in the
same transaction as the change itself and its log entry. All changes to one
ticket (fields and links) therefore serialise on that one counter, and no
transaction upgrades a read to a write (which SQLite refuses under concurrency).

The change log is what makes changes reversible: each entry holds the before
and after of exactly one field or link, so an undo can put the before back
and detect that someone changed the ticket since (a conflict, never a silent
overwrite).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Integer, String, Text, and_, delete, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from actionmesh.runtime.db import SqlStore, UTCDateTime

# The routing fields an operator may change, and the values each accepts.
ROUTING_VALUES: dict[str, frozenset[str]] = {
    "queue": frozenset({"support", "billing", "technical", "escalations"}),
    "priority": frozenset({"low", "normal", "high", "urgent"}),
}
SERVICE_LEVELS: frozenset[str] = frozenset({"standard", "priority", "critical"})
CHANGEABLE_FIELDS: frozenset[str] = frozenset({*ROUTING_VALUES, "service_level"})
TARGET_TYPES: frozenset[str] = frozenset({"asset", "customer"})
CLOSED = "closed"
# Optimistic retries of the conditional update before giving up on a hot ticket.
_UPDATE_TRIES = 5

ChangeKind = Literal["field", "link", "unlink"]
RefusalReason = Literal[
    "UNKNOWN_TICKET",
    "TICKET_CLOSED",
    "INVALID_VALUE",
    "NO_CHANGE",
    "UNKNOWN_TARGET",
    "ALREADY_LINKED",
    "NOT_LINKED",
    "UNKNOWN_CHANGE",
    "ALREADY_UNDONE",
    "UNDO_NOT_REVERSIBLE",
    "CHANGED_SINCE",
    "CONCURRENT_UPDATE",
    "STATE_CHANGED_SINCE_PREVIEW",
]


class Base(DeclarativeBase):
    pass


class TicketRow(Base):
    __tablename__ = "tickets"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    subject: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(32))
    priority: Mapped[str] = mapped_column(String(16))
    service_level: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TicketSensitivityRow(Base):
    """How sensitive a ticket is; tickets without a row are normal (a table of its
    own, so databases made before it only gain a table)."""

    __tablename__ = "ticket_sensitivity"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    sensitivity: Mapped[str] = mapped_column(String(16))


class LinkTargetRow(Base):
    """Assets and customers a ticket may be linked to (the tenant's directory)."""

    __tablename__ = "link_targets"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    target_type: Mapped[str] = mapped_column(String(16), primary_key=True)
    target_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(Text)


class LinkRow(Base):
    __tablename__ = "ticket_links"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    target_type: Mapped[str] = mapped_column(String(16), primary_key=True)
    target_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    linked_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ChangeRow(Base):
    __tablename__ = "ticket_changes"

    change_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    ticket_id: Mapped[str] = mapped_column(String(128), index=True)
    action_id: Mapped[str] = mapped_column(String(128))
    # "field": `field` went from before to after. "link"/"unlink": `field` is the
    # target type; the target id is in after (link) or before (unlink).
    kind: Mapped[str] = mapped_column(String(16))
    field: Mapped[str] = mapped_column(String(32))
    before: Mapped[str] = mapped_column(String(64))
    after: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str] = mapped_column(String(256))
    actor: Mapped[str] = mapped_column(String(256))
    trace_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Set on an undo: the change it reverted.
    undo_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Set on a change once it was reverted: the undo's change id.
    undone_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


@dataclass(frozen=True)
class Ticket:
    tenant: str
    ticket_id: str
    subject: str
    status: str
    queue: str
    priority: str
    service_level: str
    version: int = 1
    updated_at: datetime | None = None
    # "normal", "sensitive" or "restricted" (kept in ticket_sensitivity).
    sensitivity: str = "normal"

    @classmethod
    def from_row(cls, row: TicketRow) -> Ticket:
        return cls(
            tenant=row.tenant,
            ticket_id=row.ticket_id,
            subject=row.subject,
            status=row.status,
            queue=row.queue,
            priority=row.priority,
            service_level=row.service_level,
            version=row.version,
            updated_at=row.updated_at,
        )

    def value_of(self, field: str) -> str:
        if field not in CHANGEABLE_FIELDS:
            raise KeyError(field)
        value: str = getattr(self, field)
        return value


@dataclass(frozen=True)
class LinkTarget:
    tenant: str
    target_type: str
    target_id: str
    name: str


@dataclass(frozen=True)
class ChangeRecord:
    change_id: str
    tenant: str
    ticket_id: str
    action_id: str
    kind: str
    field: str
    before: str
    after: str
    reason: str
    request_id: str
    idempotency_key: str
    actor: str
    trace_id: str
    at: datetime
    undo_of: str | None = None
    undone_by: str | None = None

    @classmethod
    def from_row(cls, row: ChangeRow) -> ChangeRecord:
        return cls(
            change_id=row.change_id,
            tenant=row.tenant,
            ticket_id=row.ticket_id,
            action_id=row.action_id,
            kind=row.kind,
            field=row.field,
            before=row.before,
            after=row.after,
            reason=row.reason,
            request_id=row.request_id,
            idempotency_key=row.idempotency_key,
            actor=row.actor,
            trace_id=row.trace_id,
            at=row.at,
            undo_of=row.undo_of,
            undone_by=row.undone_by,
        )


@dataclass(frozen=True)
class Who:
    """Who asked for a change and under which request: copied onto its log entry."""

    action_id: str
    request_id: str
    idempotency_key: str
    actor: str
    trace_id: str
    reason: str


@dataclass(frozen=True)
class Applied:
    """The change was made and logged as ``change``."""

    before: Ticket
    after: Ticket
    change: ChangeRecord


@dataclass(frozen=True)
class Refused:
    """Nothing changed; ``reason`` is UPPER_SNAKE."""

    reason: RefusalReason


@dataclass(frozen=True)
class _Plan:
    """One change worked out against a ticket version, ready to write."""

    kind: ChangeKind
    field: str
    before: str
    after: str
    undo_of: str | None = None


@dataclass(frozen=True)
class Planned:
    """What a change would do, worked out read-only against ``ticket`` (a preview):
    exactly the plan the change itself makes against that version of the ticket."""

    ticket: Ticket
    kind: ChangeKind
    field: str
    before: str
    after: str


# Works out one change against the ticket as read, or refuses it.
_Planner = Callable[[Ticket], _Plan | Refused]


def _refusal(ticket: Ticket | None) -> Refused | None:
    """Why no change can be made to the ticket at all (unknown, closed), else None."""
    if ticket is None:
        return Refused("UNKNOWN_TICKET")
    if ticket.status == CLOSED:
        return Refused("TICKET_CLOSED")
    return None


def new_change_id() -> str:
    return f"chg-{secrets.token_hex(8)}"


def _ticket(
    tenant: str,
    ticket_id: str,
    subject: str,
    status: str = "open",
    queue: str = "support",
    priority: str = "normal",
    service_level: str = "standard",
    sensitivity: str = "normal",
) -> Ticket:
    return Ticket(
        tenant, ticket_id, subject, status, queue, priority, service_level, sensitivity=sensitivity
    )


DEMO_TICKETS: tuple[Ticket, ...] = (
    _ticket("acme", "t-100", "Printer on floor 3 is offline"),
    _ticket("acme", "t-101", "Invoice 2024-118 charged twice", queue="billing", priority="high"),
    _ticket(
        "acme",
        "t-102",
        "VPN drops every 10 minutes",
        status="pending",
        queue="technical",
        service_level="priority",
    ),
    _ticket("acme", "t-103", "Password reset for j.doe", status=CLOSED),
    # Restricted: the default policies never let anyone execute on it, whatever a caller claims.
    _ticket(
        "acme",
        "t-104",
        "Legal hold: export of customer records",
        queue="technical",
        sensitivity="restricted",
    ),
    _ticket("globex", "t-200", "Warehouse scanner not syncing", queue="technical"),
    _ticket("globex", "t-201", "Change billing address", status=CLOSED, queue="billing"),
)
DEMO_TARGETS: tuple[LinkTarget, ...] = (
    LinkTarget("acme", "asset", "a-100", "Printer PR-3F"),
    LinkTarget("acme", "asset", "a-101", "Laptop LT-42"),
    LinkTarget("acme", "customer", "c-100", "Acme Retail"),
    LinkTarget("acme", "customer", "c-101", "Acme Logistics"),
    LinkTarget("globex", "asset", "a-200", "Scanner SC-7"),
    LinkTarget("globex", "customer", "c-200", "Globex Warehousing"),
)
# (tenant, ticket, target type, target id)
DEMO_LINKS: tuple[tuple[str, str, str, str], ...] = (("acme", "t-101", "customer", "c-100"),)


def _set_sensitivity(session: Session, ticket: Ticket) -> None:
    label = session.get(TicketSensitivityRow, (ticket.tenant, ticket.ticket_id))
    if label is not None:
        label.sensitivity = ticket.sensitivity
    elif ticket.sensitivity != "normal":
        session.add(
            TicketSensitivityRow(
                tenant=ticket.tenant, ticket_id=ticket.ticket_id, sensitivity=ticket.sensitivity
            )
        )


class RecordStore(SqlStore):
    """Tickets, link targets, links and the change log (sync; call via to_thread)."""

    metadata = Base.metadata

    # -- seeding and reading ----------------------------------------------------

    @staticmethod
    def _row(ticket: Ticket) -> TicketRow:
        return TicketRow(
            tenant=ticket.tenant,
            ticket_id=ticket.ticket_id,
            subject=ticket.subject,
            status=ticket.status,
            queue=ticket.queue,
            priority=ticket.priority,
            service_level=ticket.service_level,
            version=ticket.version,
            updated_at=ticket.updated_at or datetime.now(UTC),
        )

    def put(self, ticket: Ticket) -> None:
        """Insert or replace one ticket (seeding, tests)."""
        with Session(self.engine) as session, session.begin():
            session.merge(self._row(ticket))
            _set_sensitivity(session, ticket)

    def seed(
        self,
        tickets: Iterable[Ticket],
        targets: Iterable[LinkTarget] = (),
        links: Iterable[tuple[str, str, str, str]] = (),
    ) -> int:
        """Insert what does not exist yet (idempotent); returns how many tickets were added."""
        fresh: set[tuple[str, str]] = set()
        now = datetime.now(UTC)
        with Session(self.engine) as session, session.begin():
            for ticket in tickets:
                if session.get(TicketRow, (ticket.tenant, ticket.ticket_id)) is None:
                    session.add(self._row(ticket))
                    _set_sensitivity(session, ticket)
                    fresh.add((ticket.tenant, ticket.ticket_id))
            for target in targets:
                key = (target.tenant, target.target_type, target.target_id)
                if session.get(LinkTargetRow, key) is None:
                    session.add(
                        LinkTargetRow(
                            tenant=target.tenant,
                            target_type=target.target_type,
                            target_id=target.target_id,
                            name=target.name,
                        )
                    )
            # Links only come with a freshly added ticket, so an operator's unlink survives.
            for tenant, ticket_id, target_type, target_id in links:
                if (tenant, ticket_id) in fresh:
                    session.add(
                        LinkRow(
                            tenant=tenant,
                            ticket_id=ticket_id,
                            target_type=target_type,
                            target_id=target_id,
                            linked_at=now,
                        )
                    )
        return len(fresh)

    def seed_demo(self) -> int:
        return self.seed(DEMO_TICKETS, DEMO_TARGETS, DEMO_LINKS)

    def get(self, tenant: str, ticket_id: str) -> Ticket | None:
        with Session(self.engine) as session:
            row = session.get(TicketRow, (tenant, ticket_id))
            if row is None:
                return None
            label = session.get(TicketSensitivityRow, (tenant, ticket_id))
            ticket = Ticket.from_row(row)
            return ticket if label is None else replace(ticket, sensitivity=label.sensitivity)

    def links(self, tenant: str, ticket_id: str) -> list[tuple[str, str]]:
        """(target type, target id) of the ticket's links, sorted."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(LinkRow.target_type, LinkRow.target_id)
                .where(LinkRow.tenant == tenant, LinkRow.ticket_id == ticket_id)
                .order_by(LinkRow.target_type, LinkRow.target_id)
            )
            return [(t, i) for t, i in rows]

    def changes(self, tenant: str, ticket_id: str) -> list[ChangeRecord]:
        """The ticket's change log, oldest first."""
        with Session(self.engine) as session:
            rows = session.scalars(
                select(ChangeRow)
                .where(ChangeRow.tenant == tenant, ChangeRow.ticket_id == ticket_id)
                .order_by(ChangeRow.at, ChangeRow.change_id)
            )
            return [ChangeRecord.from_row(row) for row in rows]

    def change(self, tenant: str, change_id: str) -> ChangeRecord | None:
        with Session(self.engine) as session:
            row = session.get(ChangeRow, change_id)
            if row is None or row.tenant != tenant:
                return None
            return ChangeRecord.from_row(row)

    def _target_exists(self, tenant: str, target_type: str, target_id: str) -> bool:
        with Session(self.engine) as session:
            return session.get(LinkTargetRow, (tenant, target_type, target_id)) is not None

    def _linked(self, tenant: str, ticket_id: str, target_type: str, target_id: str) -> bool:
        with Session(self.engine) as session:
            key = (tenant, ticket_id, target_type, target_id)
            return session.get(LinkRow, key) is not None

    # -- changes ----------------------------------------------------------------

    def set_field(
        self,
        tenant: str,
        ticket_id: str,
        field: str,
        value: str,
        who: Who,
        *,
        expected_version: int | None = None,
    ) -> Applied | Refused:
        """Change one declared field (routing fields, service level) to a valid value.

        ``expected_version``: the change was approved on a preview of that version of the
        ticket; it is made only on that version (the conditional update requires it),
        else refused ``STATE_CHANGED_SINCE_PREVIEW``.
        """
        planner = self._field_planner(field, value)
        if isinstance(planner, Refused):
            return planner
        return self._apply(tenant, ticket_id, who, planner, expected_version=expected_version)

    def plan_field(self, tenant: str, ticket_id: str, field: str, value: str) -> Planned | Refused:
        """What ``set_field`` would do now, without doing it (read-only)."""
        planner = self._field_planner(field, value)
        if isinstance(planner, Refused):
            return planner
        return self._plan(tenant, ticket_id, planner)

    @staticmethod
    def _field_planner(field: str, value: str) -> _Planner | Refused:
        allowed = SERVICE_LEVELS if field == "service_level" else ROUTING_VALUES.get(field)
        if allowed is None or value not in allowed:
            return Refused("INVALID_VALUE")

        def plan(ticket: Ticket) -> _Plan | Refused:
            current = ticket.value_of(field)
            if current == value:
                return Refused("NO_CHANGE")
            return _Plan("field", field, current, value)

        return plan

    def link(
        self,
        tenant: str,
        ticket_id: str,
        target_type: str,
        target_id: str,
        who: Who,
        *,
        expected_version: int | None = None,
    ) -> Applied | Refused:
        planner = self._link_planner(tenant, ticket_id, target_type, target_id)
        if isinstance(planner, Refused):
            return planner
        return self._apply(tenant, ticket_id, who, planner, expected_version=expected_version)

    def plan_link(
        self, tenant: str, ticket_id: str, target_type: str, target_id: str
    ) -> Planned | Refused:
        """What ``link`` would do now, without doing it (read-only)."""
        planner = self._link_planner(tenant, ticket_id, target_type, target_id)
        if isinstance(planner, Refused):
            return planner
        return self._plan(tenant, ticket_id, planner)

    def _link_planner(
        self, tenant: str, ticket_id: str, target_type: str, target_id: str
    ) -> _Planner | Refused:
        if target_type not in TARGET_TYPES or not self._target_exists(
            tenant, target_type, target_id
        ):
            return Refused("UNKNOWN_TARGET")

        def plan(ticket: Ticket) -> _Plan | Refused:
            if self._linked(tenant, ticket_id, target_type, target_id):
                return Refused("ALREADY_LINKED")
            return _Plan("link", target_type, "", target_id)

        return plan

    def unlink(
        self,
        tenant: str,
        ticket_id: str,
        target_type: str,
        target_id: str,
        who: Who,
        *,
        expected_version: int | None = None,
    ) -> Applied | Refused:
        planner = self._unlink_planner(tenant, ticket_id, target_type, target_id)
        return self._apply(tenant, ticket_id, who, planner, expected_version=expected_version)

    def plan_unlink(
        self, tenant: str, ticket_id: str, target_type: str, target_id: str
    ) -> Planned | Refused:
        """What ``unlink`` would do now, without doing it (read-only)."""
        return self._plan(
            tenant, ticket_id, self._unlink_planner(tenant, ticket_id, target_type, target_id)
        )

    def _unlink_planner(
        self, tenant: str, ticket_id: str, target_type: str, target_id: str
    ) -> _Planner:
        def plan(ticket: Ticket) -> _Plan | Refused:
            if not self._linked(tenant, ticket_id, target_type, target_id):
                return Refused("NOT_LINKED")
            return _Plan("unlink", target_type, target_id, "")

        return plan

    def undo(
        self,
        tenant: str,
        ticket_id: str,
        change_id: str,
        who: Who,
        *,
        may_undo: Callable[[ChangeRecord], bool] | None = None,
    ) -> Applied | Refused:
        """Put back what change ``change_id`` replaced, if nothing changed it since.

        A change of another tenant or ticket, or one ``may_undo`` turns down
        (the undo action is not the one for it), is UNKNOWN_CHANGE.
        """

        def plan(ticket: Ticket) -> _Plan | Refused:
            original = self.change(tenant, change_id)
            if original is None or original.ticket_id != ticket_id:
                return Refused("UNKNOWN_CHANGE")
            if may_undo is not None and not may_undo(original):
                return Refused("UNKNOWN_CHANGE")
            if original.undo_of is not None:
                return Refused("UNDO_NOT_REVERSIBLE")
            if original.undone_by is not None:
                return Refused("ALREADY_UNDONE")
            if original.kind == "field":
                if ticket.value_of(original.field) != original.after:
                    return Refused("CHANGED_SINCE")
                return _Plan("field", original.field, original.after, original.before, change_id)
            target_id = original.after if original.kind == "link" else original.before
            linked = self._linked(tenant, ticket_id, original.field, target_id)
            if original.kind == "link":
                if not linked:
                    return Refused("CHANGED_SINCE")
                return _Plan("unlink", original.field, original.after, "", change_id)
            if linked:
                return Refused("CHANGED_SINCE")
            return _Plan("link", original.field, "", original.before, change_id)

        return self._apply(tenant, ticket_id, who, plan)

    def _plan(self, tenant: str, ticket_id: str, plan_for: _Planner) -> Planned | Refused:
        """The plan ``_apply`` would make against the ticket as it is now; writes nothing."""
        ticket = self.get(tenant, ticket_id)
        refused = _refusal(ticket)
        if refused is not None:
            return refused
        assert ticket is not None
        plan = plan_for(ticket)
        if isinstance(plan, Refused):
            return plan
        return Planned(ticket, plan.kind, plan.field, plan.before, plan.after)

    def _apply(
        self,
        tenant: str,
        ticket_id: str,
        who: Who,
        plan_for: _Planner,
        *,
        expected_version: int | None = None,
    ) -> Applied | Refused:
        for _ in range(_UPDATE_TRIES):
            before = self.get(tenant, ticket_id)
            if before is not None and expected_version not in (None, before.version):
                # Approved on a preview of another version: what was approved is not what
                # would run. (The conditional update below requires this version too.)
                return Refused("STATE_CHANGED_SINCE_PREVIEW")
            refused = _refusal(before)
            if refused is not None:
                return refused
            assert before is not None
            plan = plan_for(before)
            if isinstance(plan, Refused):
                return plan
            now = datetime.now(UTC)
            # The field name comes from CHANGEABLE_FIELDS (checked by value_of when planned).
            new_value: dict[str, Any] = {plan.field: plan.after} if plan.kind == "field" else {}
            after = replace(before, version=before.version + 1, updated_at=now, **new_value)
            change = ChangeRecord(
                change_id=new_change_id(),
                tenant=tenant,
                ticket_id=ticket_id,
                action_id=who.action_id,
                kind=plan.kind,
                field=plan.field,
                before=plan.before,
                after=plan.after,
                reason=who.reason,
                request_id=who.request_id,
                idempotency_key=who.idempotency_key,
                actor=who.actor,
                trace_id=who.trace_id,
                at=now,
                undo_of=plan.undo_of,
            )
            with Session(self.engine) as session, session.begin():
                values: dict[str, object] = {"version": after.version, "updated_at": now}
                if plan.kind == "field":
                    values[plan.field] = plan.after
                bumped = session.execute(
                    update(TicketRow)
                    .where(
                        and_(
                            TicketRow.tenant == tenant,
                            TicketRow.ticket_id == ticket_id,
                            TicketRow.version == before.version,
                        )
                    )
                    .values(**values)
                )
                if getattr(bumped, "rowcount", 0) != 1:
                    # Someone else changed the ticket since we read it: plan again.
                    continue
                if plan.kind == "link":
                    session.add(
                        LinkRow(
                            tenant=tenant,
                            ticket_id=ticket_id,
                            target_type=plan.field,
                            target_id=plan.after,
                            linked_at=now,
                        )
                    )
                elif plan.kind == "unlink":
                    session.execute(
                        delete(LinkRow).where(
                            LinkRow.tenant == tenant,
                            LinkRow.ticket_id == ticket_id,
                            LinkRow.target_type == plan.field,
                            LinkRow.target_id == plan.before,
                        )
                    )
                if plan.undo_of is not None:
                    session.execute(
                        update(ChangeRow)
                        .where(ChangeRow.change_id == plan.undo_of)
                        .values(undone_by=change.change_id)
                    )
                session.add(
                    ChangeRow(
                        change_id=change.change_id,
                        tenant=change.tenant,
                        ticket_id=change.ticket_id,
                        action_id=change.action_id,
                        kind=change.kind,
                        field=change.field,
                        before=change.before,
                        after=change.after,
                        reason=change.reason,
                        request_id=change.request_id,
                        idempotency_key=change.idempotency_key,
                        actor=change.actor,
                        trace_id=change.trace_id,
                        at=change.at,
                        undo_of=change.undo_of,
                    )
                )
            return Applied(before=before, after=after, change=change)
        return Refused("CONCURRENT_UPDATE")
