"""The gateway's execution model: the states an execution moves through, as types.

An execution is RUNNING while its dispatch is under way, PENDING_APPROVAL while it
waits for a second person, ACCEPTED while the provider of a long-running action works
on it after answering Execute, and otherwise finished with one final outcome of the
mesh's vocabulary (:class:`~actionmesh.rpc.outcomes.Outcome`). Its approval, when the action
requires one, is PENDING, then APPROVED, REJECTED or EXPIRED. The values are what the
gateway's database stores (each member's name is its value), so plain strings read
back from a row compare equal to them.

:class:`ExecutionRecord` is immutable; each legal move is a method returning the next
record (``awaiting_approval``, ``approved``, ``rejected``, ``expired``,
``ended_at_approval``, ``finished``, ``with_late_result``, ``orphaned``, ``reclaimed``,
the reconciler's ``reconciled``, ``never_received``, ``reconcile_later``,
``needs_attention``, and for long-running actions ``accepted``, ``progressed``,
``completed``, ``overran``, ``lost``, ``cancel_requested``), and any other move raises
:class:`IllegalTransition`.

An ACCEPTED execution is followed like an unsettled one (``reconcile_state`` PENDING,
due every poll interval): each question either records progress, or its final outcome
(which then *is* the outcome: ACCEPTED was never final), or, past its ``run_deadline``,
ends it TIMED_OUT ``MAX_DURATION_EXCEEDED``, unsettled like any TIMED_OUT.

An outcome that leaves open whether the provider acted (TIMED_OUT, orphans included, and
PARTIAL ``DOWNSTREAM_OUTCOME_UNKNOWN`` or ``PROVIDER_STOPPED``) is *unsettled*: it is written with
``reconcile_state`` PENDING, and the reconciler (:mod:`actionmesh.gateway.reconciler`)
asks the provider what became of it. What the caller was told stays in ``outcome``,
``reason`` and ``message``; the outcome learned afterwards, by a late answer or by
reconciliation, is the *resolved* outcome: ``late_outcome`` and ``late_result_at``
(with ``external_ref``, ``changes`` and ``warnings`` from that answer), and
``resolved_reason``. UNAVAILABLE as resolved outcome means "nothing ran": the same key may
dispatch again, as after an UNAVAILABLE outcome. The storage layer writes a move
as a compare-and-set on the state it starts from, so replicas agree on who made it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from actionmesh.gateway.redaction import is_sensitive
from actionmesh.rpc.outcomes import Outcome
from actionmesh.v1 import common_pb2, gateway_pb2


class ExecutionState(enum.StrEnum):
    """Where an execution stands: running, waiting for approval, or its outcome."""

    RUNNING = "RUNNING"
    PENDING_APPROVAL = "PENDING_APPROVAL"
    SUCCEEDED = "SUCCEEDED"
    DENIED = "DENIED"
    REJECTED = "REJECTED"
    UNAVAILABLE = "UNAVAILABLE"
    TIMED_OUT = "TIMED_OUT"
    PARTIAL = "PARTIAL"
    ACCEPTED = "ACCEPTED"
    CANCELLED = "CANCELLED"

    @property
    def outcome(self) -> Outcome | None:
        """The outcome this state reports (None while RUNNING)."""
        return None if self is ExecutionState.RUNNING else Outcome(self.value)

    def to_proto(self) -> common_pb2.Outcome.ValueType:
        outcome = self.outcome
        return common_pb2.OUTCOME_UNSPECIFIED if outcome is None else outcome.to_proto()


class ReconcileState(enum.StrEnum):
    """Whether an execution's outcome still needs an answer from its provider.

    NONE: its outcome is final. PENDING: unsettled, the reconciler will ask the provider.
    RESOLVED: the provider's answer is recorded (``late_outcome``). NEEDS_ATTENTION: the
    gateway gave up asking (the provider cannot say, or the bound was reached); final,
    a person must find out what happened.
    """

    NONE = "NONE"
    PENDING = "PENDING"
    RESOLVED = "RESOLVED"
    NEEDS_ATTENTION = "NEEDS_ATTENTION"

    def to_proto(self) -> gateway_pb2.ReconcileState.ValueType:
        return gateway_pb2.ReconcileState.Value(f"RECONCILE_STATE_{self.value}")


class ApprovalState(enum.StrEnum):
    """Where an execution's approval stands (actions that require one)."""

    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"

    def to_proto(self) -> gateway_pb2.ApprovalState.ValueType:
        return gateway_pb2.ApprovalState.Value(f"APPROVAL_STATE_{self.value}")


