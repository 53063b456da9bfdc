"""Four eyes: list, approve and reject executions held at PENDING_APPROVAL.

The requester's payload was frozen at ExecuteAction. An approver needs the
``approve`` permission in policy, must be in the same tenant (others' executions
are simply not found) and may not be the requester. On approval the requester
is authorized again, against the record as the approver's product shows it now,
and only then is the frozen payload dispatched. Every step is an audit event:
requested (at ExecuteAction), granted / rejected / expired / refused, then the
usual started and finished.

Deciding is a conditional update (PENDING_APPROVAL -> ...), so with several
gateway replicas on one database exactly one decision wins.

The same periodic sweep that expires approvals also closes orphaned executions:
rows left RUNNING by a gateway that stopped or crashed mid-dispatch (see
``Executor.resolve_orphan``), so their EXECUTION_FINISHED event reaches the audit
log even if nobody retries them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn

from opentelemetry import trace

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.execution import Authorized, ExecuteCommand, Executor
from actionmesh.gateway.model import (
    APPROVAL_APPROVED,
    APPROVAL_EXPIRED,
    APPROVAL_REJECTED,
    PENDING_APPROVAL,
    RUNNING,
    ApprovalDecision,
    ExecutionRecord,
)
from actionmesh.gateway.policy import (
    ActionSubject,
    Operation,
    PolicyEngine,
    decision_evidence,
    policy_context,
)
from actionmesh.gateway.requests import check_record
from actionmesh.gateway.storage import (
    decide_approval_op,
    record_attempt_op,
)
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from actionmesh.rpc.outcomes import Outcome
from actionmesh.v1 import audit_pb2, common_pb2

log = logging.getLogger(__name__)

GRANTED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_GRANTED
REJECTED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REJECTED
EXPIRED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_EXPIRED
REFUSED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REFUSED
STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
MAX_COMMENT_CHARS = 1000
MAX_PAGE_SIZE = 200
DEFAULT_PAGE_SIZE = 50
SYSTEM = "actionmesh"


@dataclass(frozen=True)
class PendingApproval:
    record: ExecutionRecord
    command: ExecuteCommand


@dataclass(frozen=True)
class PendingPage:
    approvals: list[PendingApproval]
    next_page_token: str


class Approvals:
    def __init__(self, executor: Executor, policy: PolicyEngine) -> None:
        self._executor = executor
        self._store = executor.store
        self._writer = executor.writer
        self._policy = policy
        self._directory = executor.directory

    async def list_pending(
        self,
        caller: Caller,
        record: common_pb2.RecordRef | None,
        page_size: int,
        page_token: str,
    ) -> PendingPage:
        """Pending executions the caller may decide: approve permission, not their own."""
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                "page too large",
                reason="INVALID_PAGE_SIZE",
                violations=[FieldViolation("page_size", f"must be at most {MAX_PAGE_SIZE}")],
            )
        size = page_size or DEFAULT_PAGE_SIZE
        after = _decode_token(page_token)
        rows = await asyncio.to_thread(
            self._store.pending_approvals,
            caller.tenant,
            record=(record.type, record.id) if record is not None else None,
            not_expired_at=utcnow(),
            after=after,
            limit=size + 1,
        )
        more = len(rows) > size
        rows = rows[:size]
        approvals = []
        for row in rows:
            if row.actor == caller.subject:
                continue
            command = ExecuteCommand.thaw(row.request_payload)
            if self._may_approve(caller, row, command.record):
                approvals.append(PendingApproval(row, command))
        token = _encode_token(rows[-1].started_at, rows[-1].execution_id) if more else ""
        return PendingPage(approvals, token)

    def _may_approve(
        self, caller: Caller, row: ExecutionRecord, record: common_pb2.RecordContext
    ) -> bool:
        found = self._directory.find_action(row.action_id)
        if found is None:
            return True  # Still decidable (a rejection needs no provider).
        entry, descriptor = found
        subject = ActionSubject(row.action_id, entry.provider_id, descriptor)
        return self._policy.authorize(Operation.APPROVE, caller, record, [subject])[0].allowed

    async def approve(
        self,
        approver: Caller,
        execution_id: str,
        comment: str,
        current: common_pb2.RecordContext,
        has_record: bool,
    ) -> ExecutionRecord:
        _check_comment(comment, required=False)
        check_record(current, has_record)
        row, command = await self._pending(approver, execution_id)
        if (current.tenant, current.type, current.id) != (
            command.record.tenant,
            command.record.type,
            command.record.id,
        ):
            raise InvalidArgument(
                "the record does not match the execution's record",
                reason="RECORD_MISMATCH",
                violations=[FieldViolation("record", "must be the record the execution is for")],
            )
        authorized = await self._check_approver(approver, row, command, current, "approve")
        requester = Caller(subject=row.actor, tenant=row.tenant, roles=tuple(row.requester_roles))
        # What the provider is given: the frozen payload on the record as it is now.
        now_command = ExecuteCommand(
            action_id=command.action_id,
            record=current,
            has_record=True,
            inputs=command.inputs,
            idempotency_key=command.idempotency_key,
        )
        decided_at = utcnow()
        granted = self._event(
            GRANTED,
            approver,
            row,
            now_command,
            outcome=common_pb2.OUTCOME_UNSPECIFIED,
            message=comment,
            authorized=authorized,
        )
        found = self._directory.find_action(row.action_id)
        if found is None or found[0].not_serving:
            return await self._decide_finished(
                row,
                now_command,
                requester,
                approver,
                comment,
                decided_at,
                granted,
                outcome=Outcome.UNAVAILABLE,
                reason="PROVIDER_UNAVAILABLE",
                message="approved, but the provider is not available; nothing ran. "
                "Retry ExecuteAction with the same idempotency key.",
            )
        entry, descriptor = found
        recheck = self._executor.authorize_execute(requester, current, entry, descriptor)
        if not recheck.decision.allowed:
            return await self._decide_finished(
                row,
                now_command,
                requester,
                approver,
                comment,
                decided_at,
                granted,
                outcome=Outcome.DENIED,
                reason="POLICY_DENIED",
                message="approved, but policy no longer allows the requester to run this "
                "action on the record as it is now; nothing ran",
                authorized=recheck,
            )
        row.outcome = RUNNING
        row.reason = row.message = ""
        started = self._executor.event(
            STARTED,
            requester,
            now_command,
            row,
            outcome=common_pb2.OUTCOME_UNSPECIFIED,
            authorized=recheck,
        )
        decision = ApprovalDecision(
            state=APPROVAL_APPROVED,
            outcome=RUNNING,
            approver=approver.subject,
            comment=comment,
            decided_at=decided_at,
            dispatch_deadline=self._executor.dispatch_deadline(descriptor, decided_at),
        )
        await self._decide(row, decision, [granted, started])
        row.dispatch_deadline = decision.dispatch_deadline
        row.approval_state, row.approver, row.approval_comment = (
            APPROVAL_APPROVED,
            approver.subject,
            comment,
        )
        row.approval_decided_at = decided_at
        return await self._executor.run(requester, now_command, row, entry, descriptor)

    async def reject(self, approver: Caller, execution_id: str, comment: str) -> ExecutionRecord:
        _check_comment(comment, required=True)
        row, command = await self._pending(approver, execution_id)
        authorized = await self._check_approver(approver, row, command, command.record, "reject")
        decided_at = utcnow()
        reason, message = "APPROVAL_REJECTED", f"rejected by {approver.subject}: {comment}"
        row.finished_at = decided_at
        rejected = self._event(
            REJECTED,
            approver,
            row,
            command,
            outcome=common_pb2.OUTCOME_DENIED,
            reason=reason,
            message=comment,
            authorized=authorized,
        )
        decision = ApprovalDecision(
            state=APPROVAL_REJECTED,
            outcome=Outcome.DENIED,
            approver=approver.subject,
            comment=comment,
            decided_at=decided_at,
            reason=reason,
            message=message,
        )
        await self._decide(row, decision, [rejected])
        return await self._reload(row)

    async def expire_due(self, limit: int = 100) -> int:
        """Close every pending execution whose approval window has passed."""
        now = utcnow()
        due = await asyncio.to_thread(self._store.expired_approvals, now, limit)
        expired = 0
        for row in due:
            if await self._expire(row, now):
                expired += 1
        return expired

    async def _expire(self, row: ExecutionRecord, now: datetime) -> bool:
        command = ExecuteCommand.thaw(row.request_payload)
        row.finished_at = now
        event = self._event(
            EXPIRED,
            Caller(subject=SYSTEM, tenant=row.tenant, roles=()),
            row,
            command,
            outcome=common_pb2.OUTCOME_DENIED,
            reason="APPROVAL_EXPIRED",
            message="nobody approved the execution in time; nothing ran",
        )
        decision = ApprovalDecision(
            state=APPROVAL_EXPIRED,
            outcome=Outcome.DENIED,
            approver="",
            comment="",
            decided_at=now,
            reason="APPROVAL_EXPIRED",
            message="nobody approved the execution in time; nothing ran",
        )
        done = await self._writer.write(decide_approval_op(row.execution_id, decision, [event]))
        if done:
            self._executor.audit_written()
            log.info("approval of execution %s expired", row.execution_id)
        return done

    async def resolve_orphans(self, limit: int = 100) -> int:
        """Close every RUNNING execution (any tenant) whose gateway is gone; how many.

        Each close is a compare-and-set, so replicas sweeping at once close a row once.
        Batches of ``limit`` go on while each one is full and fully closed (a backlog
        after an outage); anything else waits for the next sweep.
        """
        total = 0
        while True:
            now = utcnow()
            orphans = await asyncio.to_thread(
                self._store.orphaned_executions, self._executor.orphan_rule, now, limit
            )
            resolved = 0
            for row in orphans:
                if await self._executor.resolve_orphan(row, now) is not None:
                    resolved += 1
            total += resolved
            if len(orphans) < limit or resolved < len(orphans):
                return total

    # -- internals ------------------------------------------------------------
    async def _pending(
        self, caller: Caller, execution_id: str
    ) -> tuple[ExecutionRecord, ExecuteCommand]:
        trace.get_current_span().set_attribute("actionmesh.execution_id", execution_id[:64])
        row = await asyncio.to_thread(self._store.get, caller.tenant, execution_id)
        if row is None:
            raise NotFound("no such execution", reason="EXECUTION_NOT_FOUND")
        if row.outcome == PENDING_APPROVAL and row.approval_expires_at is not None:
            now = utcnow()
            if row.approval_expires_at <= now:
                await self._expire(row, now)
                raise FailedPrecondition(
                    "the approval window of this execution has passed",
                    reason="APPROVAL_EXPIRED",
                    metadata={"execution_id": row.execution_id},
                )
        if row.outcome != PENDING_APPROVAL:
            raise FailedPrecondition(
                "the execution is not waiting for approval",
                reason="APPROVAL_NOT_PENDING",
                metadata={"execution_id": row.execution_id, "outcome": row.outcome},
            )
        return row, ExecuteCommand.thaw(row.request_payload)

    async def _check_approver(
        self,
        approver: Caller,
        row: ExecutionRecord,
        command: ExecuteCommand,
        record: common_pb2.RecordContext,
        verb: str,
    ) -> Authorized | None:
        """Self-approval and policy; a refusal is audited before it is raised."""
        if approver.subject == row.actor:
            await self._refuse(
                approver,
                row,
                command,
                PermissionDenied(
                    f"the requester cannot {verb} their own execution",
                    reason="SELF_APPROVAL_FORBIDDEN",
                ),
            )
        found = self._directory.find_action(row.action_id)
        if found is None:
            # The provider is gone: approving is still decided by policy at dispatch
            # (the execution becomes UNAVAILABLE); a rejection needs no action details.
            return None
        entry, descriptor = found
        subject = ActionSubject(row.action_id, entry.provider_id, descriptor)
        decision = self._policy.authorize(Operation.APPROVE, approver, record, [subject])[0]
        authorized = Authorized(
            entry=entry,
            descriptor=descriptor,
            decision=decision,
            evidence=[decision_evidence(Operation.APPROVE, subject, decision)],
            context=policy_context(approver, record),
        )
        if not decision.allowed:
            await self._refuse(
                approver,
                row,
                command,
                PermissionDenied(f"not permitted by policy to {verb}", reason="POLICY_DENIED"),
                authorized=authorized,
            )
        return authorized

    async def _refuse(
        self,
        approver: Caller,
        row: ExecutionRecord,
        command: ExecuteCommand,
        error: PermissionDenied,
        authorized: Authorized | None = None,
    ) -> NoReturn:
        event = self._event(
            REFUSED,
            approver,
            row,
            command,
            outcome=common_pb2.OUTCOME_UNSPECIFIED,
            reason=error.reason,
            message=error.message,
            authorized=authorized,
        )
        await self._writer.write(record_attempt_op([event]))
        self._executor.audit_written()
        raise error

    async def _decide_finished(
        self,
        row: ExecutionRecord,
        command: ExecuteCommand,
        requester: Caller,
        approver: Caller,
        comment: str,
        decided_at: datetime,
        granted: audit_pb2.AuditEvent,
        *,
        outcome: str,
        reason: str,
        message: str,
        authorized: Authorized | None = None,
    ) -> ExecutionRecord:
        """Approved, but the execution ends before dispatch (policy or provider said no)."""
        row.outcome, row.reason, row.message, row.finished_at = outcome, reason, message, decided_at
        finished = self._executor.event(
            FINISHED,
            requester,
            command,
            row,
            outcome=Outcome(outcome).to_proto(),
            authorized=authorized,
        )
        decision = ApprovalDecision(
            state=APPROVAL_APPROVED,
            outcome=outcome,
            approver=approver.subject,
            comment=comment,
            decided_at=decided_at,
            reason=reason,
            message=message,
        )
        await self._decide(row, decision, [granted, finished])
        return await self._reload(row)

    async def _decide(
        self, row: ExecutionRecord, decision: ApprovalDecision, events: list[audit_pb2.AuditEvent]
    ) -> None:
        done = await self._writer.write(decide_approval_op(row.execution_id, decision, events))
        if not done:
            raise FailedPrecondition(
                "the execution was decided by someone else first",
                reason="APPROVAL_NOT_PENDING",
                metadata={"execution_id": row.execution_id},
            )
        self._executor.audit_written()

    async def _reload(self, row: ExecutionRecord) -> ExecutionRecord:
        fresh = await asyncio.to_thread(self._store.get, row.tenant, row.execution_id)
        return fresh or row

    def _event(
        self,
        event_type: audit_pb2.AuditEventType.ValueType,
        actor: Caller,
        row: ExecutionRecord,
        command: ExecuteCommand,
        *,
        outcome: common_pb2.Outcome.ValueType,
        reason: str = "",
        message: str = "",
        authorized: Authorized | None = None,
    ) -> audit_pb2.AuditEvent:
        """An approval step's event: no result yet, so reason and message are the step's."""
        return self._executor.event(
            event_type,
            actor,
            command,
            row,
            outcome=outcome,
            authorized=authorized,
            reason=reason,
            message=message,
        )


def _check_comment(comment: str, *, required: bool) -> None:
    if required and not comment.strip():
        raise InvalidArgument(
            "a comment is required",
            reason="INVALID_REQUEST",
            violations=[FieldViolation("comment", "is required: say why")],
        )
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidArgument(
            "comment too long",
            reason="INVALID_REQUEST",
            violations=[
                FieldViolation("comment", f"must be at most {MAX_COMMENT_CHARS} characters")
            ],
        )


def _encode_token(started_at: datetime, execution_id: str) -> str:
    raw = json.dumps([started_at.isoformat(), execution_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    with contextlib.suppress(ValueError, TypeError, json.JSONDecodeError):
        padded = token + "=" * (-len(token) % 4)
        started, execution_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        moment = datetime.fromisoformat(started)
        if moment.tzinfo is not None and isinstance(execution_id, str):
            return moment, execution_id
    raise InvalidArgument(
        "invalid page token",
        reason="INVALID_PAGE_TOKEN",
        violations=[FieldViolation("page_token", "is not a token this service issued")],
    )
