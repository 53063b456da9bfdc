"""The records provider: controlled, reversible changes to tickets in its own store.

Only the fields an action declares can change, each to a value the provider
accepts; links go only to the tenant's known assets and customers. Every change
returns its change id as ``external_ref``; ``ticket.undo`` (and, for service
level changes, the approval-gated ``ticket.undo_service_level``) puts the before
state back unless the ticket changed since.

The caller's record context decides what Discover offers; Execute never trusts
it beyond tenant, type and id, and re-checks the ticket in the provider's own
database.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Literal

from actionmesh.providers.records.store import (
    CLOSED,
    ROUTING_VALUES,
    SERVICE_LEVELS,
    Applied,
    ChangeRecord,
    RecordStore,
    Refused,
    Who,
)
from actionmesh.sdk import (
    ActionContext,
    Change,
    Facts,
    Input,
    Provider,
    RecordView,
    Resource,
    Result,
    Risk,
    Unavailable,
)

records = Provider("records", version="1.0.0", dedupe=True)

CHANGE_ID_PATTERN = re.compile(r"^chg-[0-9a-f]{16}$")
TARGET_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


_store: Resource[RecordStore] = Resource("the records store")
current_store = _store.get


_store.bind(
    records,
    open=lambda config: RecordStore.open(config.database_url_for(records.id)),
    seed=RecordStore.seed_demo,
    close=RecordStore.close,
)


@records.record_source("ticket")
async def ticket_facts(tenant: str, ticket_id: str) -> Facts | None:
    """The system of record of tickets: the gateway governs on these facts."""
    ticket = await asyncio.to_thread(current_store().get, tenant, ticket_id)
    if ticket is None:
        return None
    return Facts(
        status=ticket.status,
        version=str(ticket.version),
        sensitivity=ticket.sensitivity,
        attributes={
            "queue": ticket.queue,
            "priority": ticket.priority,
            "service_level": ticket.service_level,
        },
    )


# -- inputs ---------------------------------------------------------------------


def _reason() -> str:
    reason: str = Input(description="Why this change is needed", min_length=3, max_length=200)
    return reason


@dataclass(frozen=True)
class UpdateRoutingInputs:
    field: Literal["queue", "priority"] = Input(description="The routing field to change")
    value: str = Input(
        description="New value; queue: "
        + ", ".join(sorted(ROUTING_VALUES["queue"]))
        + "; priority: "
        + ", ".join(sorted(ROUTING_VALUES["priority"])),
        min_length=1,
        max_length=32,
    )
    reason: str = _reason()


@dataclass(frozen=True)
class ServiceLevelInputs:
    level: Literal["standard", "priority", "critical"] = Input(description="The new SLA tier")
    reason: str = _reason()


@dataclass(frozen=True)
class LinkInputs:
    target_type: Literal["asset", "customer"] = Input(description="What to link the ticket to")
    target_id: str = Input(description="Id of the asset or customer", min_length=1, max_length=64)
    reason: str = _reason()

    def __post_init__(self) -> None:
        if not TARGET_ID_PATTERN.match(self.target_id):
            raise ValueError(
                "target_id must be lower case letters, digits, '.', '_' or '-' "
                "and start with a letter or digit"
            )


@dataclass(frozen=True)
class UndoInputs:
    change_id: str = Input(
        description="The change to undo: the external_ref of the change's result",
        min_length=20,
        max_length=20,
    )
    reason: str = _reason()

    def __post_init__(self) -> None:
        if not CHANGE_ID_PATTERN.match(self.change_id):
            raise ValueError("change_id must be 'chg-' followed by 16 lower case hex digits")


# -- availability, refusals, results ----------------------------------------------


def open_ticket(record: RecordView) -> bool | Unavailable:
    return record.status != CLOSED or Unavailable("TICKET_CLOSED")


_REFUSALS = {
    "UNKNOWN_TICKET": "No such ticket for this tenant.",
    "TICKET_CLOSED": "Closed tickets cannot be changed.",
    "INVALID_VALUE": "That value is not allowed for this field.",
    "NO_CHANGE": "The ticket already has this value.",
    "UNKNOWN_TARGET": "No such asset or customer for this tenant.",
    "ALREADY_LINKED": "The ticket is already linked to it.",
    "NOT_LINKED": "The ticket is not linked to it.",
    "UNKNOWN_CHANGE": "No such change on this ticket that this action can undo.",
    "ALREADY_UNDONE": "That change was undone already.",
    "UNDO_NOT_REVERSIBLE": "An undo cannot be undone; run the original action again instead.",
    "CHANGED_SINCE": "The ticket changed since; undoing would overwrite a later change.",
    "CONCURRENT_UPDATE": "The ticket kept changing during the update; try again.",
}


def _who(ctx: ActionContext, reason: str) -> Who:
    return Who(
        action_id=ctx.action_id,
        request_id=ctx.request_id,
        idempotency_key=ctx.idempotency_key,
        actor=ctx.operator.subject,
        trace_id=ctx.trace_id,
        reason=reason,
    )


def _result(ctx: ActionContext, outcome: Applied | Refused) -> Result:
    if isinstance(outcome, Refused):
        ctx.logger.info("%s on %s refused: %s", ctx.action_id, ctx.record.id, outcome.reason)
        return Result.rejected(outcome.reason, _REFUSALS[outcome.reason])
    change = outcome.change
    if change.kind == "field":
        changed = Change(change.field, change.before, change.after)
        what = f"{change.field} changed from {change.before} to {change.after}"
    else:
        target = f"{change.field}/{change.after or change.before}"
        linked = change.kind == "link"
        changed = Change("link", "" if linked else target, target if linked else "")
        what = f"{'linked to' if linked else 'unlinked from'} {target}"
    ctx.logger.info("%s on %s: %s (%s)", ctx.action_id, ctx.record.id, what, change.change_id)
    if change.undo_of is not None:
        message = f"Undid {change.undo_of}: {what}."
    else:
        message = f"Ticket {ctx.record.id}: {what}. Undo with change_id={change.change_id}."
    return Result.succeeded(external_ref=change.change_id, changes=[changed], message=message)


# -- actions --------------------------------------------------------------------


@records.action(
    "ticket.update_routing",
    label="Change ticket routing",
    description="Change the queue or priority of an open ticket; reversible with ticket.undo.",
    record_types=["ticket"],
    available=open_ticket,
    risk=Risk.MEDIUM,
    reversible=True,
    timeout_s=5.0,
)
async def update_routing(ctx: ActionContext, inputs: UpdateRoutingInputs) -> Result:
    outcome = await asyncio.to_thread(
        current_store().set_field,
        ctx.tenant,
        ctx.record.id,
        inputs.field,
        inputs.value,
        _who(ctx, inputs.reason),
    )
    return _result(ctx, outcome)


@records.action(
    "ticket.change_service_level",
    label="Change service level",
    description="Move a ticket to another SLA tier ("
    + ", ".join(sorted(SERVICE_LEVELS))
    + "); needs a second person's approval. Reversible with ticket.undo_service_level.",
    record_types=["ticket"],
    available=open_ticket,
    risk=Risk.MEDIUM,
    reversible=True,
    requires_approval=True,
    timeout_s=5.0,
)
async def change_service_level(ctx: ActionContext, inputs: ServiceLevelInputs) -> Result:
    outcome = await asyncio.to_thread(
        current_store().set_field,
        ctx.tenant,
        ctx.record.id,
        "service_level",
        inputs.level,
        _who(ctx, inputs.reason),
    )
    return _result(ctx, outcome)


@records.action(
    "ticket.link",
    label="Link ticket",
    description="Link a ticket to one of the tenant's assets or customers; reversible.",
    record_types=["ticket"],
    available=open_ticket,
    risk=Risk.LOW,
    reversible=True,
    timeout_s=5.0,
)
async def link(ctx: ActionContext, inputs: LinkInputs) -> Result:
    outcome = await asyncio.to_thread(
        current_store().link,
        ctx.tenant,
        ctx.record.id,
        inputs.target_type,
        inputs.target_id,
        _who(ctx, inputs.reason),
    )
    return _result(ctx, outcome)


@records.action(
    "ticket.unlink",
    label="Unlink ticket",
    description="Remove a ticket's link to an asset or customer; reversible.",
    record_types=["ticket"],
    available=open_ticket,
    risk=Risk.LOW,
    reversible=True,
    timeout_s=5.0,
)
async def unlink(ctx: ActionContext, inputs: LinkInputs) -> Result:
    outcome = await asyncio.to_thread(
        current_store().unlink,
        ctx.tenant,
        ctx.record.id,
        inputs.target_type,
        inputs.target_id,
        _who(ctx, inputs.reason),
    )
    return _result(ctx, outcome)


# An undo restores a state that existed before, but it is still a change: the
# service level is approval-gated in both directions, so its undo is too.
def _not_service_level(change: ChangeRecord) -> bool:
    return change.field != "service_level"


def _service_level(change: ChangeRecord) -> bool:
    return change.kind == "field" and change.field == "service_level"


@records.action(
    "ticket.undo",
    label="Undo ticket change",
    description="Undo a routing change, link or unlink by its change id, unless the ticket "
    "changed since.",
    record_types=["ticket"],
    available=open_ticket,
    risk=Risk.MEDIUM,
    reversible=False,
    timeout_s=5.0,
)
async def undo(ctx: ActionContext, inputs: UndoInputs) -> Result:
    outcome = await asyncio.to_thread(
        current_store().undo,
        ctx.tenant,
        ctx.record.id,
        inputs.change_id,
        _who(ctx, inputs.reason),
        may_undo=_not_service_level,
    )
    return _result(ctx, outcome)


@records.action(
    "ticket.undo_service_level",
    label="Undo service level change",
    description="Undo a service level change by its change id; needs a second person's "
    "approval, like the change itself.",
    record_types=["ticket"],
    available=open_ticket,
    risk=Risk.MEDIUM,
    reversible=False,
    requires_approval=True,
    timeout_s=5.0,
)
async def undo_service_level(ctx: ActionContext, inputs: UndoInputs) -> Result:
    outcome = await asyncio.to_thread(
        current_store().undo,
        ctx.tenant,
        ctx.record.id,
        inputs.change_id,
        _who(ctx, inputs.reason),
        may_undo=_service_level,
    )
    return _result(ctx, outcome)
