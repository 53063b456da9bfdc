"""How the audit write shows up in an execution's trace, and the audit log's counters.

Events reach the audit log in batches shipped from the gateway's outbox, in a
trace of their own. Each event names the span it was written in (trace_id,
span_id), so for every event appended the audit log records one short
``audit.store`` span whose parent is that span (a remote parent) and which
links to the AppendEvents server span: the execution's trace then ends with
its evidence being stored, and the delivery is one click away.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry import metrics, trace
from opentelemetry.trace import Link, NonRecordingSpan

from actionmesh.auditlog.events import AuditLog
from actionmesh.auditlog.storage import AppendResult
from actionmesh.rpc.telemetry import span_context_from_ids
from actionmesh.v1 import audit_pb2, common_pb2

tracer = trace.get_tracer("actionmesh.auditlog")
_meter = metrics.get_meter("actionmesh.auditlog")
EVENTS_STORED = _meter.create_counter(
    "actionmesh.audit.events.stored",
    unit="{event}",
    description="Audit events newly stored.",
)
EVENTS_DUPLICATES = _meter.create_counter(
    "actionmesh.audit.events.duplicates",
    unit="{event}",
    description="Audit events received again (same event id) and not stored twice.",
)


async def traced_append(
    audit_log: AuditLog, events: Sequence[audit_pb2.AuditEvent]
) -> AppendResult:
    """Append a batch, then trace and count what was written."""
    started = time.time_ns()
    result = await audit_log.append(events)
    ended = time.time_ns()
    EVENTS_STORED.add(result.stored)
    EVENTS_DUPLICATES.add(result.duplicates)
    record_stored(events, started, ended)
    return result


def record_stored(events: Sequence[audit_pb2.AuditEvent], started_ns: int, ended_ns: int) -> None:
    """One ``audit.store`` span per event, spanning the store's write of the batch."""
    call = trace.get_current_span().get_span_context()
    links = [Link(call)] if call.is_valid else []
    for event in events:
        parent = span_context_from_ids(event.trace_id, event.span_id)
        # An event without a trace (written outside any span) stays under the call.
        context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
        span = tracer.start_span(
            "audit.store",
            context=context,
            kind=trace.SpanKind.CONSUMER,
            links=links,
            start_time=started_ns,
            attributes=event_attributes(event),
        )
        span.end(end_time=ended_ns)


def event_attributes(event: audit_pb2.AuditEvent) -> dict[str, str]:
    attributes = {
        "actionmesh.audit.event_id": event.event_id,
        "actionmesh.audit.event_type": audit_pb2.AuditEventType.Name(event.type).removeprefix(
            "AUDIT_EVENT_TYPE_"
        ),
        "actionmesh.tenant": event.tenant,
        "actionmesh.record.type": event.record.type,
    }
    optional = {
        "actionmesh.action_id": event.action_id,
        "actionmesh.provider_id": event.provider_id,
        "actionmesh.execution_id": event.execution_id,
    }
    attributes.update({k: v for k, v in optional.items() if v})
    if event.outcome != common_pb2.OUTCOME_UNSPECIFIED:
        attributes["actionmesh.outcome"] = common_pb2.Outcome.Name(event.outcome).removeprefix(
            "OUTCOME_"
        )
    return attributes
