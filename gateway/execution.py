"""ExecuteAction: validate, authorize again, dispatch once, record the outcome.

Every attempt leaves audit evidence: refusals (invalid input, tenant, policy,
unknown action, unhealthy provider) as one EXECUTION_FINISHED event, dispatched
executions as EXECUTION_STARTED then EXECUTION_FINISHED, written in the same
transaction as the execution row they describe.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc
import grpc.aio
from opentelemetry import trace

from actionmesh.rpc.convert import input_value_to_python, utcnow
from actionmesh.rpc.errors import (
    ActionMeshError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    error_details,
)
from actionmesh.rpc.telemetry import current_trace_ids
from actionmesh.schema import validate_inputs
from actionmesh.v1 import audit_pb2, common_pb2, provider_pb2
from gateway.auth import Caller
from gateway.directory import ProviderDirectory, ProviderEntry
from gateway.events import audit_event
from gateway.policy import ActionSubject, Operation, PolicyEngine
from gateway.requests import execute_violations
from gateway.storage import RUNNING, ExecutionRecord, GatewayStore, KeyConflict
from gateway.tenancy import require_same_tenant

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")

PROVIDER_OUTCOMES = {
    common_pb2.OUTCOME_SUCCEEDED,
    common_pb2.OUTCOME_REJECTED,
    common_pb2.OUTCOME_PARTIAL,
}
UNAVAILABLE_RETRY_S = 1.0
STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED


@dataclass(frozen=True)
class ExecuteCommand:
    """A caller's ExecuteAction request, already decoded from proto."""

    action_id: str
    record: common_pb2.RecordContext
    has_record: bool
    inputs: Mapping[str, common_pb2.InputValue]
    idempotency_key: str


@dataclass(frozen=True)
class ProviderAnswer:
    outcome: str
    reason: str = ""
    message: str = ""
    external_ref: str = ""
    changes: Sequence[tuple[str, str, str]] = ()
    warnings: Sequence[str] = ()