for _kind in (ExecutionState, ApprovalState, ReconcileState):
    # Stored and bound as text: a member's name and value must never differ.
    assert all(member.name == member.value for member in _kind), _kind

# The two states the storage queries select on.
RUNNING = ExecutionState.RUNNING
PENDING_APPROVAL = ExecutionState.PENDING_APPROVAL
# How an orphaned execution (its gateway stopped while the provider worked) is closed.
ORPHAN_OUTCOME = Outcome.TIMED_OUT
ORPHAN_REASON = "GATEWAY_STOPPED"
ORPHAN_MESSAGE = (
    "the gateway stopped while the provider was working on it; it may or may not have acted. "
    "Retry only with the same idempotency key"
)


# Why a long-running execution ended TIMED_OUT: past its declared maximum duration, or
# its provider no longer knew it (it may have acted partly; reconciled like any TIMED_OUT).
OVERRAN_REASON = "MAX_DURATION_EXCEEDED"
LOST_REASON = "PROVIDER_LOST_EXECUTION"

# resolved_reason when a person recorded what became of an unsettled execution, and
# what they may record (UNAVAILABLE: nothing ran, the same key dispatches again).
RESOLVED_BY_PERSON = "RESOLVED_BY_PERSON"
PERSON_OUTCOMES = frozenset(
    {Outcome.SUCCEEDED, Outcome.REJECTED, Outcome.PARTIAL, Outcome.CANCELLED, Outcome.UNAVAILABLE}
)

# The PARTIAL reasons that leave open whether the work was done: the downstream system
# did not answer, or the provider stopped while a long-running action ran (it may have
# acted partly; a provider whose downstream knows better answers so when asked again).
OUTCOME_UNKNOWN_REASON = "DOWNSTREAM_OUTCOME_UNKNOWN"
PROVIDER_STOPPED_REASON = "PROVIDER_STOPPED"
UNKNOWN_PARTIAL_REASONS = frozenset({OUTCOME_UNKNOWN_REASON, PROVIDER_STOPPED_REASON})
# resolved_reason when the provider says it never received the request (nothing ran).
NEVER_RECEIVED_REASON = "PROVIDER_NEVER_RECEIVED"


def unsettled(outcome: ExecutionState | Outcome, reason: str) -> bool:
    """Whether an outcome leaves open whether the provider acted (so it is reconciled)."""
    value = outcome.value
    return value == ExecutionState.TIMED_OUT.value or (
        value == ExecutionState.PARTIAL.value and reason in UNKNOWN_PARTIAL_REASONS
    )


@dataclass(frozen=True)
class Quorum:
    """How many distinct approvers an execution needs, and the roles that must be among
    them (each role held by at least one approver); ``policy_ids`` decided it."""

    approvers: int = 1
    roles: tuple[str, ...] = ()
    policy_ids: tuple[str, ...] = ()

    def met_by(self, votes: Sequence[tuple[str, Sequence[str]]]) -> bool:
        """Whether approvals by ``votes`` ((approver, their roles), distinct) are enough."""
        held = {role for _, roles in votes for role in roles}
        return len(votes) >= self.approvers and all(role in held for role in self.roles)

    def missing(self, votes: Sequence[tuple[str, Sequence[str]]]) -> str:
        """What is still needed, in words ("" when met)."""
        held = {role for _, roles in votes for role in roles}
        parts = []
        if len(votes) < self.approvers:
            parts.append(f"{self.approvers - len(votes)} more approval(s)")
        lacking = [role for role in self.roles if role not in held]
        if lacking:
            parts.append("an approver with role " + " and ".join(lacking))
        return "; ".join(parts)


