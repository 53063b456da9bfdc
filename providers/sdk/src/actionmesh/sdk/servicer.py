"""ActionProviderService over a :class:`Provider`: Describe, Discover, Execute, ResolveRecord,
GetExecutionStatus.

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
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unimplemented,
)
from actionmesh.rpc.errors import Unavailable as UnavailableError
from actionmesh.rpc.identifiers import RECORD_ID, TENANT
from actionmesh.rpc.outcomes import outcome_for_status
from actionmesh.rpc.telemetry import current_trace_ids
from actionmesh.sdk.dedupe import IdempotencyKey, IdempotencyStore, KeyedLocks, KeyStatus
from actionmesh.sdk.provider import ActionDefinition, Provider
from actionmesh.sdk.types import (
    ActionContext,
    ExecutionState,
    ExecutionStatus,
    OperatorView,
    Progress,
    RecordView,
    Result,
    Unavailable,
)
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc

log = logging.getLogger("actionmesh.sdk")
tracer = trace.get_tracer("actionmesh.sdk")

MAX_IDEMPOTENCY_KEY_CHARS = 256
# A handler is not cancelled when its caller gives up (see ActionContext), but a
# hung one must not hold its idempotency key forever.
HARD_LIMIT_FACTOR = 4.0
DEFAULT_HARD_LIMIT_S = 300.0


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

    def __init__(self, provider: Provider, store: IdempotencyStore | None = None) -> None:
        self.provider = provider
        self.store = store
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
            stored = (
                ExecutionStatus.never_received()
                if lookup is None
                else self._status_of(key, await lookup(key))
            )
            answer = stored if function is None else await self._ask(function, key, stored)
            span.set_attribute("actionmesh.execution_state", answer.state.name)
            return answer.to_proto()

    def _check_status_request(self, request: provider_pb2.GetExecutionStatusRequest) -> None:
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

        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        key = IdempotencyKey(record.tenant, action.action_id, request.idempotency_key)
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
        request: provider_pb2.ExecuteRequest,
        record: RecordView,
        operator: OperatorView,
    ) -> None:
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
        if not request.idempotency_key:
            violations.append(FieldViolation("idempotency_key", "is required"))
        elif len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
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
            missing_key = not request.idempotency_key
            raise InvalidArgument(
                "the execute request is incomplete",
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
                raise InvalidArgument(
                    "this idempotency key was already used for a different request",
                    reason="IDEMPOTENCY_KEY_REUSED",
                    violations=[
                        FieldViolation("idempotency_key", "was already used for another request")
                    ],
                )
            if claim.status != "claimed":
                raise UnavailableError(
                    "an execution with this idempotency key is in progress; nothing ran",
                    reason="EXECUTION_IN_PROGRESS",
                    retry_after_s=1.0,
                )
            try:
                response = await self._run_handler(action, inputs, key=key, **call)
            except BaseException:
                await asyncio.shield(store.release(key, owner))
                raise
            await store.complete(key, owner, response.SerializeToString())
            return response

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
                self._progress[key] = progress

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
            )
            hard_limit = (
                DEFAULT_HARD_LIMIT_S
                if action.timeout_s is None
                else action.timeout_s * HARD_LIMIT_FACTOR
            )
            try:
                async with asyncio.timeout(hard_limit):
                    result = await action.handler(ctx, inputs)
                if not isinstance(result, Result):
                    raise TypeError(f"handler returned {type(result).__name__}, expected a Result")
            except ActionMeshError as refused:
                # Deliberate statuses (e.g. Unavailable: downstream unreachable,
                # nothing ran) go to the caller as raised.
                span.set_attribute("actionmesh.outcome", outcome_for_status(refused.code))
                raise
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
        pending = set(self._inflight)
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        for task in still:
            log.warning("cancelling execution %s at shutdown", task.get_name())
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=1.0)
