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

**Quorum.** Policy fixes, when the execution is held, how many distinct approvers it
needs and which roles must be among them (:class:`~actionmesh.gateway.model.Quorum`,
Cedar action ``quorum``). An approval that does not complete the quorum is *counted*
(APPROVAL_GRANTED with reason ``APPROVAL_COUNTED``) with a compare-and-set on the
approvals so far, and the execution stays pending; the approval that completes it
decides, with the same condition, and dispatches. Nobody counts twice, the requester
never, and one rejection ends it.

Who may decide is asked of :mod:`~actionmesh.gateway.authorization` (the approver's
``approve`` and, at approval, the requester's ``execute`` again); the decision is
written by the :mod:`~actionmesh.gateway.ledger`; an approved execution is dispatched
by the :mod:`~actionmesh.gateway.dispatch` like any other; approvals nobody decided
in time are closed by the :mod:`~actionmesh.gateway.sweeper`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn

from opentelemetry import trace

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.authorization import Authorized, Authorizer
from actionmesh.gateway.directory import ProviderDirectory
from actionmesh.gateway.dispatch import Deadlines, Dispatch, Dispatcher
from actionmesh.gateway.facts import FactResolver, VerifiedRecord
from actionmesh.gateway.ledger import (
    FINISHED,
    GRANTED,
    REFUSED,
    REJECTED,
    STARTED,
    Ledger,
    requester_of,
)
from actionmesh.gateway.model import ExecuteCommand, ExecutionRecord, ExecutionState, Vote
from actionmesh.gateway.requests import check_record
from actionmesh.gateway.sweeper import Sweeper
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from actionmesh.rpc.outcomes import Outcome
from actionmesh.v1 import audit_pb2, common_pb2

log = logging.getLogger(__name__)

MAX_COMMENT_CHARS = 1000
# How often one approval is tried again when other approvals were counted meanwhile.
QUORUM_ATTEMPTS = 5
MAX_PAGE_SIZE = 200
DEFAULT_PAGE_SIZE = 50


@dataclass(frozen=True)
class PendingApproval:
    record: ExecutionRecord
    command: ExecuteCommand


@dataclass(frozen=True)
class PendingPage:
    approvals: list[PendingApproval]
    next_page_token: str


class Approvals:
    def __init__(
        self,
        *,
        directory: ProviderDirectory,
        facts: FactResolver,
        authorizer: Authorizer,
        ledger: Ledger,
        dispatcher: Dispatcher,
        sweeper: Sweeper,
        deadlines: Deadlines,
    ) -> None:
        self._directory = directory
        self._facts = facts
        self._authorizer = authorizer
        self._ledger = ledger
        self._dispatcher = dispatcher
        self._sweeper = sweeper
        self._deadlines = deadlines

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
        rows = await self._ledger.pending_approvals(
            caller.tenant,
            record=(record.type, record.id) if record is not None else None,
            after=_decode_token(page_token),
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
        return self._authorizer.approve(caller, self._facts.unverified(record), *found).allowed

    async def approve(
        self,
        approver: Caller,
        execution_id: str,
        comment: str,
        current: common_pb2.RecordContext,
        has_record: bool,
    ) -> ExecutionRecord:
        check_comment(comment, required=False)
        if has_record:
            check_record(current, has_record)
        row, command = await self._pending(approver, execution_id)
        if has_record and (current.tenant, current.type, current.id) != (
            command.record.tenant,
            command.record.type,
            command.record.id,
        ):
            raise InvalidArgument(
                "the record does not match the execution's record",
                reason="RECORD_MISMATCH",
                violations=[FieldViolation("record", "must be the record the execution is for")],
            )
        # The record as it is now: from its system of record (the approver need not, and
        # cannot, restate it), else from a trusted caller, else the approver's unverified word.
        verified = await self._resolve(approver, row, command, current if has_record else None)
        authorized = await self._check_approver(approver, row, command, verified, "approve")
        # The quorum: an approval short of it is counted (compare-and-set on the approvals
        # so far: two approvers at once on two replicas are counted one after the other)
        # and the execution stays pending; the approval that completes it dispatches.
        for _ in range(QUORUM_ATTEMPTS):
            if row.counted(approver.subject):
                await self._refuse(
                    approver,
                    row,
                    command,
                    PermissionDenied(
                        "your approval is already counted; another person must approve",
                        reason="APPROVER_ALREADY_COUNTED",
                    ),
                    authorized=authorized,
                )
            vote = Vote(approver.subject, tuple(approver.roles), comment, utcnow())
            if row.quorum_met_with(vote):
                break
            counted = row.vote_counted(vote)
            event = self._ledger.event(
                GRANTED,
                approver,
                command.on(verified.record),
                counted,
                outcome=common_pb2.OUTCOME_UNSPECIFIED,
                reason="APPROVAL_COUNTED",
                message=comment,
                authorized=authorized,
            )
            if await self._ledger.count_vote(counted, row, [event]):
                return counted
            row, command = await self._pending(approver, execution_id)
        else:
            raise FailedPrecondition(
                "other approvals keep arriving at the same time; approve again",
                reason="APPROVAL_CONTENDED",
                retry_after_s=1.0,
            )
        requester = requester_of(row)
        # What the provider is given: the frozen payload on the record as it is now.
        now_command = command.on(verified.record)
        decided_at = utcnow()
        granted = self._ledger.event(
            GRANTED,
            approver,
            now_command,
            row,
            outcome=common_pb2.OUTCOME_UNSPECIFIED,
            reason="",
            message=comment,
            authorized=authorized,
        )
        found = self._directory.find_action(row.action_id)
        if found is None or found[0].not_serving:
            ended = row.ended_at_approval(
                approver=approver.subject,
                comment=comment,
                at=decided_at,
                outcome=Outcome.UNAVAILABLE,
                reason="PROVIDER_UNAVAILABLE",
                message="approved, but the provider is not available; nothing ran. "
                "Retry ExecuteAction with the same idempotency key.",
                facts=verified.facts,
                roles=vote.roles,
            )
            return await self._end(ended, now_command, requester, granted, before=row)
        entry, descriptor = found
        recheck = self._authorizer.execute(requester, verified, entry, descriptor)
        if not recheck.allowed:
            ended = row.ended_at_approval(
                approver=approver.subject,
                comment=comment,
                at=decided_at,
                outcome=Outcome.DENIED,
                reason="POLICY_DENIED",
                message="approved, but policy no longer allows the requester to run this "
                "action on the record as it is now; nothing ran",
                facts=verified.facts,
                roles=vote.roles,
            )
            return await self._end(ended, now_command, requester, granted, recheck, before=row)
        approved = row.approved(
            approver=approver.subject,
            comment=comment,
            at=decided_at,
            dispatch_deadline=self._deadlines.dispatch_deadline(descriptor, decided_at),
            facts=verified.facts,
            roles=vote.roles,
        )
        started = self._ledger.event(
            STARTED,
            requester,
            now_command,
            approved,
            outcome=common_pb2.OUTCOME_UNSPECIFIED,
            authorized=recheck,
        )
        await self._decide(approved, [granted, started], before=row)
        dispatch = Dispatch(requester, now_command, entry, descriptor)
        return await self._dispatcher.run(dispatch, approved)

    async def reject(self, approver: Caller, execution_id: str, comment: str) -> ExecutionRecord:
        check_comment(comment, required=True)
        row, command = await self._pending(approver, execution_id)
        try:
            verified = await self._facts.resolve(approver, command.record, fresh=True)
        except (NotFound, Unavailable):
            # Rejecting runs nothing: the source being away does not block it.
            verified = self._facts.unverified(command.record)
        authorized = await self._check_approver(approver, row, command, verified, "reject")
        rejected = row.rejected(approver=approver.subject, comment=comment, at=utcnow())
        event = self._ledger.event(
            REJECTED,
            approver,
            command,
            rejected,
            outcome=common_pb2.OUTCOME_DENIED,
            message=comment,
            authorized=authorized,
        )
        await self._decide(rejected, [event])
        return rejected

    # -- internals ------------------------------------------------------------
    async def _pending(
        self, caller: Caller, execution_id: str
    ) -> tuple[ExecutionRecord, ExecuteCommand]:
        trace.get_current_span().set_attribute("actionmesh.execution_id", execution_id[:64])
        row = await self._ledger.get(caller.tenant, execution_id)
        if row is None:
            raise NotFound("no such execution", reason="EXECUTION_NOT_FOUND")
        if row.outcome is ExecutionState.PENDING_APPROVAL and row.approval_expires_at is not None:
            now = utcnow()
            if row.approval_expires_at <= now:
                await self._sweeper.expire(row, now)
                raise FailedPrecondition(
                    "the approval window of this execution has passed",
                    reason="APPROVAL_EXPIRED",
                    metadata={"execution_id": row.execution_id},
                )
        if row.outcome is not ExecutionState.PENDING_APPROVAL:
            raise FailedPrecondition(
                "the execution is not waiting for approval",
                reason="APPROVAL_NOT_PENDING",
                metadata={"execution_id": row.execution_id, "outcome": row.outcome.value},
            )
        return row, ExecuteCommand.thaw(row.request_payload)

    async def _resolve(
        self,
        approver: Caller,
        row: ExecutionRecord,
        command: ExecuteCommand,
        current: common_pb2.RecordContext | None,
    ) -> VerifiedRecord:
        """The record's facts now; a source that is down or lost the record is audited."""
        try:
            return await self._facts.resolve(approver, current or command.record, fresh=True)
        except (NotFound, Unavailable) as error:
            await self._ledger.note(REFUSED, approver, command, row, error)
            raise

    async def _check_approver(
        self,
        approver: Caller,
        row: ExecutionRecord,
        command: ExecuteCommand,
        verified: VerifiedRecord,
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
        authorized = self._authorizer.approve(approver, verified, *found)
        if not authorized.allowed:
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
        await self._ledger.note(REFUSED, approver, command, row, error, authorized)
        raise error

    async def _end(
        self,
        ended: ExecutionRecord,
        command: ExecuteCommand,
        requester: Caller,
        granted: audit_pb2.AuditEvent,
        authorized: Authorized | None = None,
        *,
        before: ExecutionRecord | None = None,
    ) -> ExecutionRecord:
        """Approved, but the execution ends before dispatch (policy or provider said no)."""
        finished = self._ledger.event(FINISHED, requester, command, ended, authorized=authorized)
        await self._decide(ended, [granted, finished], before=before)
        return ended

    async def _decide(
        self,
        decided: ExecutionRecord,
        events: list[audit_pb2.AuditEvent],
        *,
        before: ExecutionRecord | None = None,
    ) -> None:
        if not await self._ledger.decide(decided, events, before):
            raise FailedPrecondition(
                "the execution was decided by someone else first",
                reason="APPROVAL_NOT_PENDING",
                metadata={"execution_id": decided.execution_id},
            )


def check_comment(comment: str, *, required: bool) -> None:
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
