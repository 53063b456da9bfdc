"""The escalation provider: hand a ticket or work item off to the external support platform.

The hand-off crosses a real boundary (an HTTP call to another process with its
own store), so every way it can end maps onto the outcome vocabulary and none
of them is a silent success:

- the platform opened (or, for a repeated key, already had) the escalation and
  the provider logged it: SUCCEEDED, with the platform's id as external ref;
- the platform could not be reached or said "not now" (503/429): nothing was
  created, the handler raises UNAVAILABLE (``DOWNSTREAM_UNAVAILABLE``), the SDK
  keeps no result for the key, and a retry runs again;
- the platform refused the request (4xx): REJECTED, nothing was created;
- the platform opened it but the provider's own log write failed: PARTIAL
  (``ESCALATION_LOG_FAILED``) with the external ref;
- the request was sent and no usable answer came back: PARTIAL
  (``DOWNSTREAM_OUTCOME_UNKNOWN``).

The gateway's idempotency key travels as the platform's ``Idempotency-Key``
header, so even a provider that lost its own state cannot open a second
escalation for one key.

GetExecutionStatus (``escalation_status``) settles what the provider could not
tell at the time by asking the platform, read-only, which escalation it holds
under the key. An answer the SDK stored that is final (SUCCEEDED, REJECTED,
PARTIAL ``ESCALATION_LOG_FAILED``) or an execution still running is answered as
stored, without asking. Otherwise:

- the platform holds an escalation for the key: FINISHED SUCCEEDED with its id as
  external ref and the changes Execute would have reported (also when this
  provider holds nothing for the key: it lost its state, or another replica sent it);
- it holds none and the provider never kept an answer: NEVER_RECEIVED;
- it holds none and the provider answered ``DOWNSTREAM_OUTCOME_UNKNOWN`` (or
  ``DOWNSTREAM_PROTOCOL_ERROR``): RUNNING until ``outcome_settle_s`` after that
  answer (the platform may still be handling the request), then FINISHED REJECTED
  ``DOWNSTREAM_NOT_CREATED``: nothing was escalated;
- the platform does not answer: UNAVAILABLE ``DOWNSTREAM_UNAVAILABLE`` (ask later).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from actionmesh.providers.escalation.config import EscalationConfig
from actionmesh.providers.escalation.platform import (
    Held,
    LookupFailed,
    NothingCreated,
    Opened,
    OutcomeUnknown,
    SupportDeskClient,
)
from actionmesh.providers.escalation.store import EscalationLog
from actionmesh.rpc.errors import Unavailable as UnavailableError
from actionmesh.sdk import (
    ActionContext,
    Change,
    ExecutionState,
    ExecutionStatus,
    Input,
    Provider,
    RecordView,
    Resource,
    Result,
    Risk,
    Unavailable,
)
from actionmesh.v1 import common_pb2

escalation = Provider("escalation", version="1.0.0", dedupe=True)

ESCALATE = "case.escalate"
ACTION_TIMEOUT_S = 10.0
# Time kept back from the caller's deadline to log the answer and reply.
RESERVE_MAX_S = 1.0
RESERVE_SHARE = 0.2
# Below this there is no point sending: the call could only end "outcome unknown".
MIN_CALL_S = 0.1
CLOSED_STATUSES = frozenset({"closed", "resolved", "cancelled"})
DEFAULT_RETRY_S = 2.0
# The answers after which the provider could not tell whether the platform opened the
# escalation: GetExecutionStatus asks the platform instead of repeating them.
UNSETTLED_REASONS = frozenset({"DOWNSTREAM_OUTCOME_UNKNOWN", "DOWNSTREAM_PROTOCOL_ERROR"})


_escalation_log: Resource[EscalationLog] = Resource("the escalation log")
_platform: Resource[SupportDeskClient] = Resource("the support platform client")
current_log = _escalation_log.get
_client = _platform.get


# A missing platform URL stops the start: the action is never registered without a
# platform to send it to.
_escalation_log.bind(
    escalation,
    open=lambda config: EscalationLog.open(config.database_url_for(escalation.id)),
    close=EscalationLog.close,
)
_platform.bind(
    escalation,
    open=lambda _config: SupportDeskClient(EscalationConfig.from_env()),
    close=SupportDeskClient.aclose,
)


@dataclass(frozen=True)
class EscalateInputs:
    summary: str = Input(
        description="What the support team must know: the problem and what was tried",
        min_length=10,
        max_length=1000,
    )
    severity: Literal["low", "medium", "high", "critical"] = Input(
        description="How urgent the support platform should treat it"
    )
    target_queue: str | None = Input(
        None,
        description="Support queue to route to, e.g. 'billing' (default: the platform's "
        "general queue)",
        min_length=2,
        max_length=64,
    )


def escalatable(record: RecordView) -> bool | Unavailable:
    return record.status not in CLOSED_STATUSES or Unavailable("RECORD_CLOSED")


def call_budget(remaining: float | None, ceiling: float) -> float:
    """Seconds the platform call may take: within the caller's deadline, with a reserve."""
    if remaining is None:
        return ceiling
    reserve = min(RESERVE_MAX_S, max(0.0, remaining) * RESERVE_SHARE)
    return min(ceiling, remaining - reserve)


