"""The escalation provider: hand a ticket or work item off to the external support platform,
and follow it until the support team acknowledges it.

``case.escalate`` is a long-running action (``LONG_RUNNING``: at most 24 h, polled every
2 s, cancellable). Execute answers ACCEPTED at once; the SDK runs the handler in the
background, and GetExecutionStatus follows it:

- opening: the handler sends the escalation with the gateway's idempotency key as the
  platform's ``Idempotency-Key`` (the platform never opens two for one key). While the
  platform does not answer it re-sends with the same key for ``open_retry_s``
  (RUNNING, progress "support desk not answering; retrying"), then ends REJECTED
  ``DOWNSTREAM_UNAVAILABLE`` (nothing was created) or, when a request went unanswered
  after it was sent, PARTIAL ``DOWNSTREAM_OUTCOME_UNKNOWN``. A refusal (4xx) is REJECTED
  (``DOWNSTREAM_REJECTED``, ``IDEMPOTENCY_KEY_CONFLICT``); opened but not written to the
  provider's own log: PARTIAL ``ESCALATION_LOG_FAILED`` with the external ref.
- waiting: opened, the escalation id is the external ref at once (a same-key Execute
  answers ACCEPTED with it); RUNNING with progress "ticket SD-... opened at the support
  desk; waiting for the support team to acknowledge". The handler asks the platform every
  ``acknowledge_poll_s``.
- acknowledged: FINISHED SUCCEEDED, external ref the escalation id, changes ``escalation``,
  ``escalation_queue``, ``escalation_acknowledged_by`` and ``escalation_acknowledged_at``.
  Withdrawn at the platform by someone else: PARTIAL ``ESCALATION_WITHDRAWN``.
- cancelled (StopExecution): the handler withdraws the escalation at the platform and
  answers CANCELLED (change ``escalation`` -> ``withdrawn``); nothing opened yet:
  CANCELLED "nothing was escalated"; acknowledged first: SUCCEEDED (too late to stop);
  the platform not answering: PARTIAL ``WITHDRAW_FAILED``.
- the provider stopping while it waits: the SDK stores PARTIAL ``PROVIDER_STOPPED``; the
  escalation stays open at the platform.

GetExecutionStatus (``escalation_status``) answers a running task from the SDK. Where the
provider could not tell at the time (PARTIAL ``DOWNSTREAM_OUTCOME_UNKNOWN``,
``DOWNSTREAM_PROTOCOL_ERROR``, ``PROVIDER_STOPPED``), or holds nothing for the key (it
lost its state, or another replica sent it), it asks the platform, read-only, which
escalation it holds under the key:

- acknowledged: FINISHED SUCCEEDED with the answer the handler would have given;
- open: RUNNING, waiting for the acknowledgement (so a restarted provider still answers);
- withdrawn there: FINISHED PARTIAL ``ESCALATION_WITHDRAWN``;
- none, and the provider never kept an answer: NEVER_RECEIVED;
- none, and the provider answered ``DOWNSTREAM_OUTCOME_UNKNOWN`` (or
  ``DOWNSTREAM_PROTOCOL_ERROR``): RUNNING until ``outcome_settle_s`` after that
  answer (the platform may still be handling the request), then FINISHED REJECTED
  ``DOWNSTREAM_NOT_CREATED``: nothing was escalated;
- the platform does not answer: UNAVAILABLE ``DOWNSTREAM_UNAVAILABLE`` (ask later).

Preview (``preview_escalation``, read-only, the platform is not asked): the effect in
words ("opens an escalation in queue billing of the support desk for ticket t-1 (severity
high), then waits for the support team to acknowledge it"), the change
``escalation_queue`` (none -> the queue), warnings (what leaves for the external
platform, a critical severity, no undo once acknowledged), or the refusal Execute would
give (``RECORD_CLOSED``). Its digest hashes the case facts Execute sends and decides on:
tenant, record type, id and status (``case-<sha256 prefix>``); an escalation approved on
a preview is refused ``STATE_CHANGED_SINCE_PREVIEW`` by the SDK when they moved.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
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
from actionmesh.providers.escalation.store import EscalationLog, State
from actionmesh.rpc.errors import Unavailable as UnavailableError
from actionmesh.sdk import (
    ActionContext,
    Change,
    ExecutionState,
    ExecutionStatus,
    Input,
    LongRunning,
    Preview,
    PreviewContext,
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
# PROVIDER_STOPPED: the provider stopped while it waited for the acknowledgement.
UNSETTLED_REASONS = frozenset(
    {"DOWNSTREAM_OUTCOME_UNKNOWN", "DOWNSTREAM_PROTOCOL_ERROR", "PROVIDER_STOPPED"}
)
# Long-running: Execute answers ACCEPTED; the handler waits for the support team.
LONG_RUNNING = LongRunning(max_duration_s=24 * 3600.0, poll_interval_s=2.0, cancellable=True)
RETRYING = "support desk not answering; retrying"
# Where the support platform routes an escalation without target_queue.
DEFAULT_QUEUE = "general"
CLOSED_MESSAGE = "A closed or resolved case is not escalated."


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
    description="Hand the case off to the external support platform and wait until the "
    "support team acknowledges it; the platform's escalation id becomes the external "
    "reference. Long-running: answered ACCEPTED at once, cancellable (the escalation is "
    "then withdrawn at the platform).",
    record_types=["ticket", "workitem"],
    available=escalatable,
    risk=Risk.MEDIUM,
    reversible=False,
    requires_approval=False,
    timeout_s=ACTION_TIMEOUT_S,
    long_running=LONG_RUNNING,
)
async def escalate(ctx: ActionContext, inputs: EscalateInputs) -> Result:
    if ctx.record.status in CLOSED_STATUSES:
        return Result.rejected("RECORD_CLOSED", CLOSED_MESSAGE)
    client = _client()
    try:
        opened = await _open(ctx, inputs, client)
        if isinstance(opened, Result):
            return opened
        logged = await _opened(ctx, inputs, opened)
        if logged is not None:
            return logged
        ctx.set_external_ref(opened.escalation_id)
        ctx.report_progress(message=_waiting(opened.escalation_id))
        held = await _wait_for_acknowledgement(ctx, client, opened.escalation_id)
    except asyncio.CancelledError:
        if ctx.stop_request is None:
            raise  # the provider is stopping: the escalation stays as it is
        return await _withdraw(ctx, client)
    if held.withdrawn:
        return _withdrawn_at_platform(held)
    await _log_state(ctx, "acknowledged", held)
    return acknowledged_result(held)


def case_digest(record: RecordView) -> str:
    """The digest of the case facts an escalation sends and decides on (its preview's)."""
    facts = json.dumps(
        [record.tenant, record.type, record.id, record.status], separators=(",", ":")
    )
    return "case-" + hashlib.sha256(facts.encode()).hexdigest()[:32]


@escalation.preview(ESCALATE)
async def preview_escalation(ctx: PreviewContext, inputs: EscalateInputs) -> Preview:
    """What case.escalate would do; read-only (the platform is not asked)."""
    record = ctx.record
    if record.status in CLOSED_STATUSES:
        return Preview.rejected("RECORD_CLOSED", CLOSED_MESSAGE)
    queue = inputs.target_queue or DEFAULT_QUEUE
    warnings = [
        "the summary leaves the mesh: it is sent to the external support platform"
        + ("" if record.sensitivity == "normal" else f" (the case is {record.sensitivity})"),
        "not reversible once acknowledged: a cancel withdraws the escalation only until the "
        "support team acknowledges it",
    ]
    if inputs.severity == "critical":
        warnings.append("severity critical: the support platform treats it as most urgent")
    return Preview.of(
        digest=case_digest(record),
        changes=[Change("escalation_queue", None, queue)],
        effect=(
            f"opens an escalation in queue {queue} of the support desk for {record.type} "
            f"{record.id} (severity {inputs.severity}), then waits for the support team to "
            "acknowledge it"
        ),
        warnings=warnings,
    )


async def _open(
    ctx: ActionContext, inputs: EscalateInputs, client: SupportDeskClient
) -> Opened | Result:
    """Open the escalation, retrying with the same Idempotency-Key (the platform never
    opens two for one key) while the platform does not answer, for ``open_retry_s``."""
    config = client.config
    deadline = time.monotonic() + config.open_retry_s
    maybe_created: OutcomeUnknown | None = None
    retrying = False
    while True:
        try:
            return await client.open_escalation(
                _payload(ctx, inputs),
                idempotency_key=ctx.idempotency_key,
                timeout_s=config.request_timeout_s,
            )
        except NothingCreated as refused:
            if not refused.retryable:
                return _nothing_created(ctx, refused)
            wait_s = refused.retry_after_s or config.retry_interval_s
            ctx.logger.warning("support platform unavailable: %s", refused.message)
            last = refused.message
        except OutcomeUnknown as unknown:
            if unknown.reason != "DOWNSTREAM_OUTCOME_UNKNOWN":
                return await _outcome_unknown(ctx, inputs, unknown)  # retrying cannot help
            maybe_created = unknown
            wait_s = config.retry_interval_s
            last = unknown.message
        if time.monotonic() + wait_s > deadline:
            if maybe_created is not None:
                return await _outcome_unknown(ctx, inputs, maybe_created)
            return Result.rejected(
                "DOWNSTREAM_UNAVAILABLE",
                f"The support platform did not answer for {config.open_retry_s:g} s "
                f"({last[:300]}); nothing was escalated. Escalate again later.",
            )
        if not retrying:
            retrying = True
            ctx.report_progress(message=RETRYING)
        await asyncio.sleep(wait_s)


def _nothing_created(ctx: ActionContext, refused: NothingCreated) -> Result:
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


def _waiting(escalation_id: str) -> str:
    return (
        f"ticket {escalation_id} opened at the support desk; waiting for the support team "
        "to acknowledge"
    )


async def _opened(ctx: ActionContext, inputs: EscalateInputs, opened: Opened) -> Result | None:
    """Log the opened escalation; None when logged, else the PARTIAL answer."""
    try:
        await _log(
            ctx, inputs, state="opened", external_ref=opened.escalation_id, queue=opened.queue
        )
    except Exception:
        ctx.logger.exception("escalation %s opened but not logged", opened.escalation_id)
        return Result.partial(
            reason="ESCALATION_LOG_FAILED",
            external_ref=opened.escalation_id,
            changes=_changes(opened.escalation_id, opened.queue),
            message=(
                f"The support platform opened escalation {opened.escalation_id}, but the "
                "provider could not record it in its own log. The escalation exists; do not "
                "escalate again. Ask the provider's owners to reconcile its log."
            ),
        )
    ctx.logger.info(
        "escalation %s %s", opened.escalation_id, "replayed" if opened.replayed else "opened"
    )
    return None


async def _wait_for_acknowledgement(
    ctx: ActionContext, client: SupportDeskClient, escalation_id: str
) -> Held:
    """Ask the platform every ``acknowledge_poll_s`` until the escalation is acknowledged
    (or withdrawn there); bounded by the task's life (the SDK and the gateway stop it)."""
    reported = _waiting(escalation_id)
    while True:
        try:
            held = await client.find_escalation(
                ctx.tenant, ctx.idempotency_key, timeout_s=client.config.request_timeout_s
            )
        except LookupFailed as failed:
            ctx.logger.warning("support platform did not answer: %s", failed.message)
            held, message = None, RETRYING
        else:
            message = _waiting(escalation_id)
        if held is not None and (held.acknowledged or held.withdrawn):
            return held
        if message != reported:
            reported = message
            ctx.report_progress(message=message)
        await asyncio.sleep(client.config.acknowledge_poll_s)


def acknowledged_result(held: Held) -> Result:
    """The answer for an acknowledged escalation: what the handler returns and what
    GetExecutionStatus settles with, the same from both."""
    at = "" if held.acknowledged_at is None else held.acknowledged_at.isoformat()
    by = held.acknowledged_by or "the support team"
    return Result.succeeded(
        external_ref=held.escalation_id,
        changes=[
            *_changes(held.escalation_id, held.queue),
            Change("escalation_acknowledged_by", None, by),
            Change("escalation_acknowledged_at", None, at),
        ],
        message=(
            f"Escalated as {held.escalation_id} to queue {held.queue}; acknowledged by {by}"
            f"{' at ' + at if at else ''}."
        ),
    )


def _withdrawn_at_platform(held: Held) -> Result:
    """Withdrawn at the platform without this provider asking (someone there did)."""
    return Result.partial(
        reason="ESCALATION_WITHDRAWN",
        external_ref=held.escalation_id,
        changes=_changes(held.escalation_id, held.queue),
        message=(
            f"The support platform opened escalation {held.escalation_id}, but it was "
            "withdrawn there before anyone acknowledged it. Check the platform before "
            "escalating again."
        ),
    )


async def _withdraw(ctx: ActionContext, client: SupportDeskClient) -> Result:
    """A caller cancelled: withdraw the escalation at the platform, if it opened one."""
    stop = ctx.stop_request
    assert stop is not None
    why = f"cancelled at {stop.requested_by}'s request: {stop.reason}"
    timeout_s = client.config.request_timeout_s
    try:
        held = await client.find_escalation(ctx.tenant, ctx.idempotency_key, timeout_s=timeout_s)
        if held is not None and not held.withdrawn and not held.acknowledged:
            held = await client.withdraw_escalation(
                held.escalation_id, reason=why, timeout_s=timeout_s
            )
    except LookupFailed as failed:
        ctx.logger.warning("could not withdraw the escalation: %s", failed.message)
        return Result.partial(
            reason="WITHDRAW_FAILED",
            message=(
                f"{why}. The support platform did not answer ({failed.message[:300]}): the "
                "escalation may still be open there under this idempotency key; withdraw it "
                "by hand."
            ),
        )
    if held is None:
        return Result.cancelled(message=f"{why}. Nothing was escalated.")
    if held.acknowledged:
        # Too late to stop: the support team has it.
        await _log_state(ctx, "acknowledged", held)
        return acknowledged_result(held)
    await _log_state(ctx, "withdrawn", held)
    return Result.cancelled(
        external_ref=held.escalation_id,
        changes=[Change("escalation", held.escalation_id, "withdrawn")],
        message=f"{why}. Escalation {held.escalation_id} was withdrawn at the support platform.",
    )


async def _log(
    ctx: ActionContext,
    inputs: EscalateInputs,
    *,
    state: State,
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


async def _log_state(ctx: ActionContext, state: State, held: Held) -> None:
    """Best effort: the platform is the system of record of the escalation's state."""
    try:
        await asyncio.to_thread(current_log().set_state, ctx.tenant, ctx.idempotency_key, state)
    except Exception:
        ctx.logger.exception("could not log escalation %s as %s", held.escalation_id, state)


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
        return _held_status(held)
    if stored.state is ExecutionState.NEVER_RECEIVED:
        return None
    return _not_held(stored, client.config.outcome_settle_s)


def _held_status(held: Held) -> ExecutionStatus:
    """The platform holds an escalation under the key: its state is the answer."""
    if held.acknowledged:
        return ExecutionStatus.finished(
            acknowledged_result(held), finished_at=held.acknowledged_at or held.created_at
        )
    if held.withdrawn:
        return ExecutionStatus.finished(_withdrawn_at_platform(held), finished_at=None)
    return ExecutionStatus.running(message=_waiting(held.escalation_id), updated_at=held.created_at)


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
