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
    ReconcileState,
)
from actionmesh.gateway.reconciler import ReconcileSettings
from actionmesh.rpc.outcomes import Outcome
from actionmesh.v1 import common_pb2

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


def test_unsettled_outcomes_are_marked_to_reconcile_and_settled_ones_are_not() -> None:
    timed_out = fresh().finished_with(Outcome.TIMED_OUT, at=NOW, reconcile_from=LATER)
    assert (timed_out.reconcile_state, timed_out.reconcile_next_at) == (
        ReconcileState.PENDING,
        LATER,
    )
    unknown = fresh().finished_with(Outcome.PARTIAL, at=NOW, reason="DOWNSTREAM_OUTCOME_UNKNOWN")
    assert (unknown.reconcile_state, unknown.reconcile_next_at) == (ReconcileState.PENDING, NOW)
    orphan = fresh().orphaned(at=NOW)
    assert orphan.reconcile_state is ReconcileState.PENDING
    for outcome, reason in (
        (Outcome.SUCCEEDED, ""),
        (Outcome.PARTIAL, "PROVIDER_ERROR"),
        (Outcome.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ):
        settled = fresh().finished_with(outcome, at=NOW, reason=reason)
        assert settled.reconcile_state is ReconcileState.NONE
    # A late answer settles it as well.
    late = timed_out.with_late_result(Outcome.SUCCEEDED, at=LATER, external_ref="x")
    assert late.reconcile_state is ReconcileState.RESOLVED and late.reconcile_next_at is None


def test_reconciling_keeps_what_the_caller_was_told_and_settles_once() -> None:
    told = fresh().finished_with(Outcome.TIMED_OUT, at=NOW, reason="DEADLINE_EXCEEDED")
    later = told.reconcile_later(next_at=LATER)
    assert (later.reconcile_attempts, later.reconcile_next_at) == (1, LATER)
    resolved = later.reconciled(Outcome.SUCCEEDED, at=LATER, external_ref="ref-1")
    assert (resolved.outcome, resolved.reason) == (ExecutionState.TIMED_OUT, "DEADLINE_EXCEEDED")
    assert (resolved.late_outcome, resolved.external_ref) == (Outcome.SUCCEEDED, "ref-1")
    assert resolved.reconcile_state is ReconcileState.RESOLVED and not resolved.nothing_ran
    for move in (
        lambda r: r.reconciled(Outcome.REJECTED, at=LATER),
        lambda r: r.never_received(at=LATER),
        lambda r: r.reconcile_later(next_at=LATER),
        lambda r: r.needs_attention(reason="RECONCILE_GAVE_UP"),
        lambda r: r.reclaimed(dispatch_deadline=LATER),
    ):
        with pytest.raises(IllegalTransition):
            move(resolved)
    with pytest.raises(IllegalTransition):
        fresh().finished_with(Outcome.SUCCEEDED, at=NOW).reconcile_later(next_at=LATER)
    with pytest.raises(IllegalTransition):
        told.reconciled(Outcome.PENDING_APPROVAL, at=LATER)


def test_never_received_means_nothing_ran_so_the_same_key_dispatches_again() -> None:
    orphan = fresh().orphaned(at=NOW)
    with pytest.raises(IllegalTransition):
        orphan.reclaimed(dispatch_deadline=LATER)
    nothing = orphan.never_received(at=LATER)
    assert nothing.nothing_ran and nothing.late_outcome is Outcome.UNAVAILABLE
    assert nothing.resolved_reason == "PROVIDER_NEVER_RECEIVED"
    again = nothing.reclaimed(dispatch_deadline=LATER)
    assert again.outcome is ExecutionState.RUNNING and again.late_outcome is None
    assert again.reconcile_state is ReconcileState.NONE and again.reconcile_attempts == 0


def test_needing_attention_is_final() -> None:
    attention = fresh().orphaned(at=NOW).needs_attention(reason="RECONCILE_UNSUPPORTED")
    assert attention.reconcile_state is ReconcileState.NEEDS_ATTENTION
    assert attention.resolved_reason == "RECONCILE_UNSUPPORTED" and not attention.nothing_ran
    with pytest.raises(IllegalTransition):
        attention.reconciled(Outcome.SUCCEEDED, at=LATER)


def test_the_reconcile_backoff_doubles_up_to_its_cap() -> None:
    settings = ReconcileSettings(
        interval_s=5, max_backoff_s=30, max_attempts=10, max_age_s=60, status_timeout_s=1, lease_s=5
    )
    assert [settings.backoff(n).total_seconds() for n in range(1, 6)] == [5, 10, 20, 30, 30]


# -- long-running actions ---------------------------------------------------------------


def accepted() -> ExecutionRecord:
    return fresh().accepted(
        at=NOW, poll_at=LATER, run_deadline=NOW + timedelta(hours=1), external_ref="SD-1"
    )


def progress(message: str, percent: int | None = None) -> common_pb2.ExecutionProgress:
    report = common_pb2.ExecutionProgress(message=message)
    if percent is not None:
        report.percent = percent
    return report


def test_an_accepted_execution_is_followed_not_final() -> None:
    running = accepted()
    assert running.outcome is ExecutionState.ACCEPTED
    assert running.outcome.outcome is Outcome.ACCEPTED
    assert running.finished_at is None and running.dispatch_deadline is None
    # Followed by the reconciler from its first poll on, until its run deadline.
    assert (running.reconcile_state, running.reconcile_next_at) == (ReconcileState.PENDING, LATER)
    assert running.external_ref == "SD-1" and running.accepted_at == NOW
    # Neither a dispatch's nor a reconcile's moves apply to it.
    for move in (
        lambda: running.finished_with(Outcome.SUCCEEDED, at=LATER),
        lambda: running.orphaned(at=LATER),
        lambda: running.with_late_result(Outcome.SUCCEEDED, at=LATER),
        lambda: running.reconciled(Outcome.SUCCEEDED, at=LATER),
        lambda: fresh().progressed(next_at=LATER),
        lambda: running.accepted(at=NOW, poll_at=LATER, run_deadline=LATER),
    ):
        with pytest.raises(IllegalTransition):
            move()


def test_progress_is_kept_and_the_final_answer_becomes_the_outcome() -> None:
    halfway = accepted().progressed(next_at=LATER, progress=progress("copying", 50))
    assert halfway.progress is not None and halfway.progress.percent == 50
    # A question without a report keeps the last one.
    assert halfway.progressed(next_at=LATER).progress == halfway.progress
    done = halfway.completed(Outcome.SUCCEEDED, at=LATER, changes=[("f", "a", "b")])
    assert (done.outcome, done.finished_at, done.reconcile_state) == (
        ExecutionState.SUCCEEDED,
        LATER,
        ReconcileState.NONE,
    )
    assert done.external_ref == "SD-1" and done.changes == (("f", "a", "b"),)
    with pytest.raises(IllegalTransition):
        done.completed(Outcome.REJECTED, at=LATER)
    with pytest.raises(IllegalTransition):
        accepted().completed(Outcome.ACCEPTED, at=LATER)
    # A final answer that leaves open what happened downstream is reconciled as usual.
    unknown = accepted().completed(Outcome.PARTIAL, at=LATER, reason="DOWNSTREAM_OUTCOME_UNKNOWN")
    assert unknown.reconcile_state is ReconcileState.PENDING


def test_cancelled_is_a_final_outcome_and_a_cancel_is_asked_once() -> None:
    asked = accepted().cancel_requested(by="bob", comment="wrong case", at=LATER)
    assert (asked.cancel_requested_by, asked.cancel_comment, asked.reconcile_next_at) == (
        "bob",
        "wrong case",
        LATER,
    )
    with pytest.raises(IllegalTransition):
        asked.cancel_requested(by="carol", comment="again", at=LATER)
    stopped = asked.completed(Outcome.CANCELLED, at=LATER)
    assert stopped.outcome is ExecutionState.CANCELLED and stopped.finished
    assert stopped.reconcile_state is ReconcileState.NONE
    with pytest.raises(IllegalTransition):
        stopped.cancel_requested(by="bob", comment="late", at=LATER)


def test_overrunning_or_being_lost_times_out_and_is_reconciled() -> None:
    for ended, reason in (
        (accepted().overran(at=LATER), "MAX_DURATION_EXCEEDED"),
        (accepted().lost(at=LATER), "PROVIDER_LOST_EXECUTION"),
    ):
        assert (ended.outcome, ended.reason) == (ExecutionState.TIMED_OUT, reason)
        assert (ended.reconcile_state, ended.reconcile_next_at) == (ReconcileState.PENDING, LATER)
        settled = ended.reconciled(Outcome.CANCELLED, at=LATER)
        assert settled.late_outcome is Outcome.CANCELLED
        assert settled.outcome is ExecutionState.TIMED_OUT


def test_a_person_resolves_an_unsettled_execution_once() -> None:
    told = fresh().finished_with(Outcome.TIMED_OUT, at=LATER)
    stuck = told.needs_attention(reason="RECONCILE_GAVE_UP")
    for row in (told, stuck):
        resolved = row.resolved_by_person(Outcome.SUCCEEDED, at=LATER, external_ref="X-1")
        assert (resolved.reconcile_state, resolved.late_outcome, resolved.resolved_reason) == (
            ReconcileState.RESOLVED,
            Outcome.SUCCEEDED,
            "RESOLVED_BY_PERSON",
        )
        assert resolved.outcome is ExecutionState.TIMED_OUT and resolved.external_ref == "X-1"
        with pytest.raises(IllegalTransition):
            resolved.resolved_by_person(Outcome.REJECTED, at=LATER)
    # Nothing ran: the same key may dispatch again.
    assert stuck.resolved_by_person(Outcome.UNAVAILABLE, at=LATER).nothing_ran
    for outcome in (Outcome.TIMED_OUT, Outcome.ACCEPTED, Outcome.DENIED):
        with pytest.raises(IllegalTransition):
            stuck.resolved_by_person(outcome, at=LATER)
    for settled in (fresh().finished_with(Outcome.SUCCEEDED, at=LATER), accepted()):
        with pytest.raises(IllegalTransition):
            settled.resolved_by_person(Outcome.SUCCEEDED, at=LATER)


def test_a_provider_stopped_mid_action_is_unsettled_like_an_unknown_downstream() -> None:
    for reason in ("DOWNSTREAM_OUTCOME_UNKNOWN", "PROVIDER_STOPPED"):
        ended = accepted().completed(Outcome.PARTIAL, at=LATER, reason=reason)
        assert ended.reconcile_state is ReconcileState.PENDING, reason
    known = accepted().completed(Outcome.PARTIAL, at=LATER, reason="ESCALATION_LOG_FAILED")
    assert known.reconcile_state is ReconcileState.NONE