@dataclass(frozen=True)
class Vote:
    """One approval of an execution: who, with which roles then, why, when."""

    approver: str
    roles: tuple[str, ...]
    comment: str
    at: datetime


class IllegalTransition(RuntimeError):
    """A move the execution model does not allow (a bug in the caller, never user input)."""


Change = tuple[str, str, str]
"""One field change a provider reports: (field, before, after)."""


@dataclass(frozen=True)
class ExecutionRecord:
    """An execution as the domain sees it (no ORM state leaks out)."""

    execution_id: str
    tenant: str
    idempotency_key: str
    request_hash: str
    action_id: str
    provider_id: str
    record_type: str
    record_id: str
    actor: str
    outcome: ExecutionState
    started_at: datetime
    reason: str = ""
    message: str = ""
    external_ref: str = ""
    changes: tuple[Change, ...] = ()
    warnings: tuple[str, ...] = ()
    trace_id: str = ""
    finished_at: datetime | None = None
    request_payload: bytes = b""
    requester_roles: tuple[str, ...] = ()
    sensitive: bool = False
    approval_state: ApprovalState | None = None
    approval_expires_at: datetime | None = None
    approval_decided_at: datetime | None = None
    approver: str = ""
    approval_comment: str = ""
    late_outcome: Outcome | None = None
    late_result_at: datetime | None = None
    dispatch_deadline: datetime | None = None
    """When a RUNNING dispatch has written its outcome at the latest (see OrphanRule)."""
    facts: common_pb2.RecordFacts | None = None
    """The record's facts it was authorized on and who vouched for them (replaced by the
    facts at approval time when an approver decides)."""
    reconcile_state: ReconcileState = ReconcileState.NONE
    reconcile_attempts: int = 0
    """How many times the reconciler asked the provider (and got no final answer)."""
    reconcile_next_at: datetime | None = None
    """When the reconciler asks next (PENDING only)."""
    resolved_reason: str = ""
    """Why the resolved outcome is what it is (e.g. PROVIDER_NEVER_RECEIVED), or why the
    execution needs attention (RECONCILE_UNSUPPORTED, RECONCILE_GAVE_UP)."""
    accepted_at: datetime | None = None
    """Long-running: when the provider accepted the work (answered ACCEPTED)."""
    run_deadline: datetime | None = None
    """Long-running: when it must have finished (dispatch + the action's max duration)."""
    progress: common_pb2.ExecutionProgress | None = None
    """Long-running: the provider's last progress report."""
    cancel_requested_by: str = ""
    """Who asked to cancel the ACCEPTED execution (empty: nobody)."""
    cancel_requested_at: datetime | None = None
    cancel_comment: str = ""
    approvals_needed: int = 1
    """How many distinct approvers it needs (policy's ``quorum``, fixed when held)."""
    approver_roles_needed: tuple[str, ...] = ()
    """Roles that must be among its approvers."""
    votes: tuple[Vote, ...] = ()
    """The approvals counted so far (the last one dispatched it when the quorum was met)."""
    preview: common_pb2.ActionPreview | None = None
    """Held for approval: what the provider previewed (what the approvers approve); the
    dispatch carries its digest, so a record that moved since is refused."""

    @property
    def quorum(self) -> Quorum:
        return Quorum(approvers=self.approvals_needed, roles=self.approver_roles_needed)

    def quorum_met_with(self, vote: Vote) -> bool:
        """Whether the approvals so far and ``vote`` make the quorum."""
        return self.quorum.met_by([(v.approver, v.roles) for v in (*self.votes, vote)])

    def counted(self, approver: str) -> bool:
        return any(v.approver == approver for v in self.votes)

    @property
    def nothing_ran(self) -> bool:
        """The provider did not act: UNAVAILABLE, or resolved as UNAVAILABLE afterwards.

        The same idempotency key may then dispatch again (see Claims).
        """
        return self.outcome is ExecutionState.UNAVAILABLE or (
            self.reconcile_state is ReconcileState.RESOLVED
            and self.late_outcome is Outcome.UNAVAILABLE
        )

    @property
    def finished(self) -> bool:
        """No dispatch is under way (pending approval counts: nothing runs until decided)."""
        return self.outcome is not ExecutionState.RUNNING

    # -- transitions ----------------------------------------------------------------
    def _require(self, move: str, *states: ExecutionState) -> None:
        if self.outcome not in states:
            raise IllegalTransition(
                f"execution {self.execution_id}: cannot {move} from {self.outcome.value}"
            )

    def awaiting_approval(
        self,
        *,
        expires_at: datetime,
        quorum: Quorum | None = None,
        preview: common_pb2.ActionPreview | None = None,
    ) -> ExecutionRecord:
        """A new execution held for approval (nothing dispatched) by ``quorum`` (one
        approver by default), with the ``preview`` its approvers see, if any."""
        self._require("hold for approval", ExecutionState.RUNNING)
        quorum = quorum or Quorum()
        if self.approval_state is not None:
            raise IllegalTransition(f"execution {self.execution_id} was already held once")
        return replace(
            self,
            outcome=ExecutionState.PENDING_APPROVAL,
            reason="APPROVAL_REQUIRED",
            message="the action needs a second person's approval; nothing ran yet",
            approval_state=ApprovalState.PENDING,
            approval_expires_at=expires_at,
            dispatch_deadline=None,
            approvals_needed=quorum.approvers,
            approver_roles_needed=quorum.roles,
            preview=preview,
        )

    def vote_counted(self, vote: Vote) -> ExecutionRecord:
        """One approval towards the quorum, which it does not complete: still pending."""
        self._require("count an approval", ExecutionState.PENDING_APPROVAL)
        if self.counted(vote.approver) or vote.approver == self.actor:
            raise IllegalTransition(f"{vote.approver} cannot count (again) for {self.execution_id}")
        if self.quorum_met_with(vote):
            raise IllegalTransition("this approval completes the quorum: approve it")
        return replace(self, votes=(*self.votes, vote))

    def approved(
        self,
        *,
        approver: str,
        comment: str,
        at: datetime,
        dispatch_deadline: datetime,
        facts: common_pb2.RecordFacts | None = None,
        roles: tuple[str, ...] = (),
    ) -> ExecutionRecord:
        """Approved by the approval that completes the quorum: dispatch starts now and must
        have ended by ``dispatch_deadline``; ``facts`` are the record's facts the
        requester was re-authorized on."""
        self._require("approve", ExecutionState.PENDING_APPROVAL)
        vote = Vote(approver, roles, comment, at)
        if self.counted(approver) or not self.quorum_met_with(vote):
            raise IllegalTransition(f"execution {self.execution_id}: the quorum is not met")
        return replace(
            self._decided(ApprovalState.APPROVED, approver, comment, at, facts),
            votes=(*self.votes, vote),
            outcome=ExecutionState.RUNNING,
            reason="",
            message="",
            dispatch_deadline=dispatch_deadline,
        )

    def ended_at_approval(
        self,
        *,
        approver: str,
        comment: str,
        at: datetime,
        outcome: Outcome,
        reason: str,
        message: str,
        facts: common_pb2.RecordFacts | None = None,
        roles: tuple[str, ...] = (),
    ) -> ExecutionRecord:
        """Approved, but ended before dispatch (policy or the provider said no)."""
        self._require("end at approval", ExecutionState.PENDING_APPROVAL)
        return self._closed(
            replace(
                self._decided(ApprovalState.APPROVED, approver, comment, at, facts),
                votes=(*self.votes, Vote(approver, roles, comment, at)),
            ),
            outcome,
            reason,
            message,
            at,
        )

    def rejected(self, *, approver: str, comment: str, at: datetime) -> ExecutionRecord:
        self._require("reject", ExecutionState.PENDING_APPROVAL)
        return self._closed(
            self._decided(ApprovalState.REJECTED, approver, comment, at),
            Outcome.DENIED,
            "APPROVAL_REJECTED",
            f"rejected by {approver}: {comment}",
            at,
        )

    def expired(self, *, at: datetime) -> ExecutionRecord:
        self._require("expire", ExecutionState.PENDING_APPROVAL)
        return self._closed(
            self._decided(ApprovalState.EXPIRED, "", "", at),
            Outcome.DENIED,
            "APPROVAL_EXPIRED",
            "nobody approved the execution in time; nothing ran",
            at,
        )

    def finished_with(
        self,
        outcome: Outcome,
        *,
        at: datetime,
        reason: str = "",
        message: str = "",
        external_ref: str = "",
        changes: Sequence[Change] = (),
        warnings: Sequence[str] = (),
        reconcile_from: datetime | None = None,
    ) -> ExecutionRecord:
        """A dispatch's outcome (the provider's answer, or the gateway's verdict on it).

        An unsettled outcome is marked for reconciliation from ``reconcile_from``
        (default ``at``; later while this gateway still awaits a late answer).
        """
        self._require("finish", ExecutionState.RUNNING)
        return replace(
            self._closed(self, outcome, reason, message, at),
            external_ref=external_ref,
            changes=tuple(changes),
            warnings=tuple(warnings),
        )._marked_unsettled(reconcile_from or at)

    def with_late_result(
        self,
        outcome: Outcome,
        *,
        at: datetime,
        external_ref: str = "",
        changes: Sequence[Change] = (),
        warnings: Sequence[str] = (),
    ) -> ExecutionRecord:
        """The provider's answer after the execution closed as TIMED_OUT (its outcome stays)."""
        self._require("record a late result", ExecutionState.TIMED_OUT)
        if self.late_outcome is not None:
            raise IllegalTransition(f"execution {self.execution_id} has a late result already")
        return replace(
            self,
            late_outcome=outcome,
            late_result_at=at,
            external_ref=external_ref,
            changes=tuple(changes),
            warnings=tuple(warnings),
            reconcile_state=ReconcileState.RESOLVED,
            reconcile_next_at=None,
        )

    # -- reconciliation (unsettled outcomes) ----------------------------------------
    def _require_pending(self, move: str) -> None:
        # An ACCEPTED execution is followed (progressed, completed, ...), not reconciled.
        if (
            self.reconcile_state is not ReconcileState.PENDING
            or self.late_outcome is not None
            or self.outcome is ExecutionState.ACCEPTED
        ):
            raise IllegalTransition(
                f"execution {self.execution_id}: cannot {move} "
                f"(reconcile state {self.reconcile_state.value})"
            )

    def reconciled(
        self,
        outcome: Outcome,
        *,
        at: datetime,
        reason: str = "",
        external_ref: str = "",
        changes: Sequence[Change] = (),
        warnings: Sequence[str] = (),
    ) -> ExecutionRecord:
        """The provider said how the unsettled execution ended; what the caller was told stays."""
        self._require_pending("record a reconciled outcome")
        if ExecutionState(outcome.value) in (
            ExecutionState.RUNNING,
            ExecutionState.PENDING_APPROVAL,
            ExecutionState.ACCEPTED,
        ):
            raise IllegalTransition(f"{outcome.value} is not a final outcome")
        return replace(
            self,
            late_outcome=outcome,
            late_result_at=at,
            resolved_reason=reason,
            external_ref=external_ref,
            changes=tuple(changes),
            warnings=tuple(warnings),
            reconcile_state=ReconcileState.RESOLVED,
            reconcile_next_at=None,
        )

    def never_received(self, *, at: datetime) -> ExecutionRecord:
        """The provider never received the request: resolved as UNAVAILABLE, nothing ran."""
        return self.reconciled(Outcome.UNAVAILABLE, at=at, reason=NEVER_RECEIVED_REASON)

    def reconcile_later(self, *, next_at: datetime) -> ExecutionRecord:
        """No final answer yet (still running, provider unreachable): ask again at ``next_at``."""
        self._require_pending("reconcile later")
        return replace(
            self, reconcile_attempts=self.reconcile_attempts + 1, reconcile_next_at=next_at
        )

    def needs_attention(self, *, reason: str) -> ExecutionRecord:
        """The gateway cannot find out (unsupported, or gave up): a person must."""
        self._require_pending("hand over to a person")
        return replace(
            self,
            reconcile_state=ReconcileState.NEEDS_ATTENTION,
            reconcile_attempts=self.reconcile_attempts + 1,
            reconcile_next_at=None,
            resolved_reason=reason,
        )

    # -- long-running actions ---------------------------------------------------------
    def accepted(
        self,
        *,
        at: datetime,
        poll_at: datetime,
        run_deadline: datetime,
        message: str = "",
        external_ref: str = "",
    ) -> ExecutionRecord:
        """The provider accepted a long-running action: followed until it ends."""
        self._require("accept", ExecutionState.RUNNING)
        return replace(
            self,
            outcome=ExecutionState.ACCEPTED,
            reason="",
            message=message or "accepted by the provider; running",
            external_ref=external_ref,
            accepted_at=at,
            run_deadline=run_deadline,
            dispatch_deadline=None,
            reconcile_state=ReconcileState.PENDING,
            reconcile_attempts=0,
            reconcile_next_at=poll_at,
        )

    def progressed(
        self, *, next_at: datetime, progress: common_pb2.ExecutionProgress | None = None
    ) -> ExecutionRecord:
        """Still running at the provider (with its ``progress`` when it reported some)."""
        self._require("record progress", ExecutionState.ACCEPTED)
        return replace(
            self,
            progress=progress if progress is not None else self.progress,
            reconcile_next_at=next_at,
        )

    def completed(
        self,
        outcome: Outcome,
        *,
        at: datetime,
        reason: str = "",
        message: str = "",
        external_ref: str = "",
        changes: Sequence[Change] = (),
        warnings: Sequence[str] = (),
    ) -> ExecutionRecord:
        """The provider's final answer on an ACCEPTED execution: it becomes the outcome."""
        self._require("complete", ExecutionState.ACCEPTED)
        if outcome is Outcome.ACCEPTED:
            raise IllegalTransition("ACCEPTED is not a final outcome")
        return replace(
            self._closed(self, outcome, reason, message, at),
            external_ref=external_ref or self.external_ref,
            changes=tuple(changes),
            warnings=tuple(warnings),
            reconcile_state=ReconcileState.NONE,
            reconcile_attempts=0,
            reconcile_next_at=None,
        )._marked_unsettled(at)

    def overran(self, *, at: datetime) -> ExecutionRecord:
        """Past its maximum duration: TIMED_OUT, and reconciled like any TIMED_OUT."""
        return self._timed_out_running(
            at,
            OVERRAN_REASON,
            "the action ran past its maximum duration; the provider was asked to stop. "
            "It may have acted partly; its final answer is recorded when it gives one",
        )

    def lost(self, *, at: datetime) -> ExecutionRecord:
        """Its provider no longer knows the accepted execution (restarted, lost its state)."""
        return self._timed_out_running(
            at,
            LOST_REASON,
            "the provider accepted the action but no longer knows it; it may have acted partly",
        )

    def _timed_out_running(self, at: datetime, reason: str, message: str) -> ExecutionRecord:
        self._require("time out", ExecutionState.ACCEPTED)
        return replace(
            self._closed(self, Outcome.TIMED_OUT, reason, message, at),
            reconcile_state=ReconcileState.NONE,
        )._marked_unsettled(at)

    def cancel_requested(self, *, by: str, comment: str, at: datetime) -> ExecutionRecord:
        """Someone asked to stop the ACCEPTED execution: the provider is asked now and at
        every question until it ends."""
        self._require("cancel", ExecutionState.ACCEPTED)
        if self.cancel_requested_by:
            raise IllegalTransition(f"execution {self.execution_id}: cancel already requested")
        return replace(
            self,
            cancel_requested_by=by,
            cancel_requested_at=at,
            cancel_comment=comment,
            reconcile_next_at=at,
        )

    def resolved_by_person(
        self, outcome: Outcome, *, at: datetime, external_ref: str = ""
    ) -> ExecutionRecord:
        """A person found out what became of an unsettled execution (one the gateway gave
        up on, or is still asking about): RESOLVED with their finding; told stays."""
        if (
            self.reconcile_state not in (ReconcileState.PENDING, ReconcileState.NEEDS_ATTENTION)
            or self.late_outcome is not None
            or self.outcome is ExecutionState.ACCEPTED
        ):
            raise IllegalTransition(
                f"execution {self.execution_id}: nothing to resolve "
                f"(reconcile state {self.reconcile_state.value})"
            )
        if outcome not in PERSON_OUTCOMES:
            raise IllegalTransition(f"{outcome.value} is not an outcome a provider can reach")
        return replace(
            self,
            late_outcome=outcome,
            late_result_at=at,
            resolved_reason=RESOLVED_BY_PERSON,
            external_ref=external_ref or self.external_ref,
            reconcile_state=ReconcileState.RESOLVED,
            reconcile_next_at=None,
        )

    def _marked_unsettled(self, at: datetime) -> ExecutionRecord:
        if not unsettled(self.outcome, self.reason):
            return self
        return replace(
            self, reconcile_state=ReconcileState.PENDING, reconcile_attempts=0, reconcile_next_at=at
        )

    def orphaned(self, *, at: datetime) -> ExecutionRecord:
        """Closed because its gateway stopped mid-dispatch (see OrphanRule)."""
        self._require("close as orphaned", ExecutionState.RUNNING)
        closed = self._closed(self, ORPHAN_OUTCOME, ORPHAN_REASON, ORPHAN_MESSAGE, at)
        return closed._marked_unsettled(at)

    def reclaimed(self, *, dispatch_deadline: datetime) -> ExecutionRecord:
        """Nothing ran (UNAVAILABLE, or resolved so): back to RUNNING, the same key dispatches
        again and the resolution starts over."""
        if not self.nothing_ran:
            raise IllegalTransition(
                f"execution {self.execution_id}: cannot dispatch again from {self.outcome.value}"
            )
        return replace(
            self,
            outcome=ExecutionState.RUNNING,
            finished_at=None,
            dispatch_deadline=dispatch_deadline,
            late_outcome=None,
            late_result_at=None,
            resolved_reason="",
            reconcile_state=ReconcileState.NONE,
            reconcile_attempts=0,
            reconcile_next_at=None,
        )

    def _decided(
        self,
        state: ApprovalState,
        approver: str,
        comment: str,
        at: datetime,
        facts: common_pb2.RecordFacts | None = None,
    ) -> ExecutionRecord:
        return replace(
            self,
            approval_state=state,
            approver=approver,
            approval_comment=comment,
            approval_decided_at=at,
            facts=facts if facts is not None else self.facts,
        )

    @staticmethod
    def _closed(
        record: ExecutionRecord, outcome: Outcome, reason: str, message: str, at: datetime
    ) -> ExecutionRecord:
        state = ExecutionState(outcome.value)
        if state.outcome is None or state in (
            ExecutionState.PENDING_APPROVAL,
            ExecutionState.ACCEPTED,
        ):
            raise IllegalTransition(f"{outcome.value} is not a final outcome")
        return replace(
            record,
            outcome=state,
            reason=reason,
            message=message,
            finished_at=at,
        )


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

    def on(self, record: common_pb2.RecordContext) -> ExecuteCommand:
        """The same request on ``record`` (e.g. the record as it is at approval)."""
        return replace(self, record=record, has_record=True)

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
