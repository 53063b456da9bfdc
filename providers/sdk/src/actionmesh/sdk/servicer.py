"""ActionProviderService over a :class:`Provider`: Describe, Discover, Execute, ResolveRecord."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
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
)
from actionmesh.rpc.errors import Unavailable as UnavailableError
from actionmesh.rpc.identifiers import RECORD_ID, TENANT
from actionmesh.rpc.outcomes import outcome_for_status
from actionmesh.rpc.telemetry import current_trace_ids
from actionmesh.sdk.dedupe import IdempotencyKey, IdempotencyStore, KeyedLocks
from actionmesh.sdk.provider import ActionDefinition, Provider
from actionmesh.sdk.types import (
    ActionContext,
    OperatorView,
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
            return await self._run_handler(action, inputs, **call)
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
                response = await self._run_handler(action, inputs, **call)
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
