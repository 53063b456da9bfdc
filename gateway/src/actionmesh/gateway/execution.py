"""ExecuteAction: validate, authorize again, dispatch once, record the outcome.

Every attempt leaves audit evidence: refusals (invalid input, tenant, policy,
unknown action, unhealthy provider) as one EXECUTION_FINISHED event, dispatched
executions as EXECUTION_STARTED then EXECUTION_FINISHED, written in the same
transaction as the execution row they describe. Actions that require approval
stop at APPROVAL_REQUESTED with their payload frozen (see gateway.approvals).

A dispatched execution runs in its own task: the caller gets TIMED_OUT at the
action's deadline, or goes away, but the gateway keeps listening for the
provider's answer (for ``late_result_grace_s``) and records it when it comes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
from opentelemetry import trace

from actionmesh.gateway.admission import Admission, Slot
from actionmesh.gateway.auth import Caller
from actionmesh.gateway.directory import ProviderDirectory, ProviderEntry
from actionmesh.gateway.events import audit_event
from actionmesh.gateway.metrics import record_execution
from actionmesh.gateway.model import (
    APPROVAL_PENDING,
    ORPHAN_MESSAGE,
    ORPHAN_OUTCOME,
    ORPHAN_REASON,
    PENDING_APPROVAL,
    RUNNING,
    ExecutionRecord,
)
from actionmesh.gateway.policy import (
    ActionSubject,
    Decision,
    Operation,
    PolicyEngine,
    decision_evidence,
    policy_context,
)
from actionmesh.gateway.redaction import Redactor, is_sensitive
from actionmesh.gateway.requests import execute_violations
from actionmesh.gateway.storage import (
    GatewayStore,
    InsertExecution,
    KeyConflict,
    OrphanRule,
    finish_execution_op,
    reclaim_unavailable_op,
    record_attempt_op,
    record_late_result_op,
    resolve_orphan_op,
)
from actionmesh.gateway.tenancy import require_same_tenant
from actionmesh.gateway.writer import GroupCommitWriter
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
from actionmesh.rpc.outcomes import PROVIDER_OUTCOMES, Outcome, outcome_for_status
from actionmesh.rpc.schema import validate_inputs
from actionmesh.rpc.telemetry import current_trace_ids
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, provider_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")

UNAVAILABLE_RETRY_S = 1.0
STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
LATE_RESULT = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_LATE_RESULT
APPROVAL_REQUESTED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REQUESTED
# Longest pause between looks at an execution another request (or replica) runs.
MAX_WAIT_POLL_S = 0.25
# How long past its dispatch deadline a RUNNING row waits for its runner's finish write
# before any replica may close it as orphaned (a live runner writes at the deadline).
ORPHAN_MARGIN_S = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class ExecuteCommand:
    """A caller's ExecuteAction request, already decoded from proto."""

    action_id: str
    record: common_pb2.RecordContext
    has_record: bool
    inputs: Mapping[str, common_pb2.InputValue]
    idempotency_key: str

    @property
    def sensitive(self) -> bool:
        return is_sensitive(self.record)

    def frozen(self) -> bytes:
        """The request exactly as authorized, kept with the execution."""
        return gateway_pb2.ExecuteActionRequest(
            action_id=self.action_id,
            record=self.record,
            inputs=dict(self.inputs),
            idempotency_key=self.idempotency_key,
        ).SerializeToString(deterministic=True)

    @classmethod
    def thaw(cls, payload: bytes) -> ExecuteCommand:
        request = gateway_pb2.ExecuteActionRequest.FromString(payload)
        return cls(
            action_id=request.action_id,
            record=request.record,
            has_record=request.HasField("record"),
            inputs=dict(request.inputs),
            idempotency_key=request.idempotency_key,
        )


