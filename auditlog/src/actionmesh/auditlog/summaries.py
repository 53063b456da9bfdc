"""One summary per execution, folded from its events as they are stored.

The events stay the evidence; a summary is a derived index that makes "what did
alice run yesterday, and how did it end" one query instead of a scan. Folding is
order-tolerant: events of one execution can arrive out of order (two gateway
replicas, an outbox catching up), so a state-changing event only wins over the
current state when it did not happen earlier than what set that state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from actionmesh.rpc.convert import from_timestamp, to_timestamp
from actionmesh.v1 import audit_pb2, common_pb2

_T = audit_pb2
# Events whose actor asked for the execution (as opposed to deciding on it).
_REQUESTER_EVENTS = {
    _T.AUDIT_EVENT_TYPE_APPROVAL_REQUESTED,
    _T.AUDIT_EVENT_TYPE_EXECUTION_STARTED,
    _T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
}
_DECIDER_EVENTS = {_T.AUDIT_EVENT_TYPE_APPROVAL_GRANTED, _T.AUDIT_EVENT_TYPE_APPROVAL_REJECTED}
# Events that end an execution: their outcome is the execution's outcome.
_FINAL_EVENTS = {
    _T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
    _T.AUDIT_EVENT_TYPE_APPROVAL_REJECTED,
    _T.AUDIT_EVENT_TYPE_APPROVAL_EXPIRED,
}
# Events after which the execution is under way again (or waiting): no outcome yet.
_OPEN_EVENTS = {
    _T.AUDIT_EVENT_TYPE_APPROVAL_REQUESTED,
    _T.AUDIT_EVENT_TYPE_APPROVAL_GRANTED,
    _T.AUDIT_EVENT_TYPE_EXECUTION_STARTED,
    # A long-running action accepted by its provider: at work, not final.
    _T.AUDIT_EVENT_TYPE_EXECUTION_ACCEPTED,
}
_EPOCH = datetime.min.replace(tzinfo=UTC)


@dataclass
class Summary:
    """The mutable state of one execution's summary (a row of ``audit_executions``)."""

    tenant: str
    execution_id: str
    first_sequence: int
    record_type: str = ""
    record_id: str = ""
    action_id: str = ""
    provider_id: str = ""
    actor: str = ""
    approver: str = ""
    outcome: str = "OUTCOME_UNSPECIFIED"
    reason: str = ""
    external_ref: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    trace_id: str = ""
    late_outcome: str = "OUTCOME_UNSPECIFIED"
    last_event_type: str = ""
    last_event_at: datetime | None = None
    state_at: datetime | None = None
    event_count: int = 0
    # Set by the store: whether this summary already has a row.
    stored: bool = field(default=False, compare=False)


# The stored state of a summary besides its key (tenant, execution_id): the
# columns of ``audit_executions`` that a fold writes.
SUMMARY_FIELDS = tuple(
    f.name for f in fields(Summary) if f.name not in ("tenant", "execution_id", "stored")
)


def _when(event: audit_pb2.AuditEvent) -> datetime:
    return from_timestamp(event.occurred_at) if event.HasField("occurred_at") else _EPOCH


def fold(summary: Summary, event: audit_pb2.AuditEvent, sequence: int) -> None:
    """Apply one stored event to its execution's summary."""
    when = _when(event)
    summary.event_count += 1
    summary.first_sequence = min(summary.first_sequence, sequence)
    summary.record_type = summary.record_type or event.record.type
    summary.record_id = summary.record_id or event.record.id
    summary.action_id = summary.action_id or event.action_id
    summary.provider_id = summary.provider_id or event.provider_id
    summary.trace_id = summary.trace_id or event.trace_id
    if summary.started_at is None or when < summary.started_at:
        summary.started_at = when
    if summary.last_event_at is None or when >= summary.last_event_at:
        summary.last_event_at = when
        summary.last_event_type = audit_pb2.AuditEventType.Name(event.type)
    if event.type in _REQUESTER_EVENTS and not summary.actor:
        summary.actor = event.actor
    if event.type in _DECIDER_EVENTS:
        summary.approver = event.actor
    if event.type in (
        _T.AUDIT_EVENT_TYPE_EXECUTION_LATE_RESULT,
        # The outcome the gateway learned from the provider afterwards (it stays what
        # the caller was told; NEEDS_ATTENTION changes neither).
        _T.AUDIT_EVENT_TYPE_EXECUTION_RECONCILED,
    ):
        summary.late_outcome = common_pb2.Outcome.Name(event.outcome)
        return
    if event.type not in _FINAL_EVENTS | _OPEN_EVENTS:
        return  # refusals and discovery do not change an execution's state
    if summary.state_at is not None and when < summary.state_at:
        return
    if summary.state_at is not None and when == summary.state_at and event.type in _OPEN_EVENTS:
        return  # same instant: a final event is the later step
    summary.state_at = when
    if event.type in _FINAL_EVENTS:
        summary.outcome = common_pb2.Outcome.Name(event.outcome)
        summary.reason = event.reason
        summary.external_ref = event.external_ref
        summary.finished_at = when
    else:
        pending = event.type == _T.AUDIT_EVENT_TYPE_APPROVAL_REQUESTED
        summary.outcome = "OUTCOME_PENDING_APPROVAL" if pending else "OUTCOME_UNSPECIFIED"
        if event.type == _T.AUDIT_EVENT_TYPE_EXECUTION_ACCEPTED:
            summary.outcome = "OUTCOME_ACCEPTED"
            summary.external_ref = event.external_ref
        summary.reason = ""
        summary.finished_at = None


def to_message(summary: Summary) -> audit_pb2.ExecutionSummary:
    """The summary as the contract's ``ExecutionSummary``."""
    message = audit_pb2.ExecutionSummary(
        execution_id=summary.execution_id,
        tenant=summary.tenant,
        record=common_pb2.RecordRef(type=summary.record_type, id=summary.record_id),
        action_id=summary.action_id,
        provider_id=summary.provider_id,
        actor=summary.actor,
        approver=summary.approver,
        outcome=common_pb2.Outcome.Value(summary.outcome),
        reason=summary.reason,
        external_ref=summary.external_ref,
        trace_id=summary.trace_id,
        late_outcome=common_pb2.Outcome.Value(summary.late_outcome),
        event_count=summary.event_count,
    )
    if summary.last_event_type:
        message.last_event_type = audit_pb2.AuditEventType.Value(summary.last_event_type)
    if summary.started_at is not None:
        message.started_at.CopyFrom(to_timestamp(summary.started_at))
    if summary.finished_at is not None:
        message.finished_at.CopyFrom(to_timestamp(summary.finished_at))
    return message
