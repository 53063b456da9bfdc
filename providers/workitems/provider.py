"""The work item provider: retry a failed or stuck work item, against its own store.

The caller's record context decides what Discover offers; Execute never trusts
it and re-checks the item in the provider's own database.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from providers.sdk import (
    ActionContext,
    Change,
    Input,
    Provider,
    ProviderConfig,
    RecordView,
    Result,
    Risk,
    Unavailable,
)
from providers.workitems.store import RETRYABLE, Refused, WorkItemStore

workitems = Provider("workitems", version="1.0.0", dedupe=True)


class _Runtime:
    """The store opened by on_start; one Provider object is served once per process."""

    store: WorkItemStore | None = None


_runtime = _Runtime()


def current_store() -> WorkItemStore:
    if _runtime.store is None:
        raise RuntimeError("the workitems store is not open; is the provider running?")
    return _runtime.store


@workitems.on_start
async def open_store(config: ProviderConfig) -> None:
    store = await asyncio.to_thread(WorkItemStore.open, config.database_url_for(workitems.id))
    if config.seed_demo:
        await asyncio.to_thread(store.seed_demo)
    _runtime.store = store


@workitems.on_stop
async def close_store() -> None:
    store, _runtime.store = _runtime.store, None
    if store is not None:
        await asyncio.to_thread(store.close)


@dataclass(frozen=True)
class RetryInputs:
    reason: str = Input(description="Why a retry is safe now", min_length=3, max_length=200)
    priority: Literal["low", "normal", "high"] = Input(
        "normal", description="Queue priority of the reprocessing"
    )


def retryable(record: RecordView) -> bool | Unavailable:
    return record.status in RETRYABLE or Unavailable("STATUS_NOT_FAILED")


_REFUSALS = {
    "UNKNOWN_ITEM": "No such work item for this tenant.",
    "NOT_FAILED": "Only failed or stuck work items can be retried.",
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
