"""Builds the audit events the gateway emits for executions and attempts."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from actionmesh.rpc.convert import display_input, to_timestamp, utcnow
from actionmesh.rpc.telemetry import current_trace_ids
from actionmesh.v1 import audit_pb2, common_pb2
from gateway.auth import Caller


def audit_event(
    event_type: audit_pb2.AuditEventType.ValueType,
    *,
    caller: Caller,
    record: common_pb2.RecordContext,
    execution_id: str,
    action_id: str,
    provider_id: str = "",
    outcome: common_pb2.Outcome.ValueType = common_pb2.OUTCOME_UNSPECIFIED,
    reason: str = "",
    message: str = "",
    idempotency_key: str = "",
    inputs: Mapping[str, common_pb2.InputValue] | None = None,
    policy_ids: Sequence[str] = (),
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    external_ref: str = "",
    changes: Sequence[tuple[str, str, str]] = (),
    warnings: Sequence[str] = (),
) -> audit_pb2.AuditEvent:
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
        inputs={name: display_input(value) for name, value in (inputs or {}).items()},
    )
    if started_at is not None:
        event.started_at.CopyFrom(to_timestamp(started_at))
    if finished_at is not None:
        event.finished_at.CopyFrom(to_timestamp(finished_at))
    return event
