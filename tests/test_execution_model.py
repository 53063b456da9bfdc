"""The execution model's legal moves, and that every other move is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from actionmesh.gateway.model import (
    ORPHAN_REASON,
    ApprovalState,
    ExecutionRecord,
    ExecutionState,
    IllegalTransition,
)
from actionmesh.rpc.outcomes import Outcome

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=30)


def fresh() -> ExecutionRecord:
    return ExecutionRecord(
        execution_id="e-1",
        tenant="acme",
        idempotency_key="k-1",
        request_hash="h",
        action_id="workitem.retry",
        provider_id="workitems",
        record_type="workitem",
        record_id="wi-1",
        actor="alice",
        outcome=ExecutionState.RUNNING,
        started_at=NOW,
        dispatch_deadline=LATER,
    )


def pending() -> ExecutionRecord:
    return fresh().awaiting_approval(expires_at=NOW + timedelta(hours=1))


def test_a_held_execution_waits_without_a_dispatch_deadline() -> None:
    held = pending()
    assert (held.outcome, held.approval_state) == (
        ExecutionState.PENDING_APPROVAL,
        ApprovalState.PENDING,
    )
    assert held.dispatch_deadline is None and held.finished and held.reason == "APPROVAL_REQUIRED"
    with pytest.raises(IllegalTransition):
        held.awaiting_approval(expires_at=LATER)


def test_approval_starts_a_dispatch_and_each_decision_closes_it_once() -> None:
    approved = pending().approved(approver="sam", comment="ok", at=NOW, dispatch_deadline=LATER)
    assert approved.outcome is ExecutionState.RUNNING and not approved.finished
    assert (approved.approval_state, approved.approver, approved.dispatch_deadline) == (
        ApprovalState.APPROVED,
        "sam",
        LATER,
    )
    rejected = pending().rejected(approver="rita", comment="no", at=NOW)
    assert (rejected.outcome, rejected.reason, rejected.finished_at) == (
        ExecutionState.DENIED,
        "APPROVAL_REJECTED",
        NOW,
    )
    expired = pending().expired(at=NOW)
    assert (expired.approval_state, expired.reason) == (ApprovalState.EXPIRED, "APPROVAL_EXPIRED")
    ended = pending().ended_at_approval(
        approver="sam",
        comment="",
        at=NOW,
        outcome=Outcome.UNAVAILABLE,
        reason="PROVIDER_UNAVAILABLE",
        message="nothing ran",
    )
    assert ended.outcome is ExecutionState.UNAVAILABLE
    for decided in (approved, rejected, expired, ended):
        with pytest.raises(IllegalTransition):
            decided.rejected(approver="x", comment="again", at=LATER)
        with pytest.raises(IllegalTransition):
            decided.expired(at=LATER)


def test_a_dispatch_finishes_once_and_only_with_a_final_outcome() -> None:
    done = fresh().finished_with(Outcome.SUCCEEDED, at=LATER, changes=[("status", "a", "b")])
    assert (done.outcome, done.finished_at, done.changes) == (
        ExecutionState.SUCCEEDED,
        LATER,
        (("status", "a", "b"),),
    )
    with pytest.raises(IllegalTransition):
        done.finished_with(Outcome.PARTIAL, at=LATER)
    with pytest.raises(IllegalTransition):
        fresh().finished_with(Outcome.PENDING_APPROVAL, at=LATER)
    with pytest.raises(IllegalTransition):
        pending().finished_with(Outcome.SUCCEEDED, at=LATER)


def test_only_a_timed_out_execution_takes_one_late_result() -> None:
    timed_out = fresh().finished_with(Outcome.TIMED_OUT, at=LATER, reason="DEADLINE_EXCEEDED")
    late = timed_out.with_late_result(Outcome.SUCCEEDED, at=LATER, external_ref="x-1")
    assert (late.outcome, late.late_outcome, late.external_ref) == (
        ExecutionState.TIMED_OUT,
        Outcome.SUCCEEDED,
        "x-1",
    )
    with pytest.raises(IllegalTransition):
        late.with_late_result(Outcome.SUCCEEDED, at=LATER)
    with pytest.raises(IllegalTransition):
        fresh().finished_with(Outcome.SUCCEEDED, at=LATER).with_late_result(
            Outcome.SUCCEEDED, at=LATER
        )


def test_orphans_and_reclaims_start_from_the_one_state_they_may() -> None:
    orphan = fresh().orphaned(at=LATER)
    assert (orphan.outcome, orphan.reason) == (ExecutionState.TIMED_OUT, ORPHAN_REASON)
    with pytest.raises(IllegalTransition):
        pending().orphaned(at=LATER)
    unavailable = fresh().finished_with(Outcome.UNAVAILABLE, at=NOW)
    again = unavailable.reclaimed(dispatch_deadline=LATER)
    assert (again.outcome, again.finished_at, again.dispatch_deadline) == (
        ExecutionState.RUNNING,
        None,
        LATER,
    )
    with pytest.raises(IllegalTransition):
        orphan.reclaimed(dispatch_deadline=LATER)


def test_records_are_values() -> None:
    record = fresh()
    with pytest.raises(AttributeError):
        record.outcome = ExecutionState.SUCCEEDED  # type: ignore[misc]