def _payload(ctx: ActionContext, inputs: EscalateInputs) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "tenant": ctx.tenant,
        "source": {"type": ctx.record.type, "id": ctx.record.id, "status": ctx.record.status},
        "summary": inputs.summary,
        "severity": inputs.severity,
        "requested_by": ctx.operator.subject,
        "trace": {"trace_id": ctx.trace_id, "correlation_id": ctx.request_id},
    }
    if inputs.target_queue is not None:
        payload["target_queue"] = inputs.target_queue
    return payload


@escalation.action(
    ESCALATE,
    label="Escalate to support",
    description="Hand the case off to the external support platform; its escalation id "
    "becomes the external reference.",
    record_types=["ticket", "workitem"],
    available=escalatable,
    risk=Risk.MEDIUM,
    reversible=False,
    requires_approval=False,
    timeout_s=ACTION_TIMEOUT_S,
)
async def escalate(ctx: ActionContext, inputs: EscalateInputs) -> Result:
    if ctx.record.status in CLOSED_STATUSES:
        return Result.rejected("RECORD_CLOSED", "A closed or resolved case is not escalated.")
    client = _client()
    budget = call_budget(ctx.time_remaining(), client.config.request_timeout_s)
    if budget < MIN_CALL_S:
        raise UnavailableError(
            "too little time was left to call the support platform; nothing was sent",
            reason="DEADLINE_TOO_SHORT",
            retry_after_s=DEFAULT_RETRY_S,
        )
    try:
        opened = await client.open_escalation(
            _payload(ctx, inputs), idempotency_key=ctx.idempotency_key, timeout_s=budget
        )
    except NothingCreated as refused:
        return _nothing_created(ctx, refused)
    except OutcomeUnknown as unknown:
        return await _outcome_unknown(ctx, inputs, unknown)
    return await _opened(ctx, inputs, opened)


def _nothing_created(ctx: ActionContext, refused: NothingCreated) -> Result:
    if refused.retryable:
        ctx.logger.warning("support platform unavailable: %s", refused.message)
        # Raised, not returned: the SDK keeps no result for the key and the
        # gateway reports UNAVAILABLE, so the same key may run again later.
        raise UnavailableError(
            f"{refused.message}; nothing was escalated, retrying is safe",
            reason="DOWNSTREAM_UNAVAILABLE",
            retry_after_s=refused.retry_after_s or DEFAULT_RETRY_S,
        )
    ctx.logger.info("support platform refused the escalation: %s", refused.message)
    if refused.http_status == 409:
        return Result.rejected(
            "IDEMPOTENCY_KEY_CONFLICT",
            "The support platform already used this idempotency key for a different "
            "escalation; nothing new was created.",
        )
    problems = "; ".join(f"{field}: {why}" for field, why in refused.fields)
    return Result.rejected(
        "DOWNSTREAM_REJECTED",
        f"The support platform refused the escalation ({refused.http_status}): "
        f"{refused.message}{' (' + problems + ')' if problems else ''}"[:2000],
    )


async def _outcome_unknown(
    ctx: ActionContext, inputs: EscalateInputs, unknown: OutcomeUnknown
) -> Result:
    ctx.logger.warning("escalation outcome unknown: %s", unknown.message)
    try:
        await _log(ctx, inputs, state="outcome_unknown", external_ref="", queue="")
    except Exception:
        ctx.logger.exception("could not log the unknown escalation outcome")
    return Result.partial(
        reason=unknown.reason,
        message=(
            f"{unknown.message[:500]}. The support platform may or may not have opened the "
            f"escalation. Re-sending with the same idempotency key ({ctx.idempotency_key}) is "
            "safe: the platform de-duplicates on it and never opens a second escalation for "
            "one key. Check the platform for that key before escalating with a new key."
        ),
    )


def _changes(escalation_id: str, queue: str) -> list[Change]:
    return [Change("escalation", None, escalation_id), Change("escalation_queue", None, queue)]


