"""Reads of the audit trail (timeline, executions, trace), for the caller's tenant only.

The tenant always comes from the verified token, never from the request, so one
tenant's query cannot name another's records.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from actionmesh.gateway.auth import Caller
from actionmesh.rpc.errors import InvalidArgument, NotFound, Unavailable, error_details
from actionmesh.rpc.identifiers import RECORD_ID, RECORD_TYPE
from actionmesh.v1 import audit_pb2, audit_pb2_grpc, common_pb2, gateway_pb2

# Every event type except the discovery decisions, which would drown a timeline.
WHAT_WAS_DONE = [
    t
    for t in audit_pb2.AuditEventType.values()
    if t
    not in (audit_pb2.AUDIT_EVENT_TYPE_UNSPECIFIED, audit_pb2.AUDIT_EVENT_TYPE_ACTIONS_DISCOVERED)
]


class HistoryReader:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = audit_pb2_grpc.AuditServiceStub(channel)

    async def timeline(
        self,
        caller: Caller,
        record: common_pb2.RecordRef,
        page_size: int,
        page_token: str,
        *,
        include_discovery: bool = False,
    ) -> audit_pb2.ListTimelineResponse:
        if not RECORD_TYPE.valid(record.type) or not RECORD_ID.valid(record.id):
            raise InvalidArgument("record type and id are required", reason="INVALID_RECORD")
        request = audit_pb2.ListTimelineRequest(
            tenant=caller.tenant,
            record=record,
            page_size=page_size,
            page_token=page_token,
            types=[] if include_discovery else WHAT_WAS_DONE,
        )
        return await _ask(self._stub.ListTimeline, request)

    async def executions(
        self, caller: Caller, request: gateway_pb2.ListExecutionsRequest
    ) -> audit_pb2.ListExecutionSummariesResponse:
        """The caller's tenant's executions, newest first, narrowed by the request."""
        query = audit_pb2.ListExecutionSummariesRequest(
            tenant=caller.tenant,
            actor=request.actor,
            action_id=request.action_id,
            outcomes=request.outcomes,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        for name in ("record", "started_after", "started_before"):
            if request.HasField(name):
                getattr(query, name).CopyFrom(getattr(request, name))
        return await _ask(self._stub.ListExecutionSummaries, query)

    async def trace(
        self, caller: Caller, trace_id: str, page_size: int, page_token: str
    ) -> audit_pb2.ListTraceEventsResponse:
        """The caller's tenant's events of one trace; a trace with none is not found."""
        request = audit_pb2.ListTraceEventsRequest(
            tenant=caller.tenant, trace_id=trace_id, page_size=page_size, page_token=page_token
        )
        page = await _ask(self._stub.ListTraceEvents, request)
        if not page.events and not page_token:
            # Also what another tenant's trace looks like: nothing to see, nothing to confirm.
            raise NotFound(f"no audit events for trace {trace_id}", reason="TRACE_NOT_FOUND")
        return page


Request = TypeVar("Request")
Response = TypeVar("Response")


async def _ask(call: Callable[..., Awaitable[Response]], request: Request) -> Response:
    """Call the audit log; its refusals keep their details, an outage is UNAVAILABLE."""
    try:
        return await call(request, timeout=5.0)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            details = error_details(exc)
            raise InvalidArgument(
                details.message, reason=details.reason, violations=details.violations
            ) from exc
        raise Unavailable(
            "the audit log is not reachable", reason="AUDIT_UNAVAILABLE", retry_after_s=1.0
        ) from exc
