"""The work item provider: retry a failed or stuck work item, or reprocess a stuck
inbound email into a ticket, against its own store.

It is the system of record of ``workitem`` records: the gateway asks it for an
item's facts (status, sensitivity, kind, version) and governs on those, never on
the caller's claims. Execute still re-checks the item in its own database (the
item may move between the gateway's check and the handler).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from actionmesh.providers.workitems.store import RETRYABLE, Refused, WorkItem, WorkItemStore
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

workitems = Provider("workitems", version="1.0.0", dedupe=True)


_store: Resource[WorkItemStore] = Resource("the workitems store")
current_store = _store.get


_store.bind(
    workitems,
    open=lambda config: WorkItemStore.open(config.database_url_for(workitems.id)),
    seed=WorkItemStore.seed_demo,
    close=WorkItemStore.close,
)


def item_version(item: WorkItem) -> str:
    """Changes whenever the item does (every write stamps ``updated_at``)."""
    stamp = item.updated_at.timestamp() if item.updated_at is not None else 0.0
    return f"{item.attempts}.{round(stamp * 1_000_000)}"


@workitems.record_source("workitem")
async def workitem_facts(tenant: str, item_id: str) -> Facts | None:
    item = await asyncio.to_thread(current_store().get, tenant, item_id)
    if item is None:
        return None
    return Facts(
        status=item.status,
        version=item_version(item),
        sensitivity=item.sensitivity,
        attributes={
            "kind": item.kind,
            "attempts": str(item.attempts),
            "max_attempts": str(item.max_attempts),
        },
    )


@dataclass(frozen=True)
class RetryInputs:
    reason: str = Input(description="Why a retry is safe now", min_length=3, max_length=200)
    priority: Literal["low", "normal", "high"] = Input(
        "normal", description="Queue priority of the reprocessing"
    )


@dataclass(frozen=True)
class ReprocessEmailInputs:
    reason: str = Input(description="Why reprocessing is safe now", min_length=3, max_length=200)
    queue: Literal["support", "billing", "technical"] = Input(
        "support", description="Queue of the ticket created from the email"
    )


def retryable(record: RecordView) -> bool | Unavailable:
    return record.status in RETRYABLE or Unavailable("STATUS_NOT_FAILED")


def reprocessable_email(record: RecordView) -> bool | Unavailable:
    # The kind is optional context from the caller; without it the action is
    # offered and execution checks the item's real kind in the store.
    if record.attributes.get("kind", "inbound_email") != "inbound_email":
        return Unavailable("NOT_INBOUND_EMAIL")
    return retryable(record)


_REFUSALS = {
    "UNKNOWN_ITEM": "No such work item for this tenant.",
    "NOT_FAILED": "Only failed or stuck work items can be retried.",
    "NOT_INBOUND_EMAIL": "Only inbound email work items can be reprocessed into a ticket.",
    "EMAIL_MISSING": "The original email is no longer stored; it cannot be reprocessed.",
    "MAX_ATTEMPTS_REACHED": "The work item has used all its attempts; escalate it instead.",
    "CONCURRENT_UPDATE": "The work item kept changing during the retry; try again.",
}


@workitems.action(
    "workitem.retry",
    label="Retry work item",
    description="Reprocess a failed or stuck work item (inbound email, customer update).",
    record_types=["workitem"],
    available=retryable,
    risk=Risk.LOW,
    reversible=False,
    requires_approval=False,
    timeout_s=5.0,
)
async def retry(ctx: ActionContext, inputs: RetryInputs) -> Result:
    outcome = await asyncio.to_thread(
        current_store().retry,
        ctx.tenant,
        ctx.record.id,
        request_id=ctx.request_id,
        idempotency_key=ctx.idempotency_key,
        action_id=ctx.action_id,
        actor=ctx.operator.subject,
        trace_id=ctx.trace_id,
        priority=inputs.priority,
        reason=inputs.reason,
    )
    if isinstance(outcome, Refused):
        ctx.logger.info("retry of %s refused: %s", ctx.record.id, outcome.reason)
        return Result.rejected(outcome.reason, _REFUSALS[outcome.reason])
    before, after = outcome.before, outcome.after
    ctx.logger.info("reprocessed %s (attempt %d)", after.item_id, after.attempts)
    warnings = []
    if after.attempts >= after.max_attempts:
        warnings.append("This was the last allowed attempt for this work item.")
    return Result.succeeded(
        external_ref=f"{after.item_id}/attempt-{after.attempts}",
        changes=[
            Change("status", before.status, after.status),
            Change("attempts", before.attempts, after.attempts),
        ],
        warnings=warnings,
        message=f"Reprocessed (attempt {after.attempts} of {after.max_attempts}).",
    )


@workitems.action(
    "workitem.reprocess_email",
    label="Reprocess email into ticket",
    description="Create the ticket a failed or stuck inbound email should have become.",
    record_types=["workitem"],
    available=reprocessable_email,
    risk=Risk.LOW,
    reversible=False,
    requires_approval=False,
    timeout_s=5.0,
)
async def reprocess_email(ctx: ActionContext, inputs: ReprocessEmailInputs) -> Result:
    outcome = await asyncio.to_thread(
        current_store().reprocess_email,
        ctx.tenant,
        ctx.record.id,
        request_id=ctx.request_id,
        idempotency_key=ctx.idempotency_key,
        action_id=ctx.action_id,
        actor=ctx.operator.subject,
        trace_id=ctx.trace_id,
        queue=inputs.queue,
        reason=inputs.reason,
    )
    if isinstance(outcome, Refused):
        ctx.logger.info("reprocessing of %s refused: %s", ctx.record.id, outcome.reason)
        return Result.rejected(outcome.reason, _REFUSALS[outcome.reason])
    before, after, ticket = outcome.before, outcome.after, outcome.ticket
    if ticket is None:
        raise RuntimeError("the store reprocessed an email without creating a ticket")
    ctx.logger.info("reprocessed %s into ticket %s", after.item_id, ticket.ticket_id)
    warnings = []
    if after.attempts >= after.max_attempts:
        warnings.append("This was the last allowed attempt for this work item.")
    return Result.succeeded(
        external_ref=ticket.ticket_id,
        changes=[
            Change("status", before.status, after.status),
            Change("attempts", before.attempts, after.attempts),
            Change("ticket", "", ticket.ticket_id),
        ],
        warnings=warnings,
        message=(
            f"Created ticket {ticket.ticket_id} in queue {ticket.queue} "
            f"(attempt {after.attempts} of {after.max_attempts})."
        ),
    )