async def _opened(ctx: ActionContext, inputs: EscalateInputs, opened: Opened) -> Result:
    changes = _changes(opened.escalation_id, opened.queue)
    try:
        await _log(
            ctx, inputs, state="opened", external_ref=opened.escalation_id, queue=opened.queue
        )
    except Exception:
        ctx.logger.exception("escalation %s opened but not logged", opened.escalation_id)
        return Result.partial(
            reason="ESCALATION_LOG_FAILED",
            external_ref=opened.escalation_id,
            changes=changes,
            message=(
                f"The support platform opened escalation {opened.escalation_id}, but the "
                "provider could not record it in its own log. The escalation exists; do not "
                "escalate again. Ask the provider's owners to reconcile its log."
            ),
        )
    ctx.logger.info(
        "escalation %s %s", opened.escalation_id, "replayed" if opened.replayed else "opened"
    )
    message = (
        f"Escalation {opened.escalation_id} was already open for this idempotency key."
        if opened.replayed
        else f"Escalated as {opened.escalation_id} to queue {opened.queue}."
    )
    return Result.succeeded(external_ref=opened.escalation_id, changes=changes, message=message)


async def _log(
    ctx: ActionContext,
    inputs: EscalateInputs,
    *,
    state: Literal["opened", "outcome_unknown"],
    external_ref: str,
    queue: str,
) -> None:
    await asyncio.to_thread(
        current_log().record,
        tenant=ctx.tenant,
        idempotency_key=ctx.idempotency_key,
        state=state,
        external_ref=external_ref,
        record_type=ctx.record.type,
        record_id=ctx.record.id,
        severity=inputs.severity,
        queue=queue or (inputs.target_queue or ""),
        summary=inputs.summary,
        actor=ctx.operator.subject,
        request_id=ctx.request_id,
        trace_id=ctx.trace_id,
    )


# -- GetExecutionStatus -------------------------------------------------------------------


def _unsettled(stored: ExecutionStatus) -> bool:
    return (
        stored.result is not None
        and stored.result.outcome == common_pb2.OUTCOME_PARTIAL
        and stored.result.reason in UNSETTLED_REASONS
    )


@escalation.execution_status
async def escalation_status(
    tenant: str, action_id: str, idempotency_key: str, stored: ExecutionStatus
) -> ExecutionStatus | None:
    """What became of an escalation, settled by the platform when the provider could
    not tell (see the module docstring). None: the SDK's stored status stands."""
    if action_id != ESCALATE or stored.state is ExecutionState.RUNNING:
        return None
    if stored.state is ExecutionState.FINISHED and not _unsettled(stored):
        return None
    client = _client()
    try:
        held = await client.find_escalation(
            tenant, idempotency_key, timeout_s=client.config.request_timeout_s
        )
    except LookupFailed as failed:
        raise UnavailableError(
            f"{failed.message}; what became of the escalation is not known yet, ask again later",
            reason="DOWNSTREAM_UNAVAILABLE",
            retry_after_s=DEFAULT_RETRY_S,
        ) from None
    if held is not None:
        return ExecutionStatus.finished(
            _held_result(held, stored), finished_at=held.created_at or stored.finished_at
        )
    if stored.state is ExecutionState.NEVER_RECEIVED:
        return None
    return _not_held(stored, client.config.outcome_settle_s)


def _held_result(held: Held, stored: ExecutionStatus) -> Result:
    if stored.result is not None:
        how = (
            f"the provider's answer at the time ({stored.result.reason}) was settled by "
            "asking the platform"
        )
    else:
        how = "this provider kept no answer for the key (it lost its state, or another "
        how += "replica sent it)"
    return Result.succeeded(
        external_ref=held.escalation_id,
        changes=_changes(held.escalation_id, held.queue),
        message=(
            f"The support platform opened escalation {held.escalation_id} to queue "
            f"{held.queue} for this idempotency key; {how}."
        ),
    )


def _not_held(stored: ExecutionStatus, settle_s: float) -> ExecutionStatus:
    """The provider's answer was "outcome unknown" and the platform holds nothing (yet)."""
    answered_at = stored.finished_at
    settled_at = None if answered_at is None else answered_at + timedelta(seconds=settle_s)
    if settled_at is not None and datetime.now(UTC) < settled_at:
        return ExecutionStatus.running(
            message=(
                "The support platform holds no escalation for this idempotency key yet; the "
                f"request may still be in its hands until {settled_at.isoformat()}."
            ),
            updated_at=answered_at,
        )
    return ExecutionStatus.finished(
        Result.rejected(
            "DOWNSTREAM_NOT_CREATED",
            "The support platform holds no escalation for this idempotency key: the request "
            "whose answer was lost never opened one, and nothing was escalated. Escalate "
            "again (a new execution, with a new idempotency key).",
        ),
        finished_at=settled_at,
    )
