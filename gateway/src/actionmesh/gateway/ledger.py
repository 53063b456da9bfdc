"""The one writer of executions and their evidence.

Every change to an execution row goes through :class:`Ledger`, which writes the row
and the audit events that describe the change in one transaction (through the group
commit writer), redacts what a sensitive record's evidence must not show, and wakes
the audit shipper once the write landed. Nobody else writes executions or events, so
no execution can change without its evidence, and no evidence can name an execution
that did not change.

Each write takes the record *after* a transition of :mod:`actionmesh.gateway.model`
and is a compare-and-set on the state that transition starts from: it answers None
(or False) when another request or replica moved the execution first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.authorization import Authorized, Visibility
from actionmesh.gateway.events import audit_event
from actionmesh.gateway.model import (
    ExecuteCommand,
    ExecutionRecord,
    ExecutionState,
    ReconcileState,
)
from actionmesh.gateway.redaction import Redactor
from actionmesh.gateway.storage import (
    GatewayStore,
    InsertExecution,
    OrphanRule,
    count_vote_op,
    decide_approval_op,
    finish_execution_op,
    follow_op,
    lease_reconcile_op,
    reclaim_unavailable_op,
    reconcile_op,
    record_attempt_op,
    record_late_result_op,
    request_cancel_op,
    resolve_by_person_op,
    resolve_orphan_op,
)
from actionmesh.gateway.writer import GroupCommitWriter
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import ActionMeshError, Unavailable
from actionmesh.rpc.outcomes import Outcome
from actionmesh.v1 import audit_pb2, common_pb2

STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
LATE_RESULT = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_LATE_RESULT
APPROVAL_REQUESTED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REQUESTED
DISCOVERED = audit_pb2.AUDIT_EVENT_TYPE_ACTIONS_DISCOVERED
GRANTED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_GRANTED
REJECTED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REJECTED
EXPIRED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_EXPIRED
REFUSED = audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REFUSED
RECONCILED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_RECONCILED
NEEDS_ATTENTION = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_NEEDS_ATTENTION
ACCEPTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_ACCEPTED
PROGRESS = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_PROGRESS
CANCEL_REQUESTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_CANCEL_REQUESTED
RESOLVE_REFUSED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_RESOLVE_REFUSED
PREVIEWED = audit_pb2.AUDIT_EVENT_TYPE_ACTION_PREVIEWED
# Who acts when the gateway itself moves an execution (expiry, orphan sweep).
SYSTEM = "actionmesh"


def requester_of(record: ExecutionRecord) -> Caller:
    """The person who asked for ``record``, as they were when they asked."""
    return Caller(subject=record.actor, tenant=record.tenant, roles=record.requester_roles)


class Ledger:
    def __init__(
        self,
        store: GatewayStore,
        writer: GroupCommitWriter,
        redactor: Redactor,
        on_written: Callable[[], None],
    ) -> None:
        self._store = store
        self._writer = writer
        self._redactor = redactor
        self._on_written = on_written

    # -- reads ----------------------------------------------------------------------
    async def get(self, tenant: str, execution_id: str) -> ExecutionRecord | None:
        return await asyncio.to_thread(self._store.get, tenant, execution_id)

    async def find_by_key(self, tenant: str, idempotency_key: str) -> ExecutionRecord | None:
        return await asyncio.to_thread(self._store.find_by_key, tenant, idempotency_key)

    async def pending_approvals(
        self,
        tenant: str,
        *,
        record: tuple[str, str] | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ExecutionRecord]:
        return await asyncio.to_thread(
            self._store.pending_approvals,
            tenant,
            record=record,
            not_expired_at=utcnow(),
            after=after,
            limit=limit,
        )

    async def expired_approvals(self, now: datetime, limit: int) -> list[ExecutionRecord]:
        return await asyncio.to_thread(self._store.expired_approvals, now, limit)

    async def orphaned(self, rule: OrphanRule, now: datetime, limit: int) -> list[ExecutionRecord]:
        return await asyncio.to_thread(self._store.orphaned_executions, rule, now, limit)

    async def due_reconciles(self, now: datetime, limit: int) -> list[ExecutionRecord]:
        return await asyncio.to_thread(self._store.due_reconciles, now, limit)

    async def next_reconcile_at(self) -> datetime | None:
        return await asyncio.to_thread(self._store.next_reconcile_at)

    async def unresolved(self, tenant: str, limit: int) -> list[ExecutionRecord]:
        return await asyncio.to_thread(self._store.unresolved, tenant, limit)

    # -- evidence -------------------------------------------------------------------
    def event(
        self,
        event_type: audit_pb2.AuditEventType.ValueType,
        actor: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        *,
        outcome: common_pb2.Outcome.ValueType | None = None,
        authorized: Authorized | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> audit_pb2.AuditEvent:
        """An event about one execution; its inputs redacted when the record is sensitive.

        ``outcome``, ``reason`` and ``message`` default to the record's own; the facts are
        the decision's, else those the execution was decided on.
        """
        sensitive = record.sensitive or command.sensitive
        return audit_event(
            event_type,
            caller=actor,
            record=command.record,
            preview=(
                self.scrubbed_preview(command, record.preview, sensitive)
                if event_type == APPROVAL_REQUESTED and record.preview is not None
                else None
            ),
            execution_id=record.execution_id,
            action_id=record.action_id,
            provider_id=record.provider_id,
            outcome=record.outcome.to_proto() if outcome is None else outcome,
            reason=record.reason if reason is None else reason,
            message=record.message if message is None else message,
            idempotency_key=record.idempotency_key,
            started_at=record.started_at,
            finished_at=record.finished_at,
            external_ref=record.external_ref,
            changes=record.changes,
            warnings=record.warnings,
            **self._evidence(command, sensitive, authorized, record.facts),
        )

    def _evidence(
        self,
        command: ExecuteCommand,
        sensitive: bool,
        authorized: Authorized | None,
        facts: common_pb2.RecordFacts | None = None,
    ) -> dict[str, Any]:
        """What every execution event keeps of the request: its inputs (digests when the
        record is sensitive), the policy decision with the context it saw and the record
        facts it decided on, with who vouched for them."""
        if authorized is not None and authorized.facts is not None:
            facts = authorized.facts
        return {
            "facts": facts,
            "inputs": self._redactor.evidence(command.inputs, sensitive),
            "inputs_redacted": sensitive,
            "policy_ids": authorized.decision.policy_ids if authorized else (),
            "policy_decisions": authorized.evidence if authorized else (),
            "policy_context": authorized.context if authorized else None,
        }

    def scrubbed(self, command: ExecuteCommand, record: ExecutionRecord) -> ExecutionRecord:
        """A sensitive record's provider texts, without the input values they echo."""
        if not (record.sensitive or command.sensitive):
            return record

        def scrub(text: str) -> str:
            return Redactor.scrub(text, command.inputs, True)

        return replace(
            record,
            reason=scrub(record.reason),
            message=scrub(record.message),
            warnings=tuple(scrub(w) for w in record.warnings),
        )

    @staticmethod
    def scrubbed_preview(
        command: ExecuteCommand, preview: common_pb2.ActionPreview, sensitive: bool
    ) -> common_pb2.ActionPreview:
        """A sensitive record's preview texts, without the input values they echo (the
        changes stay, as an execution's do)."""
        if not sensitive:
            return preview
        scrubbed = common_pb2.ActionPreview()
        scrubbed.CopyFrom(preview)
        scrubbed.effect = Redactor.scrub(preview.effect, command.inputs, True)
        del scrubbed.warnings[:]
        scrubbed.warnings.extend(Redactor.scrub(w, command.inputs, True) for w in preview.warnings)
        return scrubbed

    # -- writes ---------------------------------------------------------------------
    async def open(
        self,
        requester: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        authorized: Authorized,
    ) -> None:
        """Store a new execution (RUNNING or PENDING_APPROVAL) with its first event.

        KeyConflict when its idempotency key is taken.
        """
        pending = record.outcome is ExecutionState.PENDING_APPROVAL
        first = self.event(
            APPROVAL_REQUESTED if pending else STARTED,
            requester,
            command,
            record,
            authorized=authorized,
        )
        await self._writer.write(InsertExecution(record, (first,)))
        self._on_written()

    async def refuse(
        self,
        actor: Caller,
        command: ExecuteCommand,
        attempt_id: str,
        error: ActionMeshError,
        *,
        provider_id: str = "",
        authorized: Authorized | None = None,
        facts: common_pb2.RecordFacts | None = None,
        sensitive: bool | None = None,
        event_type: audit_pb2.AuditEventType.ValueType = FINISHED,
        outcome: Outcome | None = None,
    ) -> Outcome:
        """Evidence of an ExecuteAction refused before it became an execution (or, with
        ``event_type`` PREVIEWED, of a refused PreviewAction); its outcome (default:
        UNAVAILABLE for an Unavailable error, else DENIED).

        ``sensitive`` overrides the command's own claim (e.g. the source's facts say so,
        or no source could be asked).
        """
        if outcome is None:
            outcome = Outcome.UNAVAILABLE if isinstance(error, Unavailable) else Outcome.DENIED
        now = utcnow()
        sensitive = command.sensitive if sensitive is None else sensitive
        event = audit_event(
            event_type,
            caller=actor,
            record=command.record,
            execution_id=attempt_id,
            action_id=command.action_id,
            provider_id=provider_id,
            outcome=outcome.to_proto(),
            reason=error.reason,
            message=error.message,
            idempotency_key=command.idempotency_key,
            started_at=now,
            finished_at=now,
            **self._evidence(command, sensitive, authorized, facts),
        )
        await self._append([event])
        return outcome

    async def note(
        self,
        event_type: audit_pb2.AuditEventType.ValueType,
        actor: Caller,
        command: ExecuteCommand,
        record: ExecutionRecord,
        error: ActionMeshError,
        authorized: Authorized | None = None,
    ) -> None:
        """Evidence of a step refused on an execution that does not change (e.g. approval)."""
        await self._append(
            [
                self.event(
                    event_type,
                    actor,
                    command,
                    record,
                    outcome=common_pb2.OUTCOME_UNSPECIFIED,
                    reason=error.reason,
                    message=error.message,
                    authorized=authorized,
                )
            ]
        )

    async def discovered(
        self, caller: Caller, record: common_pb2.RecordContext, visibility: Visibility, summary: str
    ) -> None:
        """Evidence of one discovery: every policy decision, shown and hidden."""
        decisions = visibility.decisions
        event = audit_event(
            DISCOVERED,
            caller=caller,
            record=record,
            message=summary,
            policy_ids=sorted({p for d in decisions for p in d.policy_ids}),
            policy_decisions=visibility.evidence,
            policy_context=visibility.context,
            facts=visibility.facts,
        )
        await self._append([event])

    async def previewed(
        self,
        caller: Caller,
        command: ExecuteCommand,
        authorized: Authorized,
        preview: common_pb2.ActionPreview,
    ) -> None:
        """Evidence of one answered PreviewAction: the decision, the facts, the preview
        (``command`` is on the record as verified, so its sensitivity is the source's)."""
        sensitive = command.sensitive
        event = audit_event(
            PREVIEWED,
            caller=caller,
            record=command.record,
            action_id=command.action_id,
            provider_id=authorized.entry.provider_id,
            preview=self.scrubbed_preview(command, preview, sensitive),
            **self._evidence(command, sensitive, authorized),
        )
        await self._append([event])

    async def finish(
        self,
        requester: Caller,
        command: ExecuteCommand,
        finished: ExecutionRecord,
        authorized: Authorized | None = None,
    ) -> ExecutionRecord | None:
        """Record a dispatch's outcome (ACCEPTED for a long-running action at work); None
        when the row had already left RUNNING."""
        finished = self.scrubbed(command, finished)
        kind = ACCEPTED if finished.outcome is ExecutionState.ACCEPTED else FINISHED
        event = self.event(kind, requester, command, finished, authorized=authorized)
        if not await self._writer.write(finish_execution_op(finished, [event])):
            return None
        self._on_written()
        return finished

    async def late_result(
        self,
        requester: Caller,
        command: ExecuteCommand,
        late: ExecutionRecord,
        *,
        reason: str,
        message: str,
    ) -> ExecutionRecord | None:
        """Keep a provider's answer that came after the execution closed as TIMED_OUT."""
        late = self.scrubbed(command, late)
        if late.late_outcome is None:
            raise ValueError(f"execution {late.execution_id} carries no late result")
        sensitive = late.sensitive or command.sensitive
        event = self.event(
            LATE_RESULT,
            requester,
            command,
            late,
            outcome=late.late_outcome.to_proto(),
            reason=Redactor.scrub(reason, command.inputs, sensitive),
            message=Redactor.scrub(message, command.inputs, sensitive),
        )
        if not await self._writer.write(record_late_result_op(late, [event])):
            return None
        self._on_written()
        return late

    async def decide(
        self,
        decided: ExecutionRecord,
        events: Sequence[audit_pb2.AuditEvent],
        before: ExecutionRecord | None = None,
    ) -> bool:
        """Move a pending execution on (approved, rejected, expired); False if already
        moved (or, with ``before``, if another approval was counted since)."""
        if not events:
            raise ValueError("an approval decision needs its evidence")
        if not await self._writer.write(decide_approval_op(decided, events, before)):
            return False
        self._on_written()
        return True

    async def count_vote(
        self,
        counted: ExecutionRecord,
        before: ExecutionRecord,
        events: Sequence[audit_pb2.AuditEvent],
    ) -> bool:
        """Record one approval short of the quorum; False if the execution moved or another
        approval was counted first (read again and decide again)."""
        if not await self._writer.write(count_vote_op(counted, before, events)):
            return False
        self._on_written()
        return True

    async def orphan(
        self, row: ExecutionRecord, rule: OrphanRule, now: datetime
    ) -> ExecutionRecord | None:
        """Close a RUNNING execution whose runner is gone; None if it was not (or no longer) one."""
        closed = row.orphaned(at=now)
        event = self.event(
            FINISHED, requester_of(row), ExecuteCommand.thaw(row.request_payload), closed
        )
        if not await self._writer.write(resolve_orphan_op(row.execution_id, rule, now, [event])):
            return None
        self._on_written()
        return closed

    async def reclaim(
        self, row: ExecutionRecord, dispatch_deadline: datetime
    ) -> ExecutionRecord | None:
        """UNAVAILABLE back to RUNNING for a same-key retry; None if another request did."""
        reclaimed = row.reclaimed(dispatch_deadline=dispatch_deadline)
        if not await self._writer.write(
            reclaim_unavailable_op(row.execution_id, dispatch_deadline)
        ):
            return None
        return reclaimed

    async def lease_reconcile(
        self,
        row: ExecutionRecord,
        owner: str,
        now: datetime,
        until: datetime,
        *,
        right_away: bool = False,
    ) -> bool:
        """Take the lease to reconcile ``row`` until ``until``; False if it is not due
        (unless ``right_away``) or another replica holds it (no evidence: nothing changed)."""
        return bool(
            await self._writer.write(
                lease_reconcile_op(row.execution_id, owner, now, until, right_away=right_away)
            )
        )

    async def reconcile(
        self, moved: ExecutionRecord, owner: str, *, told: ExecutionRecord
    ) -> ExecutionRecord | None:
        """Write a reconcile attempt's finding (``moved``, from ``told``) under ``owner``'s
        lease, with its event when it settles the execution; None if the lease was lost
        or the execution was settled first (e.g. a late answer)."""
        events: list[audit_pb2.AuditEvent] = []
        command = ExecuteCommand.thaw(moved.request_payload)
        moved = self.scrubbed(command, moved)
        if moved.reconcile_state is ReconcileState.RESOLVED and moved.late_outcome is not None:
            event = self.event(
                RECONCILED,
                Caller(subject=SYSTEM, tenant=moved.tenant, roles=()),
                command,
                moved,
                outcome=moved.late_outcome.to_proto(),
                reason=moved.resolved_reason,
                message=f"the provider settled the outcome: {moved.late_outcome.value}",
            )
            event.told_outcome = told.outcome.to_proto()
            event.finished_at.FromDatetime(moved.late_result_at or utcnow())
            events.append(event)
        elif moved.reconcile_state is ReconcileState.NEEDS_ATTENTION:
            event = self.event(
                NEEDS_ATTENTION,
                Caller(subject=SYSTEM, tenant=moved.tenant, roles=()),
                command,
                moved,
                reason=moved.resolved_reason,
                message=(
                    "the gateway cannot find out whether the provider acted; "
                    "a person must check the provider's system"
                ),
            )
            event.told_outcome = told.outcome.to_proto()
            events.append(event)
        if not await self._writer.write(reconcile_op(moved, owner, events)):
            return None
        if events:
            self._on_written()
        return moved

    async def follow(
        self, moved: ExecutionRecord, owner: str, *, told: ExecutionRecord
    ) -> ExecutionRecord | None:
        """Write what a question about an ACCEPTED execution (``told``) found under
        ``owner``'s lease: EXECUTION_PROGRESS when its progress changed, EXECUTION_FINISHED
        when it ended (its final outcome, or TIMED_OUT past its maximum duration); None if
        the lease was lost or it moved first."""
        command = ExecuteCommand.thaw(moved.request_payload)
        moved = self.scrubbed(command, moved)
        system = Caller(subject=SYSTEM, tenant=moved.tenant, roles=())
        events: list[audit_pb2.AuditEvent] = []
        if moved.outcome is not ExecutionState.ACCEPTED:
            events.append(self.event(FINISHED, requester_of(moved), command, moved))
        elif moved.progress is not None and not _same_progress(moved.progress, told.progress):
            progress = moved.progress
            event = self.event(
                PROGRESS,
                system,
                command,
                moved,
                reason="",
                message=Redactor.scrub(
                    progress.message, command.inputs, moved.sensitive or command.sensitive
                ),
            )
            event.progress.CopyFrom(progress)
            event.progress.message = event.message
            events.append(event)
        if not await self._writer.write(follow_op(moved, owner, events)):
            return None
        if events:
            self._on_written()
        return moved

    async def resolve_by_person(
        self,
        person: Caller,
        moved: ExecutionRecord,
        *,
        told: ExecutionRecord,
        comment: str,
        authorized: Authorized,
    ) -> ExecutionRecord | None:
        """Write what a person found out about an unsettled execution, as an
        EXECUTION_RECONCILED event with them as actor; None when it was settled first or
        is being asked about right now."""
        command = ExecuteCommand.thaw(moved.request_payload)
        if moved.late_outcome is None:
            raise ValueError(f"execution {moved.execution_id} carries no resolved outcome")
        event = self.event(
            RECONCILED,
            person,
            command,
            moved,
            outcome=moved.late_outcome.to_proto(),
            reason=moved.resolved_reason,
            message=comment,
            authorized=authorized,
        )
        event.told_outcome = told.outcome.to_proto()
        event.finished_at.FromDatetime(moved.late_result_at or utcnow())
        if not await self._writer.write(resolve_by_person_op(moved, utcnow(), [event])):
            return None
        self._on_written()
        return moved

    async def request_cancel(
        self, canceller: Caller, moved: ExecutionRecord, authorized: Authorized
    ) -> ExecutionRecord | None:
        """Record a cancel request on an ACCEPTED execution with its evidence; None when it
        is no longer ACCEPTED or someone asked first."""
        command = ExecuteCommand.thaw(moved.request_payload)
        event = self.event(
            CANCEL_REQUESTED,
            canceller,
            command,
            moved,
            authorized=authorized,
            reason="CANCEL_REQUESTED",
            message=moved.cancel_comment,
        )
        if not await self._writer.write(request_cancel_op(moved, [event])):
            return None
        self._on_written()
        return moved

    async def _append(self, events: Sequence[audit_pb2.AuditEvent]) -> None:
        await self._writer.write(record_attempt_op(events))
        self._on_written()


def _same_progress(a: common_pb2.ExecutionProgress, b: common_pb2.ExecutionProgress | None) -> bool:
    """Whether two progress reports say the same (when they were made aside)."""
    if b is None:
        return False
    return (a.HasField("percent"), a.percent, a.message) == (
        b.HasField("percent"),
        b.percent,
        b.message,
    )