@dataclass(frozen=True)
class Authorized:
    """An execute request that passed every platform check, with the evidence."""

    entry: ProviderEntry
    descriptor: common_pb2.ActionDescriptor
    decision: Decision
    evidence: list[audit_pb2.PolicyDecision] = field(default_factory=list)
    context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderAnswer:
    outcome: Outcome
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
        writer: GroupCommitWriter,
        directory: ProviderDirectory,
        policy: PolicyEngine,
        redactor: Redactor,
        on_audit_written: Callable[[], None],
        default_timeout_s: float,
        max_timeout_s: float,
        late_result_grace_s: float,
        approval_ttl_s: float,
        admission: Admission,
    ) -> None:
        self._admission = admission
        self._store = store
        self._writer = writer
        self._directory = directory
        self._policy = policy
        self._redactor = redactor
        self._on_audit_written = on_audit_written
        self._default_timeout_s = default_timeout_s
        self._max_timeout_s = max_timeout_s
        self._late_result_grace_s = late_result_grace_s
        self._approval_ttl_s = approval_ttl_s
        self._tasks: set[asyncio.Task[Any]] = set()
        # Executions this process is running, so same-key waiters here need not poll.
        self._running: dict[str, asyncio.Task[ExecutionRecord]] = {}
        self._orphans = OrphanRule(
            margin=timedelta(seconds=ORPHAN_MARGIN_S),
            # Rows without a deadline (before migration 0002): the longest run there can be.
            legacy_running=timedelta(seconds=max_timeout_s + late_result_grace_s),
        )

    @property
    def orphan_rule(self) -> OrphanRule:
        return self._orphans

    @property
    def store(self) -> GatewayStore:
        return self._store

    @property
    def writer(self) -> GroupCommitWriter:
        return self._writer

    @property
    def directory(self) -> ProviderDirectory:
        return self._directory

    @property
    def redactor(self) -> Redactor:
        return self._redactor

    def audit_written(self) -> None:
        self._on_audit_written()

    async def execute(self, caller: Caller, command: ExecuteCommand) -> ExecutionRecord:
        span = trace.get_current_span()
        span.set_attribute("actionmesh.action_id", command.action_id)
        span.set_attribute("actionmesh.tenant", caller.tenant)
        span.set_attribute("actionmesh.record.type", command.record.type)
        attempt_id = uuid.uuid4().hex
        authorized = await self._authorize(caller, command, attempt_id)
        # Before the claim: a refused call leaves no row, so the same key may come back.
        slot = self._admission.enter(caller.tenant, authorized.entry.provider_id)
        try:
            record = await self._claim(caller, command, attempt_id, authorized)
            if not record.finished:
                record = await self.run(
                    caller, command, record, authorized.entry, authorized.descriptor, slot=slot
                )
        finally:
            if not slot.handed_over:
                slot.release()
        span.set_attribute("actionmesh.execution_id", record.execution_id)
        span.set_attribute("actionmesh.outcome", record.outcome)
        if record.outcome == Outcome.UNAVAILABLE:
            raise Unavailable(
                record.message or "the provider could not be reached; nothing ran",
                reason=record.reason or "PROVIDER_UNAVAILABLE",
                retry_after_s=UNAVAILABLE_RETRY_S,
                metadata={"execution_id": record.execution_id},
            )
        return record

    async def _authorize(
        self, caller: Caller, command: ExecuteCommand, attempt_id: str
    ) -> Authorized:
        """Every platform check, in order; a refusal is audited, then raised."""
        problems = execute_violations(
            command.action_id,
            command.record,
            command.has_record,
            command.idempotency_key,
            command.inputs,
        )
        if problems:
            invalid = InvalidArgument(
                "invalid request", reason="INVALID_REQUEST", violations=problems
            )
            # A malformed record cannot be filed on any timeline; refuse without evidence.
            if any(p.field.startswith("record") for p in problems):
                raise invalid
            if any(p.field.startswith("inputs") for p in problems):
                # Inputs beyond the limits never become evidence; the attempt still does.
                command = replace(command, inputs={})
            await self._refuse(caller, command, attempt_id, invalid)
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
        trace.get_current_span().set_attribute("actionmesh.provider_id", entry.provider_id)
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
        authorized = self.authorize_execute(caller, command.record, entry, descriptor)
        if not authorized.decision.allowed:
            await self._refuse(
                caller,
                command,
                attempt_id,
                PermissionDenied("not permitted by policy", reason="POLICY_DENIED"),
                provider_id=entry.provider_id,
                authorized=authorized,
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
                authorized=authorized,
            )
        return authorized

    def authorize_execute(
        self,
        caller: Caller,
        record: common_pb2.RecordContext,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
    ) -> Authorized:
        """The execute decision for one action, with the evidence an audit event keeps."""
        subject = ActionSubject(descriptor.action_id, entry.provider_id, descriptor)
        decision = self._policy.authorize(Operation.EXECUTE, caller, record, [subject])[0]
        return Authorized(
            entry=entry,
            descriptor=descriptor,
            decision=decision,
            evidence=[decision_evidence(Operation.EXECUTE, subject, decision)],
            context=policy_context(caller, record),
        )

    async def _claim(
        self,
        caller: Caller,
        command: ExecuteCommand,
        execution_id: str,
        authorized: Authorized,
    ) -> ExecutionRecord:
        """Create the execution row, or return the one this idempotency key already made."""
        trace_id, _ = current_trace_ids()
        now = utcnow()
        record = ExecutionRecord(
            execution_id=execution_id,
            tenant=caller.tenant,
            idempotency_key=command.idempotency_key,
            request_hash=request_hash(caller, command),
            action_id=command.action_id,
            provider_id=authorized.entry.provider_id,
            record_type=command.record.type,
            record_id=command.record.id,
            actor=caller.subject,
            outcome=RUNNING,
            started_at=now,
            trace_id=trace_id,
            request_payload=command.frozen(),
            requester_roles=list(caller.roles),
            sensitive=command.sensitive,
            dispatch_deadline=self.dispatch_deadline(authorized.descriptor, now),
        )
        pending = authorized.descriptor.requires_approval
        if pending:
            record.dispatch_deadline = None
            record.outcome = PENDING_APPROVAL
            record.reason = "APPROVAL_REQUIRED"
            record.message = "the action needs a second person's approval; nothing ran yet"
            record.approval_state = APPROVAL_PENDING
            record.approval_expires_at = now + timedelta(seconds=self._approval_ttl_s)
        first = self.event(
            APPROVAL_REQUESTED if pending else STARTED,
            caller,
            command,
            record,
            outcome=common_pb2.OUTCOME_PENDING_APPROVAL
            if pending
            else common_pb2.OUTCOME_UNSPECIFIED,
            authorized=authorized,
        )
        try:
            await self._writer.write(InsertExecution(record, (first,)))
        except KeyConflict as conflict:
            return await self._existing(
                record, conflict.existing, command, self.timeout_for(authorized.descriptor)
            )
        self._on_audit_written()
        return record

    async def _existing(
        self,
        mine: ExecutionRecord,
        existing: ExecutionRecord,
        command: ExecuteCommand,
        timeout_s: float,
    ) -> ExecutionRecord:
        if existing.request_hash != mine.request_hash:
            raise AlreadyExists(
                "this idempotency key was used for a different request",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"execution_id": existing.execution_id},
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_timeout_s
        pause = 0.02
        # Elsewhere (or in a process that died), a RUNNING row ends by its dispatch deadline,
        # or is an orphan this request closes; the caller's own deadline cancels us earlier.
        while not existing.finished:
            local = self._running.get(existing.execution_id)
            if local is not None:
                if loop.time() >= deadline:
                    break
                # Run here: wait for it instead of polling (bounded). asyncio.wait neither
                # raises the task's error nor cancels it, and our own cancellation still works.
                await asyncio.wait({local}, timeout=max(0.0, deadline - loop.time()))
            else:
                left = (self._orphans.orphaned_at(existing) - utcnow()).total_seconds()
                if left <= 0:
                    resolved = await self.resolve_orphan(existing)
                    if resolved is not None:
                        existing = resolved
                        break
                await asyncio.sleep(min(pause, left) if left > 0 else pause)
                pause = min(pause * 2, MAX_WAIT_POLL_S)
            fresh = await asyncio.to_thread(
                self._store.find_by_key, existing.tenant, command.idempotency_key
            )
            existing = fresh or existing
        redispatch_by = utcnow() + timedelta(seconds=timeout_s)
        if existing.outcome == Outcome.UNAVAILABLE and await self._writer.write(
            reclaim_unavailable_op(existing.execution_id, redispatch_by)
        ):
            # Nothing ran the first time, so the same key may dispatch again.
            existing.outcome, existing.dispatch_deadline = RUNNING, redispatch_by
            return existing
        if not existing.finished:
            raise FailedPrecondition(
                "an execution with this idempotency key is still running",
                reason="EXECUTION_IN_PROGRESS",
                metadata={"execution_id": existing.execution_id},
            )
        return existing

    def timeout_for(self, descriptor: common_pb2.ActionDescriptor) -> float:
        return min((descriptor.timeout_ms / 1000.0) or self._default_timeout_s, self._max_timeout_s)

    def dispatch_deadline(
        self, descriptor: common_pb2.ActionDescriptor, start: datetime
    ) -> datetime:
        """When a dispatch starting at ``start`` has written its outcome, at the latest.

        The caller's answer (TIMED_OUT at worst) is due ``timeout_for`` after dispatch;
        the late-result grace only adds to a row that already left RUNNING.
        """
        return start + timedelta(seconds=self.timeout_for(descriptor))

    async def resolve_orphan(
        self, row: ExecutionRecord, now: datetime | None = None
    ) -> ExecutionRecord | None:
        """Close a RUNNING execution whose runner is gone, as TIMED_OUT with its event.

        A compare-and-set: None when the row is not (or no longer) an orphan, e.g.
        another replica closed it first. Never for a row this process is running.
        """
        if row.execution_id in self._running:
            return None
        now = now or utcnow()
        resolved = replace(row, finished_at=now)
        resolved.outcome, resolved.reason, resolved.message = (
            ORPHAN_OUTCOME,
            ORPHAN_REASON,
            ORPHAN_MESSAGE,
        )
        requester = Caller(subject=row.actor, tenant=row.tenant, roles=tuple(row.requester_roles))
        finished = self.event(
            FINISHED,
            requester,
            ExecuteCommand.thaw(row.request_payload),
            resolved,
            outcome=common_pb2.OUTCOME_TIMED_OUT,
        )
        if not await self._writer.write(
            resolve_orphan_op(row.execution_id, self._orphans, now, [finished])
        ):
            return None
        self._on_audit_written()
        record_execution(row.action_id, row.provider_id, ORPHAN_OUTCOME)
        log.warning(
            "execution %s (%s on %s) lost its gateway mid-dispatch; closed as %s",
            row.execution_id,
            row.action_id,
            row.provider_id,
            ORPHAN_REASON,
        )
        return resolved

    async def run(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
        slot: Slot | None = None,
    ) -> ExecutionRecord:
        """Dispatch a RUNNING execution and record its outcome, even if the caller leaves.

        The admission ``slot`` is held until the dispatch ends, not until the caller does.
        """
        task = self.spawn(
            self._dispatch_and_finish(caller, command, record, entry, descriptor, slot)
        )
        self._running[record.execution_id] = task
        task.add_done_callback(lambda _: self._running.pop(record.execution_id, None))
        if slot is not None:
            slot.handed_over = True
            task.add_done_callback(lambda _: slot.release())
        return await asyncio.shield(task)

    async def _dispatch_and_finish(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
        slot: Slot | None = None,
    ) -> ExecutionRecord:
        # Measured from dispatch, so an approval's wait does not count as latency.
        started = time.monotonic()
        with tracer.start_as_current_span(
            "execute.dispatch",
            attributes={
                "actionmesh.action_id": command.action_id,
                "actionmesh.provider_id": entry.provider_id,
                "actionmesh.tenant": caller.tenant,
                "actionmesh.execution_id": record.execution_id,
                "actionmesh.record.type": command.record.type,
            },
        ):
            record = await self._dispatch_then_finish(
                caller, command, record, entry, descriptor, slot
            )
        record_execution(
            record.action_id, record.provider_id, record.outcome, time.monotonic() - started
        )
        return record

    async def _dispatch_then_finish(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
        slot: Slot | None = None,
    ) -> ExecutionRecord:
        timeout_s = self.timeout_for(descriptor)
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
        if self._late_result_grace_s <= 0:
            answer = await self._call_provider(entry, request, timeout_s)
            return await self._finish(caller, command, record, answer)
        # The provider may keep working past the deadline the caller is given;
        # its gRPC deadline covers the grace window so a late answer can arrive.
        call = asyncio.ensure_future(
            self._call_provider(entry, request, timeout_s + self._late_result_grace_s)
        )
        try:
            answer = await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except TimeoutError:
            answer = TIMED_OUT_ANSWER
            if slot is not None:
                slot.outlive(call)
            self.spawn(self._record_late(caller, command, record, call))
        return await self._finish(caller, command, record, answer)

    async def _call_provider(
        self, entry: ProviderEntry, request: provider_pb2.ExecuteRequest, timeout_s: float
    ) -> ProviderAnswer:
        try:
            reply = await self._directory.stub(entry).Execute(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return answer_for_error(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this dispatch itself is being cancelled (the gateway is stopping)
            # grpc cancels the calls on a channel that closes under them: the request
            # was sent, so the provider may have acted.
            return CONNECTION_LOST_ANSWER
        outcome = Outcome.from_proto(reply.outcome)
        if outcome not in PROVIDER_OUTCOMES:
            return ProviderAnswer(
                Outcome.PARTIAL,
                reason="PROVIDER_PROTOCOL_ERROR",
                message="the provider answered with an outcome it may not report; check its state",
            )
        return ProviderAnswer(
            outcome=outcome,
            reason=reply.reason,
            message=reply.message,
            external_ref=reply.external_ref,
            changes=[(c.field, c.before, c.after) for c in reply.changes],
            warnings=list(reply.warnings),
        )

    def _scrubbed(self, command: ExecuteCommand, answer: ProviderAnswer) -> ProviderAnswer:
        """A sensitive record's provider texts, without the input values they echo."""
        if not command.sensitive:
            return answer

        def scrub(text: str) -> str:
            return Redactor.scrub(text, command.inputs, True)

        return ProviderAnswer(
            outcome=answer.outcome,
            reason=scrub(answer.reason),
            message=scrub(answer.message),
            external_ref=answer.external_ref,
            changes=answer.changes,
            warnings=[scrub(w) for w in answer.warnings],
        )

    async def _finish(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        answer: ProviderAnswer,
    ) -> ExecutionRecord:
        answer = self._scrubbed(command, answer)
        record.outcome = answer.outcome
        record.reason = answer.reason
        record.message = answer.message
        record.external_ref = answer.external_ref
        record.changes = list(answer.changes)
        record.warnings = list(answer.warnings)
        record.finished_at = utcnow()
        trace.get_current_span().set_attribute("actionmesh.outcome", record.outcome)
        finished = self.event(
            FINISHED,
            caller,
            command,
            record,
            outcome=Outcome.proto_of(record.outcome),
        )
        if not await self._writer.write(finish_execution_op(record, [finished])):
            return await self._finished_as_orphan(caller, command, record, answer)
        self._on_audit_written()
        return record

    async def _finished_as_orphan(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        answer: ProviderAnswer,
    ) -> ExecutionRecord:
        """This runner finished so late that a replica closed its row as orphaned.

        That outcome stands (callers may have seen it); a provider answer is kept on it
        as a late result, so what the provider did is not lost.
        """
        log.warning(
            "execution %s finished after it was closed as orphaned; keeping %s as a late result",
            record.execution_id,
            answer.outcome,
        )
        if answer.outcome in PROVIDER_OUTCOMES:
            await self._attach_late(caller, command, replace(record), answer)
        stored = await asyncio.to_thread(self._store.get, record.tenant, record.execution_id)
        return stored or record

    async def _record_late(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        call: asyncio.Future[ProviderAnswer],
    ) -> None:
        """Attach the provider's answer to a TIMED_OUT execution once it arrives."""
        await self._attach_late(caller, command, record, await call)

    async def _attach_late(
        self,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        answer: ProviderAnswer,
    ) -> None:
        """Keep a provider's answer on an execution already closed as TIMED_OUT."""
        if answer.outcome not in PROVIDER_OUTCOMES:
            log.warning(
                "execution %s: no late answer from %s (%s); its outcome stays unknown",
                record.execution_id,
                record.provider_id,
                answer.reason,
            )
            return
        answer = self._scrubbed(command, answer)
        record.late_outcome = answer.outcome
        record.late_result_at = utcnow()
        record.external_ref = answer.external_ref
        record.changes = list(answer.changes)
        record.warnings = list(answer.warnings)
        event = self.event(
            LATE_RESULT,
            caller,
            command,
            record,
            outcome=answer.outcome.to_proto(),
            reason=answer.reason,
            message=answer.message or "the provider answered after the deadline",
        )
        if await self._writer.write(record_late_result_op(record, [event])):
            self._on_audit_written()
            log.info("execution %s: late result %s recorded", record.execution_id, answer.outcome)

    async def _refuse(
        self,
        caller: Caller,
        command: ExecuteCommand,
        attempt_id: str,
        error: ActionMeshError,
        *,
        provider_id: str = "",
        authorized: Authorized | None = None,
    ) -> NoReturn:
        """Record a refused attempt as evidence, then raise the refusal to the caller."""
        outcome = Outcome.UNAVAILABLE if isinstance(error, Unavailable) else Outcome.DENIED
        now = utcnow()
        sensitive = command.sensitive
        event = audit_event(
            FINISHED,
            caller=caller,
            record=command.record,
            execution_id=attempt_id,
            action_id=command.action_id,
            provider_id=provider_id,
            outcome=outcome.to_proto(),
            reason=error.reason,
            message=error.message,
            idempotency_key=command.idempotency_key,
            inputs=self._redactor.evidence(command.inputs, sensitive),
            inputs_redacted=sensitive,
            policy_ids=authorized.decision.policy_ids if authorized else (),
            policy_decisions=authorized.evidence if authorized else (),
            policy_context=authorized.context if authorized else None,
            started_at=now,
            finished_at=now,
        )
        trace.get_current_span().set_attribute("actionmesh.outcome", outcome.value)
        record_execution(command.action_id, provider_id, outcome.value)
        await self._writer.write(record_attempt_op([event]))
        self._on_audit_written()
        raise error

    def event(
        self,
        event_type: audit_pb2.AuditEventType.ValueType,
        caller: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        *,
        outcome: common_pb2.Outcome.ValueType,
        authorized: Authorized | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> audit_pb2.AuditEvent:
        """An event about one execution, with its inputs redacted when the record is sensitive."""
        sensitive = record.sensitive or command.sensitive
        return audit_event(
            event_type,
            caller=caller,
            record=command.record,
            execution_id=record.execution_id,
            action_id=record.action_id,
            provider_id=record.provider_id,
            outcome=outcome,
            reason=record.reason if reason is None else reason,
            message=record.message if message is None else message,
            idempotency_key=record.idempotency_key,
            inputs=self._redactor.evidence(command.inputs, sensitive),
            inputs_redacted=sensitive,
            policy_ids=authorized.decision.policy_ids if authorized else (),
            policy_decisions=authorized.evidence if authorized else (),
            policy_context=authorized.context if authorized else None,
            started_at=record.started_at,
            finished_at=record.finished_at,
            external_ref=record.external_ref,
            changes=record.changes,
            warnings=record.warnings,
        )

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run work the caller must not be able to cancel; kept until it ends."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background execution work failed", exc_info=task.exception())

    async def close(self, grace_s: float = 5.0) -> None:
        """Let executions (and late answers) finish for a while, then cancel the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)


CONNECTION_LOST_ANSWER = ProviderAnswer(
    Outcome.TIMED_OUT,
    reason="PROVIDER_CONNECTION_LOST",
    message=(
        "the connection to the provider broke while it was working on the request; it may or "
        "may not have acted. Retry only with the same idempotency key"
    ),
)
TIMED_OUT_ANSWER = ProviderAnswer(
    Outcome.TIMED_OUT,
    reason="DEADLINE_EXCEEDED",
    message=(
        "the provider did not answer in time; it may or may not have acted. Retry only with the "
        "same idempotency key; a late answer is recorded on the execution"
    ),
)


def answer_for_error(exc: grpc.aio.AioRpcError) -> ProviderAnswer:
    """Map a failed provider call onto the outcome vocabulary."""
    code = exc.code()
    details = error_details(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        if details.reason:
            # The provider answered: its own downstream is down (nothing ran).
            return ProviderAnswer(
                Outcome.UNAVAILABLE, reason=details.reason, message=details.message
            )
        if never_connected(exc):
            return ProviderAnswer(
                Outcome.UNAVAILABLE,
                reason="PROVIDER_UNAVAILABLE",
                message="the provider could not be reached; nothing ran",
            )
        # The connection broke after the request went out (the provider died or was cut
        # off mid-call): it may have acted, so this is not the retry-safe "nothing ran".
        return CONNECTION_LOST_ANSWER
    outcome = outcome_for_status(code)
    if outcome is Outcome.TIMED_OUT:
        return ProviderAnswer(
            outcome,
            reason="DEADLINE_EXCEEDED",
            message="the provider did not answer in time; it may or may not have acted",
        )
    if outcome is Outcome.REJECTED:
        return ProviderAnswer(outcome, reason=details.reason or code.name, message=details.message)
    return ProviderAnswer(
        Outcome.PARTIAL,
        reason="PROVIDER_ERROR",
        message="the provider failed while executing; its state is unknown, check before retrying",
    )


# How grpc words a call that failed before any connection carried it (C-core status
# messages; "failed to connect to all addresses" is the pick-first/round-robin text).
_NEVER_CONNECTED = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "no route to host",
    "name resolution",
    "dns resolution failed",
    "channel is in state transient_failure",
)


def never_connected(exc: grpc.aio.AioRpcError) -> bool:
    """Whether an UNAVAILABLE call never reached a provider (so nothing can have run)."""
    text = f"{exc.details() or ''} {exc.debug_error_string() or ''}".lower()
    return any(marker in text for marker in _NEVER_CONNECTED)


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