class Executor:
    def __init__(
        self,
        *,
        store: GatewayStore,
        directory: ProviderDirectory,
        policy: PolicyEngine,
        on_audit_written: Callable[[], None],
        default_timeout_s: float,
        max_timeout_s: float,
    ) -> None:
        self._store = store
        self._directory = directory
        self._policy = policy
        self._on_audit_written = on_audit_written
        self._default_timeout_s = default_timeout_s
        self._max_timeout_s = max_timeout_s

    async def execute(self, caller: Caller, command: ExecuteCommand) -> ExecutionRecord:
        span = trace.get_current_span()
        span.set_attribute("actionmesh.action_id", command.action_id)
        span.set_attribute("actionmesh.tenant", caller.tenant)
        attempt_id = uuid.uuid4().hex
        problems = execute_violations(
            command.action_id, command.record, command.has_record, command.idempotency_key
        )
        if problems:
            # A malformed record cannot be filed on any timeline; refuse without evidence.
            if any(p.field.startswith("record") for p in problems):
                raise InvalidArgument(
                    "invalid request", reason="INVALID_REQUEST", violations=problems
                )
            await self._refuse(
                caller,
                command,
                attempt_id,
                InvalidArgument("invalid request", reason="INVALID_REQUEST", violations=problems),
            )
        try:
            require_same_tenant(caller, command.record)
        except PermissionDenied as denied:
            await self._refuse(caller, command, attempt_id, denied)
        found = self._directory.find_action(command.action_id)
        if found is None:
            await self._refuse(
                caller,
                command,
                attempt_id,
                NotFound(
                    f"no provider offers action {command.action_id!r}", reason="UNKNOWN_ACTION"
                ),
            )
        entry, descriptor = found
        span.set_attribute("actionmesh.provider", entry.provider_id)
        if command.record.type not in descriptor.record_types:
            await self._refuse(
                caller,
                command,
                attempt_id,
                InvalidArgument(
                    f"action does not apply to record type {command.record.type!r}",
                    reason="RECORD_TYPE_NOT_SUPPORTED",
                ),
                provider_id=entry.provider_id,
            )
        try:
            validate_inputs(descriptor.inputs, command.inputs)
        except InvalidArgument as invalid:
            await self._refuse(caller, command, attempt_id, invalid, provider_id=entry.provider_id)
        decision = self._policy.authorize(
            Operation.EXECUTE,
            caller,
            command.record,
            [ActionSubject(command.action_id, entry.provider_id, descriptor)],
        )[0]
        if not decision.allowed:
            await self._refuse(
                caller,
                command,
                attempt_id,
                PermissionDenied("not permitted by policy", reason="POLICY_DENIED"),
                provider_id=entry.provider_id,
                policy_ids=decision.policy_ids,
            )
        if entry.not_serving:
            await self._refuse(
                caller,
                command,
                attempt_id,
                Unavailable(
                    f"provider {entry.provider_id} is not healthy; nothing ran",
                    reason="PROVIDER_UNAVAILABLE",
                    retry_after_s=UNAVAILABLE_RETRY_S,
                ),
                provider_id=entry.provider_id,
                policy_ids=decision.policy_ids,
            )
        record = await self._claim(
            caller, command, attempt_id, entry, descriptor, decision.policy_ids
        )
        if record.finished:
            return record
        answer = await self._dispatch(caller, command, record, entry, descriptor)
        return await self._finish(caller, command, record, answer)

    async def _claim(
        self,
        caller: Caller,
        command: ExecuteCommand,
        execution_id: str,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
        policy_ids: Sequence[str],
    ) -> ExecutionRecord:
        """Create the execution row, or return the one this idempotency key already made."""
        trace_id, _ = current_trace_ids()
        record = ExecutionRecord(
            execution_id=execution_id,
            tenant=caller.tenant,
            idempotency_key=command.idempotency_key,
            request_hash=request_hash(caller, command),
            action_id=command.action_id,
            provider_id=entry.provider_id,
            record_type=command.record.type,
            record_id=command.record.id,
            actor=caller.subject,
            outcome=RUNNING,
            started_at=utcnow(),
            trace_id=trace_id,
        )
        pending = descriptor.requires_approval
        if pending:
            record.outcome = "PENDING_APPROVAL"
            record.reason = "APPROVAL_REQUIRED"
            record.message = "the action needs a second person's approval; nothing ran yet"
        started = self._event(
            FINISHED if pending else STARTED,
            caller,
            command,
            record,
            policy_ids=policy_ids,
            outcome=common_pb2.OUTCOME_PENDING_APPROVAL
            if pending
            else common_pb2.OUTCOME_UNSPECIFIED,
        )
        try:
            await asyncio.to_thread(self._store.insert_execution, record, [started])
        except KeyConflict as conflict:
            return await self._existing(record, conflict.existing, command)
        self._on_audit_written()
        return record

    async def _existing(
        self, mine: ExecutionRecord, existing: ExecutionRecord, command: ExecuteCommand
    ) -> ExecutionRecord:
        if existing.request_hash != mine.request_hash:
            raise AlreadyExists(
                "this idempotency key was used for a different request",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"execution_id": existing.execution_id},
            )
        deadline = asyncio.get_running_loop().time() + self._max_timeout_s
        while not existing.finished and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            fresh = await asyncio.to_thread(
                self._store.find_by_key, existing.tenant, command.idempotency_key
            )
            existing = fresh or existing
        if existing.outcome == "UNAVAILABLE" and await asyncio.to_thread(
            self._store.reclaim_unavailable, existing.execution_id
        ):
            # Nothing ran the first time, so the same key may dispatch again.
            existing.outcome = RUNNING
            return existing
        if not existing.finished:
            raise FailedPrecondition(
                "an execution with this idempotency key is still running",
                reason="EXECUTION_IN_PROGRESS",
                metadata={"execution_id": existing.execution_id},
            )
        return existing

    async def _dispatch(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
    ) -> ProviderAnswer:
        timeout_s = min(
            (descriptor.timeout_ms / 1000.0) or self._default_timeout_s, self._max_timeout_s
        )
        request = provider_pb2.ExecuteRequest(
            action_id=command.action_id,
            record=command.record,
            operator=common_pb2.Operator(
                subject=caller.subject, tenant=caller.tenant, roles=caller.roles
            ),
            inputs=dict(command.inputs),
            idempotency_key=command.idempotency_key,
            request_id=record.execution_id,
        )
        try:
            reply = await self._directory.stub(entry).Execute(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return answer_for_error(exc)
        if reply.outcome not in PROVIDER_OUTCOMES:
            return ProviderAnswer(
                "PARTIAL",
                reason="PROVIDER_PROTOCOL_ERROR",
                message="the provider answered with an outcome it may not report; check its state",
            )
        return ProviderAnswer(
            outcome=common_pb2.Outcome.Name(reply.outcome).removeprefix("OUTCOME_"),
            reason=reply.reason,
            message=reply.message,
            external_ref=reply.external_ref,
            changes=[(c.field, c.before, c.after) for c in reply.changes],
            warnings=list(reply.warnings),
        )

    async def _finish(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        answer: ProviderAnswer,
    ) -> ExecutionRecord:
        record.outcome = answer.outcome
        record.reason = answer.reason
        record.message = answer.message
        record.external_ref = answer.external_ref
        record.changes = list(answer.changes)
        record.warnings = list(answer.warnings)
        record.finished_at = utcnow()
        trace.get_current_span().set_attribute("actionmesh.outcome", record.outcome)
        finished = self._event(
            FINISHED,
            caller,
            command,
            record,
            outcome=common_pb2.Outcome.Value(f"OUTCOME_{record.outcome}"),
        )
        await asyncio.to_thread(self._store.finish_execution, record, [finished])
        self._on_audit_written()
        if record.outcome == "UNAVAILABLE":
            raise Unavailable(
                record.message or "the provider could not be reached; nothing ran",
                reason="PROVIDER_UNAVAILABLE",
                retry_after_s=UNAVAILABLE_RETRY_S,
                metadata={"execution_id": record.execution_id},
            )
        return record

    async def _refuse(
        self,
        caller: Caller,
        command: ExecuteCommand,
        attempt_id: str,
        error: ActionMeshError,
        *,
        provider_id: str = "",
        policy_ids: Sequence[str] = (),
    ) -> NoReturn:
        """Record a refused attempt as evidence, then raise the refusal to the caller."""
        outcome = (
            common_pb2.OUTCOME_UNAVAILABLE
            if isinstance(error, Unavailable)
            else common_pb2.OUTCOME_DENIED
        )
        now = utcnow()
        event = audit_event(
            FINISHED,
            caller=caller,
            record=command.record,
            execution_id=attempt_id,
            action_id=command.action_id,
            provider_id=provider_id,
            outcome=outcome,
            reason=error.reason,
            message=error.message,
            idempotency_key=command.idempotency_key,
            inputs=command.inputs,
            policy_ids=policy_ids,
            started_at=now,
            finished_at=now,
        )
        trace.get_current_span().set_attribute(
            "actionmesh.outcome", common_pb2.Outcome.Name(outcome).removeprefix("OUTCOME_")
        )
        await asyncio.to_thread(self._store.record_attempt, [event])
        self._on_audit_written()
        raise error

    def _event(
        self,
        event_type: audit_pb2.AuditEventType.ValueType,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        *,
        outcome: common_pb2.Outcome.ValueType,
        policy_ids: Sequence[str] = (),
    ) -> audit_pb2.AuditEvent:
        return audit_event(
            event_type,
            caller=caller,
            record=command.record,
            execution_id=record.execution_id,
            action_id=record.action_id,
            provider_id=record.provider_id,
            outcome=outcome,
            reason=record.reason,
            message=record.message,
            idempotency_key=record.idempotency_key,
            inputs=command.inputs,
            policy_ids=policy_ids,
            started_at=record.started_at,
            finished_at=record.finished_at,
            external_ref=record.external_ref,
            changes=record.changes,
            warnings=record.warnings,
        )


def answer_for_error(exc: grpc.aio.AioRpcError) -> ProviderAnswer:
    """Map a failed provider call onto the outcome vocabulary."""
    code = exc.code()
    details = error_details(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ProviderAnswer(
            "UNAVAILABLE",
            reason="PROVIDER_UNAVAILABLE",
            message="the provider could not be reached; nothing ran",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProviderAnswer(
            "TIMED_OUT",
            reason="DEADLINE_EXCEEDED",
            message="the provider did not answer in time; it may or may not have acted",
        )
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        return ProviderAnswer(
            "REJECTED", reason=details.reason or code.name, message=details.message
        )
    return ProviderAnswer(
        "PARTIAL",
        reason="PROVIDER_ERROR",
        message="the provider failed while executing; its state is unknown, check before retrying",
    )


def request_hash(caller: Caller, command: ExecuteCommand) -> str:
    """Fingerprint of what an idempotency key stands for."""
    record = command.record
    canonical = {
        "action": command.action_id,
        "actor": caller.subject,
        "record": [record.tenant, record.type, record.id],
        "inputs": {k: input_value_to_python(v) for k, v in sorted(command.inputs.items())},
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
