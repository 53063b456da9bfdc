"""Builds the audit events the gateway emits for executions, approvals and discovery."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from actionmesh.gateway.auth import Caller
from actionmesh.rpc.convert import to_timestamp, utcnow
from actionmesh.rpc.telemetry import current_trace_ids
from actionmesh.v1 import audit_pb2, common_pb2


def audit_event(
    event_type: audit_pb2.AuditEventType.ValueType,
    *,
    caller: Caller,
    record: common_pb2.RecordContext | common_pb2.RecordRef,
    execution_id: str = "",
    action_id: str = "",
    provider_id: str = "",
    outcome: common_pb2.Outcome.ValueType = common_pb2.OUTCOME_UNSPECIFIED,
    reason: str = "",
    message: str = "",
    idempotency_key: str = "",
    inputs: Mapping[str, str] | None = None,
    inputs_redacted: bool = False,
    policy_ids: Sequence[str] = (),
    policy_decisions: Sequence[audit_pb2.PolicyDecision] = (),
    policy_context: Mapping[str, str] | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    external_ref: str = "",
    changes: Sequence[tuple[str, str, str]] = (),
    warnings: Sequence[str] = (),
    facts: common_pb2.RecordFacts | None = None,
    preview: common_pb2.ActionPreview | None = None,
) -> audit_pb2.AuditEvent:
    """One event; ``inputs`` are already display strings or digests (see Redactor)."""
    trace_id, span_id = current_trace_ids()
    event = audit_pb2.AuditEvent(
        event_id=uuid.uuid4().hex,
        type=event_type,
        occurred_at=to_timestamp(utcnow()),
        # Evidence is filed under the caller's tenant, even when the record named another.
        tenant=caller.tenant,
        record=common_pb2.RecordRef(type=record.type, id=record.id),
        actor=caller.subject,
        action_id=action_id,
        provider_id=provider_id,
        execution_id=execution_id,
        outcome=outcome,
        reason=reason,
        message=message,
        external_ref=external_ref,
        changes=[common_pb2.FieldChange(field=f, before=b, after=a) for f, b, a in changes],
        warnings=list(warnings),
        trace_id=trace_id,
        span_id=span_id,
        idempotency_key=idempotency_key,
        policy_ids=list(policy_ids),
        policy_decisions=list(policy_decisions),
        policy_context=dict(policy_context or {}),
        inputs=dict(inputs or {}),
        inputs_redacted=inputs_redacted,
    )
    if facts is not None:
        event.facts.CopyFrom(facts)
    if preview is not None:
        event.preview.CopyFrom(preview)
    if started_at is not None:
        event.started_at.CopyFrom(to_timestamp(started_at))
    if finished_at is not None:
        event.finished_at.CopyFrom(to_timestamp(finished_at))
    return event
