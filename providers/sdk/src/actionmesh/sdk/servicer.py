"""ActionProviderService over a :class:`Provider`: Describe, Discover, Execute, ResolveRecord,
GetExecutionStatus, StopExecution, Preview.

Preview answers from the action's ``@provider.preview`` function (UNIMPLEMENTED
``PREVIEW_NOT_SUPPORTED`` for an action without one), after the same checks as Execute
(record type, tenants, inputs; no idempotency key): a :class:`Preview`, or
FAILED_PRECONDITION with its reason when it says Execute would refuse. An Execute with
``preview_digest`` (what was approved was a preview) asks the preview function again
under the key's claim, before the handler runs, and answers REJECTED
``STATE_CHANGED_SINCE_PREVIEW`` (stored under the key like any result; nothing ran)
when the digest differs or the preview would now refuse; an action without a preview
answers REJECTED ``PREVIEW_NOT_VERIFIABLE``; a preview function that fails then is
UNAVAILABLE ``PREVIEW_FAILED`` (nothing ran; the key is released for a retry). A
repeated key answers the stored result without asking again (the state has moved
because the execution itself ran).

GetExecutionStatus answers from the idempotency store (``dedupe``), through the
provider's ``@provider.execution_status`` function when it declares one:

- a stored result: FINISHED with it;
- a claim younger than the store's ``stale_claim_s``: RUNNING (with the handler's
  last ``ctx.report_progress`` when it runs in this process, else since when);
- nothing, a released claim (the handler raised: an error status went back and
  nothing was kept) or a *stale* claim: NEVER_RECEIVED. A stale claim is one whose
  process stopped before answering (a crash): the store gives the key to the next
  Execute, which runs the handler again (handlers re-check their own state), so the
  status says what that Execute would do. Answering RUNNING would have the caller
  wait for a process that is gone; there is no result to answer FINISHED with.

Without a store (``dedupe=False``) and without a status function it is UNIMPLEMENTED:
the provider keeps no record of its executions.

Long-running actions (``@provider.action(..., long_running=LongRunning(...))``):

- Execute claims the key as for any action, starts the handler as a background task
  owned by this servicer (one per idempotency key) and answers ACCEPTED at once
  ("accepted; running", with the external ref the handler named so far through
  ``ctx.set_external_ref``). A same-key Execute while the task runs answers ACCEPTED
  again; once it finished, the stored final result. At most ``max_long_running``
  tasks run at once: past that, Execute is UNAVAILABLE (``TOO_MANY_LONG_RUNNING``,
  with a retry delay): nothing ran (RESOURCE_EXHAUSTED would read as PARTIAL in the
  outcome table).
- The task's end is stored as the key's result: the handler's Result; a deliberate
  ``ActionMeshError`` as the outcome ``outcome_for_status`` gives its code (reason
  and message kept); an unexpected exception PARTIAL ``HANDLER_FAILED`` (logged);
  still running a minute past ``max_duration_s``: cancelled, PARTIAL
  ``MAX_DURATION_EXCEEDED``.
- GetExecutionStatus asks the tasks of this process first: a task running here is
  RUNNING with its last ``ctx.report_progress`` (else "accepted; running" since it
  started), whatever the age of its claim in the store; then the store as above.
- StopExecution (cancellable actions only, else FAILED_PRECONDITION
  ``NOT_CANCELLABLE``; UNIMPLEMENTED when no action is): a task running here is
  cancelled (``ctx.stop_request`` says who asked and why; the handler sees
  ``asyncio.CancelledError`` at its next await and may return
  ``Result.cancelled(...)``; if the error propagates, CANCELLED "cancelled at
  <requested_by>'s request: <reason>" is stored) and the answer is RUNNING; a stored
  result is FINISHED; nothing under the key NEVER_RECEIVED. A claim of another
  process (or of one that crashed) cannot be stopped from here: UNAVAILABLE
  ``EXECUTION_NOT_HERE`` (ask again; once that claim is stale it is NEVER_RECEIVED).
  Asking twice is asking once.
- Shutdown: draining waits ``drain_timeout_s`` for short executions and
  long-running tasks alike; a long-running task still running then is cancelled
  (``ctx.stop_request`` None: not a caller's cancel, do not undo the work) and,
  unless its handler returned a result of its own, stored PARTIAL
  ``PROVIDER_STOPPED`` ("the provider stopped while the action ran; it may have
  acted partly"), so the gateway learns a final answer instead of a claim nobody
  will finish. A provider whose external system knows better (the escalation
  provider's support desk) settles that answer in its ``@provider.execution_status``.
  Long-running claims are not refreshed: replicas sharing one store must keep
  ``dedupe_stale_claim_s`` above ``max_duration_s``, or another replica may take an
  old claim over.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace

from actionmesh.rpc.errors import (
    ActionMeshError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unimplemented,
)
from actionmesh.rpc.errors import FailedPrecondition as PreviewRefused
from actionmesh.rpc.errors import Unavailable as UnavailableError
from actionmesh.rpc.identifiers import RECORD_ID, TENANT
from actionmesh.rpc.outcomes import Outcome, outcome_for_status
from actionmesh.rpc.telemetry import current_trace_ids
from actionmesh.sdk.dedupe import IdempotencyKey, IdempotencyStore, KeyedLocks, KeyStatus
from actionmesh.sdk.provider import ActionDefinition, Provider
from actionmesh.sdk.types import (
    ActionContext,
    ExecutionState,
    ExecutionStatus,
    OperatorView,
    PreviewContext,
    Progress,
    RecordView,
    Result,
    StopRequest,
    Unavailable,
)
from actionmesh.sdk.types import Preview as DryRun
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc

log = logging.getLogger("actionmesh.sdk")
tracer = trace.get_tracer("actionmesh.sdk")

MAX_IDEMPOTENCY_KEY_CHARS = 256
# A handler is not cancelled when its caller gives up (see ActionContext), but a
# hung one must not hold its idempotency key forever.
HARD_LIMIT_FACTOR = 4.0
DEFAULT_HARD_LIMIT_S = 300.0
# How long a long-running handler may run on past its max_duration_s before the SDK
# cancels it (the gateway asks it to stop at max_duration_s).
LONG_RUNNING_GRACE_S = 60.0
DEFAULT_MAX_LONG_RUNNING = 256
ACCEPTED_MESSAGE = "accepted; running"
STOPPED_MESSAGE = "the provider stopped while the action ran; it may have acted partly"
# A preview reads; it is bounded like a short action without a timeout of its own.
DEFAULT_PREVIEW_TIMEOUT_S = 30.0
STATE_CHANGED = "STATE_CHANGED_SINCE_PREVIEW"


class _LongRun:
    """One long-running execution whose handler runs as a task of this process."""

    def __init__(self, fingerprint: str, started_at: datetime) -> None:
        self.fingerprint = fingerprint
        self.started_at = started_at
        self.task: asyncio.Task[None] | None = None
        self.external_ref = ""
        self.progress: Progress | None = None
        self.stop: StopRequest | None = None
        # Set while the provider shuts down: the cancel is not a caller's.
        self.shutdown = False
        # Whether the handler runs (a stop cancels it only then, never the storing).
        self.in_handler = False
        # The final answer once the handler ended (kept until it is stored).
        self.final: provider_pb2.ExecuteResponse | None = None
        self.finished_at: datetime | None = None

    def accepted(self) -> provider_pb2.ExecuteResponse:
        return provider_pb2.ExecuteResponse(
            outcome=common_pb2.OUTCOME_ACCEPTED,
            message=ACCEPTED_MESSAGE,
            external_ref=self.external_ref,
        )

    def status(self) -> ExecutionStatus:
        # While the answer is being stored: still RUNNING (the store answers once stored).
        if self.final is not None:
            return ExecutionStatus.finished(
                Result.from_proto(self.final), finished_at=self.finished_at
            )
        if self.progress is not None:
            return ExecutionStatus(ExecutionState.RUNNING, progress=self.progress)
        return ExecutionStatus.running(message=ACCEPTED_MESSAGE, updated_at=self.started_at)


class HandlerFailed(ActionMeshError):
    """A handler raised or misbehaved; INTERNAL, details only in the provider's logs."""


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _fingerprint(record: RecordView, inputs: dict[str, Any]) -> str:
    """What must match for a repeated idempotency key to mean "the same request"."""
    payload = json.dumps(
        {"type": record.type, "id": record.id, "inputs": inputs},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class ActionProviderServicer(provider_pb2_grpc.ActionProviderServiceServicer):
    """Translates the provider protocol onto a Provider's declarations."""

    def __init__(
        self,
        provider: Provider,
        store: IdempotencyStore | None = None,
        *,
        max_long_running: int = DEFAULT_MAX_LONG_RUNNING,
    ) -> None:
        self.provider = provider
        self.store = store
        self.max_long_running = max_long_running
        # Long-running executions whose handler runs (or just ended) in this process.
        self._long: dict[IdempotencyKey, _LongRun] = {}
        self._locks = KeyedLocks()
        self._inflight: set[asyncio.Task[provider_pb2.ExecuteResponse]] = set()
        # The last progress each execution running in this process reported.
        self._progress: dict[IdempotencyKey, Progress] = {}
        self._draining = False
        self._describe = provider_pb2.DescribeResponse(
            provider_id=provider.id,
            version=provider.version,
            actions=[a.descriptor() for a in provider.actions.values()],
            record_sources=sorted(provider.record_sources),
        )
        self._actions = provider.actions
        self._sources = provider.record_sources

    # -- Describe / Discover ------------------------------------------------

    async def Describe(
        self, request: provider_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.DescribeResponse:
        return self._describe

    async def Discover(
        self, request: provider_pb2.DiscoverRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.DiscoverResponse:
        record = RecordView.from_proto(request.record)
        if request.operator.tenant and record.tenant and request.operator.tenant != record.tenant:
            raise PermissionDenied(
                "the record belongs to another tenant than the operator", reason="TENANT_MISMATCH"
            )
        found = []
        for action in self._actions.values():
            if record.type not in action.record_types:
                continue
            available, reason = self._availability(action, record)
            found.append(
                provider_pb2.DiscoveredAction(
                    action_id=action.action_id, available=available, unavailable_reason=reason
                )
            )
        return provider_pb2.DiscoverResponse(actions=found)

    async def ResolveRecord(
        self, request: provider_pb2.ResolveRecordRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.ResolveRecordResponse:
        """The facts of one record, from the resolver of its type (NOT_FOUND when unknown)."""
        record = request.record
        resolver = self._sources.get(record.type)
        if resolver is None:
            raise NotFound(
                f"provider {self.provider.id} is not the source of {record.type!r} records",
                reason="RECORD_TYPE_NOT_SOURCED",
            )
        problems = []
        if not TENANT.valid(request.tenant):
            problems.append(FieldViolation("tenant", f"must match {TENANT.pattern}"))
        if not RECORD_ID.valid(record.id):
            problems.append(FieldViolation("record.id", f"must match {RECORD_ID.pattern}"))
        if problems:
            raise InvalidArgument(
                "invalid record reference", reason="INVALID_REQUEST", violations=problems
            )
        with tracer.start_as_current_span(
            "provider.resolve_record", attributes={"actionmesh.record.type": record.type}
        ):
            facts = await resolver(request.tenant, record.id)
        if facts is None:
            raise NotFound("no such record for this tenant", reason="RECORD_NOT_FOUND")
        return provider_pb2.ResolveRecordResponse(
            record=facts.to_proto(request.tenant, record.type, record.id)
        )

    # -- Preview ----------------------------------------------------------------

    async def Preview(
        self, request: provider_pb2.PreviewRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.PreviewResponse:
        """What Execute of the same request would change; read-only (module docstring)."""
        action = self._actions.get(request.action_id)
        if action is None:
            raise NotFound("this provider has no such action", reason="UNKNOWN_ACTION")
        if action.preview is None:
            raise Unimplemented(
                f"{action.action_id} has no preview", reason="PREVIEW_NOT_SUPPORTED"
            )
        record = RecordView.from_proto(request.record)
        operator = OperatorView.from_proto(request.operator)
        self._check_request(action, None, record, operator)
        inputs, _ = action.inputs.build(request.inputs)
        preview = await self._preview(action, record, operator, inputs)
        if preview.refused:
            raise PreviewRefused(
                preview.message or f"{action.action_id} would be refused: {preview.reason}",
                reason=preview.reason,
            )
        return preview.to_proto()

    async def _preview(
        self, action: ActionDefinition, record: RecordView, operator: OperatorView, inputs: Any
    ) -> DryRun:
        """The action's preview function's answer (HandlerFailed when it misbehaves)."""
        assert action.preview is not None
        attributes = {
            "actionmesh.provider_id": self.provider.id,
            "actionmesh.action_id": action.action_id,
            "actionmesh.tenant": record.tenant,
            "actionmesh.record.type": record.type,
        }
        with tracer.start_as_current_span("action.preview", attributes=attributes) as span:
            ctx = PreviewContext(
                action_id=action.action_id,
                operator=operator,
                tenant=record.tenant,
                record=record,
                logger=logging.LoggerAdapter(
                    logging.getLogger(f"providers.{self.provider.id}"),
                    {"action_id": action.action_id},
                ),
            )
            try:
                async with asyncio.timeout(action.timeout_s or DEFAULT_PREVIEW_TIMEOUT_S):
                    answer: object = await action.preview(ctx, inputs)
            except ActionMeshError:
                raise  # deliberate, e.g. NotFound or Unavailable
            except Exception as exc:
                log.exception("preview of %s failed", action.action_id)
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                raise HandlerFailed(
                    "the preview function failed; see the provider's logs", reason="PREVIEW_FAILED"
                ) from exc
            if not isinstance(answer, DryRun):
                log.error(
                    "preview of %s returned %s; expected a Preview",
                    action.action_id,
                    type(answer).__name__,
                )
                raise HandlerFailed(
                    "the preview function failed; see the provider's logs", reason="PREVIEW_FAILED"
                )
            span.set_attribute("actionmesh.preview.digest", answer.digest)
            return answer

    async def _stale_preview(
        self,
        action: ActionDefinition,
        inputs: Any,
        *,
        request: provider_pb2.ExecuteRequest,
        record: RecordView,
        operator: OperatorView,
        **_: Any,
    ) -> provider_pb2.ExecuteResponse | None:
        """The refusal of an Execute approved on a preview whose state moved, else None."""
        if not request.preview_digest:
            return None
        if action.preview is None:
            return Result.rejected(
                "PREVIEW_NOT_VERIFIABLE",
                f"{action.action_id} was approved on a preview, but this provider has no "
                "preview for it to check the state against; nothing ran",
            ).to_proto()
        try:
            now = await self._preview(action, record, operator, inputs)
        except HandlerFailed as failed:
            # Cannot tell now; nothing ran. Not INTERNAL: a caller reads that as PARTIAL
            # (it may have acted), and the handler never started.
            raise UnavailableError(
                "the preview could not be computed again to check the approved state; "
                "nothing ran, retry later",
                reason=failed.reason or "PREVIEW_FAILED",
                retry_after_s=1.0,
            ) from failed
        except ActionMeshError as refused:
            if refused.code is grpc.StatusCode.UNAVAILABLE:
                raise  # cannot tell now; nothing ran
            return Result.rejected(
                STATE_CHANGED, f"the state changed since the preview: {refused}"[:2000]
            ).to_proto()
        if now.refused:
            return Result.rejected(
                STATE_CHANGED,
                f"the state changed since the preview; now: {now.message or now.reason}"[:2000],
            ).to_proto()
        if now.digest != request.preview_digest:
            log.info(
                "%s on %s/%s: state changed since the preview (%s, now %s); refused",
                action.action_id,
                record.type,
                record.id,
                request.preview_digest,
                now.digest,
            )
            return Result.rejected(
                STATE_CHANGED,
                "the state changed since the preview that was approved; nothing ran. "
                "Preview and request it again.",
            ).to_proto()
        return None

    # -- GetExecutionStatus ---------------------------------------------------

    async def GetExecutionStatus(
        self, request: provider_pb2.GetExecutionStatusRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.GetExecutionStatusResponse:
        """What became of the execution of (tenant, action, idempotency key); read-only."""
        self._check_status_request(request)
        key = IdempotencyKey(request.tenant, request.action_id, request.idempotency_key)
        function = self.provider.status_function
        lookup = getattr(self.store, "lookup", None)
        if function is None and lookup is None:
            raise Unimplemented(
                f"provider {self.provider.id} keeps no record of its executions (no dedupe "
                "store and no status function), so it cannot tell what became of one",
                reason="EXECUTION_STATUS_NOT_KEPT",
            )
        attributes = {
            "actionmesh.provider_id": self.provider.id,
            "actionmesh.action_id": request.action_id,
            "actionmesh.tenant": request.tenant,
            "actionmesh.execution_id": request.request_id,
        }
        with tracer.start_as_current_span(
            "provider.execution_status", attributes=attributes
        ) as span:
            answer = await self._status(key)
            span.set_attribute("actionmesh.execution_state", answer.state.name)
            return answer.to_proto()

    async def _status(self, key: IdempotencyKey) -> ExecutionStatus:
        """The answer of GetExecutionStatus (see the module docstring)."""
        function = self.provider.status_function
        lookup = getattr(self.store, "lookup", None)
        run = self._long.get(key)
        if run is not None:
            stored = run.status()
        elif lookup is None:
            stored = ExecutionStatus.never_received()
        else:
            stored = self._status_of(key, await lookup(key))
        return stored if function is None else await self._ask(function, key, stored)

    def _check_status_request(
        self,
        request: provider_pb2.GetExecutionStatusRequest | provider_pb2.StopExecutionRequest,
    ) -> None:
        problems = []
        if not TENANT.valid(request.tenant):
            problems.append(FieldViolation("tenant", f"must match {TENANT.pattern}"))
        if not request.idempotency_key:
            problems.append(FieldViolation("idempotency_key", "is required"))
        elif len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            problems.append(
                FieldViolation(
                    "idempotency_key", f"must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
                )
            )
        if problems:
            raise InvalidArgument(
                "invalid execution status request", reason="INVALID_REQUEST", violations=problems
            )
        if request.action_id not in self._actions:
            # Like Execute: a provider cannot vouch for what it never declared.
            raise NotFound("this provider has no such action", reason="UNKNOWN_ACTION")

    def _status_of(self, key: IdempotencyKey, held: KeyStatus) -> ExecutionStatus:
        """The status the store's entry means (see the module docstring)."""
        if held.status == "done" and held.response is not None:
            finished_at = held.completed_at
            return ExecutionStatus.finished(
                Result.from_proto(provider_pb2.ExecuteResponse.FromString(held.response)),
                finished_at=None if finished_at is None else _utc(finished_at),
            )
        if held.status == "running":
            reported = self._progress.get(key)
            if reported is not None:
                return ExecutionStatus(ExecutionState.RUNNING, progress=reported)
            since = None if held.claimed_at is None else _utc(held.claimed_at)
            return ExecutionStatus.running(
                message="running; no progress reported", updated_at=since
            )
        # absent, released or abandoned: the next Execute with the key runs the handler.
        return ExecutionStatus.never_received()

    async def _ask(
        self,
        function: Any,
        key: IdempotencyKey,
        stored: ExecutionStatus,
    ) -> ExecutionStatus:
        """The provider's status function's answer (None: the stored status stands)."""
        args: tuple[Any, ...] = (key.tenant, key.action_id, key.key)
        if self.provider.status_takes_stored:
            args += (stored,)
        try:
            answer: object = await function(*args)
        except ActionMeshError:
            raise  # deliberate, e.g. Unavailable: the system it asks did not answer
        except Exception as exc:
            log.exception("execution status function of %s failed", self.provider.id)
            raise HandlerFailed(
                "the execution status function failed; see the provider's logs",
                reason="STATUS_FUNCTION_FAILED",
            ) from exc
        if answer is None:
            return stored
        if not isinstance(answer, ExecutionStatus):
            log.error(
                "execution status function of %s returned %s; expected an ExecutionStatus or None",
                self.provider.id,
                type(answer).__name__,
            )
            raise HandlerFailed(
                "the execution status function failed; see the provider's logs",
                reason="STATUS_FUNCTION_FAILED",
            )
        return answer

    # -- StopExecution --------------------------------------------------------

    async def StopExecution(
        self, request: provider_pb2.StopExecutionRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.StopExecutionResponse:
        """Ask a running long-running execution to stop; idempotent (see the module docstring)."""
        if not any(a.cancellable for a in self._actions.values()):
            raise Unimplemented(
                f"provider {self.provider.id} declares no cancellable action",
                reason="STOP_NOT_SUPPORTED",
            )
        self._check_status_request(request)
        action = self._actions[request.action_id]
        if not action.cancellable:
            raise FailedPrecondition(
                f"{action.action_id} is not a cancellable long-running action",
                reason="NOT_CANCELLABLE",
            )
        key = IdempotencyKey(request.tenant, request.action_id, request.idempotency_key)
        attributes = {
            "actionmesh.provider_id": self.provider.id,
            "actionmesh.action_id": request.action_id,
            "actionmesh.tenant": request.tenant,
            "actionmesh.execution_id": request.request_id,
        }
        with tracer.start_as_current_span("provider.stop_execution", attributes=attributes) as span:
            state = await self._stop(key, request)
            span.set_attribute("actionmesh.execution_state", state.name)
            return provider_pb2.StopExecutionResponse(state=state.value)

    async def _stop(
        self, key: IdempotencyKey, request: provider_pb2.StopExecutionRequest
    ) -> ExecutionState:
        run = self._long.get(key)
        if run is not None and run.task is not None and run.final is None:
            if run.stop is None and run.in_handler:
                run.stop = StopRequest(
                    requested_by=request.requested_by or "an unnamed caller",
                    reason=request.reason or "no reason given",
                )
                log.info(
                    "%s: stopping the execution of key %s at %s's request",
                    key.action_id,
                    key.key,
                    run.stop.requested_by,
                )
                run.task.cancel()
            return ExecutionState.RUNNING
        status = await self._status(key)
        if status.state is ExecutionState.RUNNING:
            raise UnavailableError(
                "the execution does not run in this provider process (another replica holds "
                "it, or a process that stopped did); ask again later",
                reason="EXECUTION_NOT_HERE",
                retry_after_s=1.0,
            )
        return status.state

    @staticmethod
    def _availability(action: ActionDefinition, record: RecordView) -> tuple[bool, str]:
        if action.available is None:
            return True, ""
        try:
            verdict: object = action.available(record)
        except Exception:
            log.exception(
                "availability predicate of %s failed for %s/%s",
                action.action_id,
                record.type,
                record.id,
            )
            return False, "PREDICATE_FAILED"
        if verdict is True:
            return True, ""
        if verdict is False:
            return False, "NOT_AVAILABLE"
        if isinstance(verdict, Unavailable):
            return False, verdict.reason
        log.error(
            "availability predicate of %s returned %s; expected True, False or Unavailable",
            action.action_id,
            type(verdict).__name__,
        )
        return False, "PREDICATE_FAILED"

    # -- Execute ------------------------------------------------------------

    async def Execute(
        self, request: provider_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.ExecuteResponse:
        action = self._actions.get(request.action_id)
        if action is None:
            raise NotFound("this provider has no such action", reason="UNKNOWN_ACTION")
        if self._draining:
            raise UnavailableError(
                "the provider is shutting down; nothing ran",
                reason="PROVIDER_STOPPING",
                retry_after_s=1.0,
            )
        record = RecordView.from_proto(request.record)
        operator = OperatorView.from_proto(request.operator)
        self._check_request(action, request, record, operator)
        inputs, plain = action.inputs.build(request.inputs)

        key = IdempotencyKey(record.tenant, action.action_id, request.idempotency_key)
        if action.long_running is not None:
            return await self._accept(
                action,
                key,
                _fingerprint(record, plain),
                inputs,
                request=request,
                record=record,
                operator=operator,
            )
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        task = asyncio.create_task(
            self._run_once(
                action,
                key,
                _fingerprint(record, plain),
                inputs,
                request=request,
                record=record,
                operator=operator,
                deadline=deadline,
            ),
            name=f"execute-{action.action_id}-{request.request_id}",
        )
        self._inflight.add(task)
        task.add_done_callback(self._forget)
        # Shielded: if the caller gives up, the handler still finishes and (with
        # dedupe) its result is stored for the retry with the same key.
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[provider_pb2.ExecuteResponse]) -> None:
        self._inflight.discard(task)
        # Retrieve the outcome so a task whose caller left is not reported as
        # "exception never retrieved"; the handler failure itself is logged already.
        if not task.cancelled():
            task.exception()

    @staticmethod
    def _check_request(
        action: ActionDefinition,
        request: provider_pb2.ExecuteRequest | None,
        record: RecordView,
        operator: OperatorView,
    ) -> None:
        """Execute's checks of the request (Preview's, without an idempotency key: None)."""
        if record.type not in action.record_types:
            raise InvalidArgument(
                f"{action.action_id} does not apply to this record type",
                reason="RECORD_TYPE_NOT_SUPPORTED",
                violations=[
                    FieldViolation(
                        "record.type", "must be one of: " + ", ".join(action.record_types)
                    )
                ],
            )
        violations = []
        key = None if request is None else request.idempotency_key
        if key == "":
            violations.append(FieldViolation("idempotency_key", "is required"))
        elif key is not None and len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
            violations.append(
                FieldViolation(
                    "idempotency_key", f"must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
                )
            )
        if not record.tenant:
            violations.append(FieldViolation("record.tenant", "is required"))
        if not record.id:
            violations.append(FieldViolation("record.id", "is required"))
        if not operator.tenant:
            violations.append(FieldViolation("operator.tenant", "is required"))
        if violations:
            missing_key = key == ""
            raise InvalidArgument(
                "the request is incomplete",
                reason="MISSING_IDEMPOTENCY_KEY" if missing_key else "INVALID_REQUEST",
                violations=violations,
            )
        if operator.tenant != record.tenant:
            raise PermissionDenied(
                "the record belongs to another tenant than the operator", reason="TENANT_MISMATCH"
            )

    async def _run_once(
        self,
        action: ActionDefinition,
        key: IdempotencyKey,
        fingerprint: str,
        inputs: Any,
        **call: Any,
    ) -> provider_pb2.ExecuteResponse:
        if self.store is None:
            stale = await self._stale_preview(action, inputs, **call)
            if stale is not None:
                return stale
            return await self._run_handler(action, inputs, key=key, **call)
        store = self.store
        owner = uuid.uuid4().hex
        async with self._locks.hold(key):
            claim = await store.claim(key, fingerprint, owner)
            if claim.status == "done" and claim.response is not None:
                log.info(
                    "%s: idempotency key seen before; returning the stored result", action.action_id
                )
                return provider_pb2.ExecuteResponse.FromString(claim.response)
            if claim.status == "conflict":
                raise _key_reused()
            if claim.status != "claimed":
                raise UnavailableError(
                    "an execution with this idempotency key is in progress; nothing ran",
                    reason="EXECUTION_IN_PROGRESS",
                    retry_after_s=1.0,
                )
            try:
                stale = await self._stale_preview(action, inputs, **call)
                if stale is not None:
                    response = stale
                else:
                    response = await self._run_handler(action, inputs, key=key, **call)
            except BaseException:
                await asyncio.shield(store.release(key, owner))
                raise
            await store.complete(key, owner, response.SerializeToString())
            return response

    # -- Long-running executions ----------------------------------------------

    async def _accept(
        self,
        action: ActionDefinition,
        key: IdempotencyKey,
        fingerprint: str,
        inputs: Any,
        *,
        request: provider_pb2.ExecuteRequest,
        record: RecordView,
        operator: OperatorView,
    ) -> provider_pb2.ExecuteResponse:
        """Start the handler in the background and answer ACCEPTED (or the stored answer)."""
        async with self._locks.hold(key):
            run = self._long.get(key)
            if run is not None:
                if run.fingerprint != fingerprint:
                    raise _key_reused()
                if run.final is not None:
                    return run.final
                return run.accepted()
            if len(self._long) >= self.max_long_running:
                # UNAVAILABLE, not RESOURCE_EXHAUSTED: the outcome table reads the latter as
                # PARTIAL (it may have acted), and nothing ran here.
                raise UnavailableError(
                    f"provider {self.provider.id} runs {len(self._long)} long-running "
                    "executions already; nothing ran, retry later",
                    reason="TOO_MANY_LONG_RUNNING",
                    retry_after_s=5.0,
                )
            owner = uuid.uuid4().hex
            if self.store is not None:
                claim = await self.store.claim(key, fingerprint, owner)
                if claim.status == "done" and claim.response is not None:
                    return provider_pb2.ExecuteResponse.FromString(claim.response)
                if claim.status == "conflict":
                    raise _key_reused()
                if claim.status != "claimed":
                    raise UnavailableError(
                        "an execution with this idempotency key is in progress; nothing ran",
                        reason="EXECUTION_IN_PROGRESS",
                        retry_after_s=1.0,
                    )
            try:
                stale = await self._stale_preview(
                    action, inputs, request=request, record=record, operator=operator
                )
            except BaseException:
                if self.store is not None:
                    await asyncio.shield(self.store.release(key, owner))
                raise
            if stale is not None:
                # Final at once (nothing ran): stored like any result under the key.
                if self.store is not None:
                    await asyncio.shield(self.store.complete(key, owner, stale.SerializeToString()))
                return stale
            run = _LongRun(fingerprint, datetime.now(UTC))
            self._long[key] = run
            run.task = asyncio.create_task(
                self._run_long(action, key, owner, run, inputs, request, record, operator),
                name=f"long-running-{action.action_id}-{request.request_id}",
            )
            run.task.add_done_callback(_retrieve)
            log.info("%s: accepted key %s; running in the background", action.action_id, key.key)
            return run.accepted()

    async def _run_long(
        self,
        action: ActionDefinition,
        key: IdempotencyKey,
        owner: str,
        run: _LongRun,
        inputs: Any,
        request: provider_pb2.ExecuteRequest,
        record: RecordView,
        operator: OperatorView,
    ) -> None:
        """The task of one long-running execution: run the handler, store its end."""
        assert action.long_running is not None
        limit = action.long_running.max_duration_s + LONG_RUNNING_GRACE_S
        run.in_handler = True
        try:
            try:
                response = await self._run_handler(
                    action,
                    inputs,
                    key=key,
                    request=request,
                    record=record,
                    operator=operator,
                    deadline=time.monotonic() + action.long_running.max_duration_s,
                    hard_limit_s=limit,
                    run=run,
                )
                if response.outcome == common_pb2.OUTCOME_CANCELLED and run.stop is None:
                    if run.shutdown:
                        response = _stopped(response)
                    else:
                        log.error(
                            "handler of %s returned CANCELLED although nobody asked it to stop",
                            action.action_id,
                        )
                        response = _handler_failed()
            except asyncio.CancelledError:
                run.in_handler = False
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                response = self._cancelled_answer(run)
            except TimeoutError:
                log.error("handler of %s ran past its max_duration_s; cancelled", action.action_id)
                response = Result.partial(
                    reason="MAX_DURATION_EXCEEDED",
                    message="the action ran past its maximum duration and was cancelled; "
                    "it may have acted partly",
                    external_ref=run.external_ref,
                ).to_proto()
            except HandlerFailed:
                response = _handler_failed(run.external_ref)
            except ActionMeshError as refused:
                outcome = outcome_for_status(refused.code)
                if outcome not in (Outcome.REJECTED, Outcome.PARTIAL):
                    # e.g. UNAVAILABLE: a long-running execution has no caller to retry
                    # it; what it reached is not known to be nothing.
                    outcome = Outcome.PARTIAL
                response = provider_pb2.ExecuteResponse(
                    outcome=outcome.to_proto(),
                    reason=refused.reason or refused.code.name,
                    message=str(refused)[:2000],
                    external_ref=run.external_ref,
                )
            finally:
                run.in_handler = False
            if self.store is not None:
                # Shielded: a cancel at shutdown must not lose the answer.
                await asyncio.shield(self.store.complete(key, owner, response.SerializeToString()))
            # No await from here to the entry's removal: the answer is read from the store
            # (one finished_at), never from memory.
            run.final = response
            run.finished_at = datetime.now(UTC)
        except BaseException:
            log.exception("could not store the end of %s (key %s)", action.action_id, key.key)
            raise
        finally:
            if self._long.get(key) is run:
                del self._long[key]

    def _cancelled_answer(self, run: _LongRun) -> provider_pb2.ExecuteResponse:
        if run.stop is not None:
            return Result.cancelled(
                message=f"cancelled at {run.stop.requested_by}'s request: {run.stop.reason}"[:2000],
                external_ref=run.external_ref,
            ).to_proto()
        return Result.partial(
            reason="PROVIDER_STOPPED", message=STOPPED_MESSAGE, external_ref=run.external_ref
        ).to_proto()

    async def _run_handler(
        self,
        action: ActionDefinition,
        inputs: Any,
        *,
        key: IdempotencyKey,
        request: provider_pb2.ExecuteRequest,
        record: RecordView,
        operator: OperatorView,
        deadline: float | None,
        hard_limit_s: float | None = None,
        run: _LongRun | None = None,
    ) -> provider_pb2.ExecuteResponse:
        # The gateway's execution id travels as request_id.
        attributes = {
            "actionmesh.provider_id": self.provider.id,
            "actionmesh.action_id": action.action_id,
            "actionmesh.tenant": record.tenant,
            "actionmesh.execution_id": request.request_id,
            "actionmesh.record.type": record.type,
        }
        running = True

        def report(progress: Progress) -> None:
            # A report after the handler returned (from a task it left behind) is dropped.
            if running:
                if run is not None:
                    run.progress = progress
                else:
                    self._progress[key] = progress

        def name_ref(external_ref: str) -> None:
            if running and run is not None:
                run.external_ref = external_ref

        with tracer.start_as_current_span("action.handle", attributes=attributes) as span:
            trace_id, _ = current_trace_ids()
            logger = logging.LoggerAdapter(
                logging.getLogger(f"providers.{self.provider.id}"),
                {"action_id": action.action_id, "request_id": request.request_id},
            )
            ctx = ActionContext(
                action_id=action.action_id,
                operator=operator,
                tenant=record.tenant,
                record=record,
                idempotency_key=request.idempotency_key,
                request_id=request.request_id,
                deadline=deadline,
                logger=logger,
                span=span,
                trace_id=trace_id,
                on_progress=report,
                on_external_ref=name_ref,
                stop_requested=None if run is None else (lambda: run.stop),
                preview_digest=request.preview_digest,
            )
            if hard_limit_s is not None:
                hard_limit = hard_limit_s
            elif action.timeout_s is None:
                hard_limit = DEFAULT_HARD_LIMIT_S
            else:
                hard_limit = action.timeout_s * HARD_LIMIT_FACTOR
            limit = asyncio.timeout(hard_limit)
            try:
                async with limit:
                    result = await action.handler(ctx, inputs)
                if not isinstance(result, Result):
                    raise TypeError(f"handler returned {type(result).__name__}, expected a Result")
                if result.outcome == common_pb2.OUTCOME_CANCELLED and run is None:
                    raise TypeError("only a long-running action asked to stop returns CANCELLED")
            except ActionMeshError as refused:
                # Deliberate statuses (e.g. Unavailable: downstream unreachable,
                # nothing ran) go to the caller as raised.
                span.set_attribute("actionmesh.outcome", outcome_for_status(refused.code))
                raise
            except TimeoutError as exc:
                if run is not None and limit.expired():
                    raise  # past a long-running action's maximum duration: _run_long says so
                log.exception("handler of %s failed (timed out)", action.action_id)
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                raise HandlerFailed(
                    "the action handler failed; see the provider's logs", reason="HANDLER_FAILED"
                ) from None
            except Exception as exc:
                log.exception(
                    "handler of %s failed (request %s, trace %s)",
                    action.action_id,
                    request.request_id,
                    trace_id,
                )
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR)
                raise HandlerFailed(
                    "the action handler failed; see the provider's logs", reason="HANDLER_FAILED"
                ) from exc
            finally:
                running = False
                self._progress.pop(key, None)
            span.set_attribute(
                "actionmesh.outcome",
                common_pb2.Outcome.Name(result.outcome).removeprefix("OUTCOME_"),
            )
            if result.reason:
                span.set_attribute("actionmesh.reason", result.reason)
            return result.to_proto()

    # -- Shutdown -----------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Refuse new executions, wait for running ones, cancel what is left."""
        self._draining = True
        long_tasks: dict[asyncio.Task[Any], _LongRun] = {
            run.task: run for run in self._long.values() if run.task is not None
        }
        pending: set[asyncio.Task[Any]] = set(self._inflight) | set(long_tasks)
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        for task in still:
            log.warning("cancelling execution %s at shutdown", task.get_name())
            run = long_tasks.get(task)
            if run is not None and run.stop is None:
                run.shutdown = True
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=1.0)


def _key_reused() -> InvalidArgument:
    return InvalidArgument(
        "this idempotency key was already used for a different request",
        reason="IDEMPOTENCY_KEY_REUSED",
        violations=[FieldViolation("idempotency_key", "was already used for another request")],
    )


def _handler_failed(external_ref: str = "") -> provider_pb2.ExecuteResponse:
    return Result.partial(
        reason="HANDLER_FAILED",
        message="the action handler failed; see the provider's logs. It may have acted partly.",
        external_ref=external_ref,
    ).to_proto()


def _stopped(response: provider_pb2.ExecuteResponse) -> provider_pb2.ExecuteResponse:
    """A handler's CANCELLED at shutdown (nobody asked it to stop): PROVIDER_STOPPED."""
    stopped = provider_pb2.ExecuteResponse()
    stopped.CopyFrom(response)
    stopped.outcome = common_pb2.OUTCOME_PARTIAL
    stopped.reason = "PROVIDER_STOPPED"
    stopped.message = STOPPED_MESSAGE
    return stopped


def _retrieve(task: asyncio.Task[None]) -> None:
    # A long-running task has no caller: retrieve its end (already logged) so it is not
    # reported as "exception never retrieved".
    if not task.cancelled():
        task.exception()
