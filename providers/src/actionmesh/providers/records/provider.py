"""The records provider: controlled, reversible changes to tickets in its own store.

Only the fields an action declares can change, each to a value the provider
accepts; links go only to the tenant's known assets and customers. Every change
returns its change id as ``external_ref``; ``ticket.undo`` (and, for service
level changes, the approval-gated ``ticket.undo_service_level``) puts the before
state back unless the ticket changed since.

The caller's record context decides what Discover offers; Execute never trusts
it beyond tenant, type and id, and re-checks the ticket in the provider's own
database.

Routing, service level, link and unlink have a preview (a dry run): the store plans the
change read-only exactly as the change itself would (``RecordStore.plan_field`` and
friends), so the preview shows the same change Execute would report, or refuses with
the reason Execute would give. Its digest is the ticket's version (``"v7"``). An
Execute approved on a preview carries that digest; the handler then makes the change
only on that version of the ticket (the store's conditional update requires it), else
it refuses ``STATE_CHANGED_SINCE_PREVIEW``: what was approved is exactly what runs, even
if the ticket changes between the SDK's check of the digest and the write.
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
    Planned,
    RecordStore,
    Refused,
    Ticket,
    Who,
)
from actionmesh.sdk import (
    ActionContext,
    Change,
    Facts,
    Input,
    Preview,
    PreviewContext,
    Provider,
    RecordView,
    Resource,
    Result,
    Risk,
    Unavailable,
)

records = Provider("records", version="1.0.0", dedupe=True)

CHANGE_ID_PATTERN = re.compile(r"^chg-[0-9a-f]{16}$")
# A preview's digest: the version of the ticket it was computed against.
DIGEST_PATTERN = re.compile(r"^v([0-9]{1,18})$")
# The service levels from the lowest to the highest.
LEVEL_RANK = {"standard": 0, "priority": 1, "critical": 2}
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
    "STATE_CHANGED_SINCE_PREVIEW": "The ticket changed since the preview that was approved; "
    "nothing changed. Preview and request it again.",
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


def _change(kind: str, field: str, before: str, after: str) -> tuple[Change, str]:
    """The Change a change reports and its words; a preview shows the same Change."""
    if kind == "field":
        return Change(field, before, after), f"{field} changed from {before} to {after}"
    target = f"{field}/{after or before}"
    linked = kind == "link"
    changed = Change("link", "" if linked else target, target if linked else "")
    return changed, f"{'linked to' if linked else 'unlinked from'} {target}"


def digest_of(ticket: Ticket) -> str:
    """A preview's digest: the ticket's version, e.g. ``"v7"``."""
    return f"v{ticket.version}"


def approved_version(ctx: ActionContext) -> int | None:
    """The ticket version the execution was approved on (its preview's digest), or None
    when it was not approved on a preview. A digest this provider never gives is no
    version: -1, which no ticket has (refused STATE_CHANGED_SINCE_PREVIEW)."""
    if not ctx.preview_digest:
        return None
    match = DIGEST_PATTERN.match(ctx.preview_digest)
    return int(match.group(1)) if match else -1


def _result(ctx: ActionContext, outcome: Applied | Refused) -> Result:
    if isinstance(outcome, Refused):
        ctx.logger.info("%s on %s refused: %s", ctx.action_id, ctx.record.id, outcome.reason)
        return Result.rejected(outcome.reason, _REFUSALS[outcome.reason])
    change = outcome.change
    changed, what = _change(change.kind, change.field, change.before, change.after)
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
        expected_version=approved_version(ctx),
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
        expected_version=approved_version(ctx),
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
        expected_version=approved_version(ctx),
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
        expected_version=approved_version(ctx),
    )
    return _result(ctx, outcome)


# -- previews ---------------------------------------------------------------------


def _label(field: str) -> str:
    return field.replace("_", " ")


def _preview(
    ctx: PreviewContext, planned: Planned | Refused, warnings: list[str] | None = None
) -> Preview:
    """A preview of the planned change, or the refusal Execute would give."""
    if isinstance(planned, Refused):
        return Preview.rejected(planned.reason, _REFUSALS[planned.reason])
    changed, _ = _change(planned.kind, planned.field, planned.before, planned.after)
    ticket = f"ticket {ctx.record.id}"
    if planned.kind == "field":
        effect = (
            f"changes the {_label(planned.field)} of {ticket} from {planned.before} to "
            f"{planned.after}"
        )
    elif planned.kind == "link":
        effect = f"links {ticket} to {planned.field} {planned.after}"
    else:
        effect = f"unlinks {ticket} from {planned.field} {planned.before}"
    return Preview.of(
        digest=digest_of(planned.ticket),
        changes=[changed],
        effect=effect,
        warnings=warnings or [],
    )


def _routing_warnings(planned: Planned | Refused) -> list[str]:
    if isinstance(planned, Refused):
        return []
    if planned.field == "priority" and planned.after == "urgent":
        return ["urgent puts the ticket ahead of every other ticket in its queue"]
    if planned.field == "queue" and planned.after == "escalations":
        return ["the escalations queue is worked by the escalation team, not the first line"]
    return []


def _level_warnings(planned: Planned | Refused) -> list[str]:
    if isinstance(planned, Refused):
        return []
    before, after = LEVEL_RANK.get(planned.before, 0), LEVEL_RANK.get(planned.after, 0)
    if planned.after == "critical":
        return [
            "critical is the highest service level: the shortest response and resolution "
            "targets apply at once"
        ]
    if after < before:
        return [
            f"lowers the service level from {planned.before} to {planned.after}: the ticket's "
            "response targets get longer"
        ]
    return []


@records.preview("ticket.update_routing")
async def preview_routing(ctx: PreviewContext, inputs: UpdateRoutingInputs) -> Preview:
    """What ticket.update_routing would change; read-only."""
    planned = await asyncio.to_thread(
        current_store().plan_field, ctx.tenant, ctx.record.id, inputs.field, inputs.value
    )
    return _preview(ctx, planned, _routing_warnings(planned))


@records.preview("ticket.change_service_level")
async def preview_service_level(ctx: PreviewContext, inputs: ServiceLevelInputs) -> Preview:
    """What ticket.change_service_level would change; read-only."""
    planned = await asyncio.to_thread(
        current_store().plan_field, ctx.tenant, ctx.record.id, "service_level", inputs.level
    )
    return _preview(ctx, planned, _level_warnings(planned))


@records.preview("ticket.link")
async def preview_link(ctx: PreviewContext, inputs: LinkInputs) -> Preview:
    """What ticket.link would change; read-only."""
    planned = await asyncio.to_thread(
        current_store().plan_link, ctx.tenant, ctx.record.id, inputs.target_type, inputs.target_id
    )
    return _preview(ctx, planned)


@records.preview("ticket.unlink")
async def preview_unlink(ctx: PreviewContext, inputs: LinkInputs) -> Preview:
    """What ticket.unlink would change; read-only."""
    planned = await asyncio.to_thread(
        current_store().plan_unlink,
        ctx.tenant,
        ctx.record.id,
        inputs.target_type,
        inputs.target_id,
    )
    return _preview(ctx, planned)


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
