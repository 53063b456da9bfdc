"""GetRecordHistory: reads the audit timeline for the caller's tenant only."""

from __future__ import annotations

import grpc
import grpc.aio

from actionmesh.rpc.errors import InvalidArgument, Unavailable, error_details
from actionmesh.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from gateway.auth import Caller
from gateway.requests import RECORD_ID, RECORD_TYPE

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
        if not RECORD_TYPE.match(record.type) or not RECORD_ID.match(record.id):
            raise InvalidArgument("record type and id are required", reason="INVALID_RECORD")
        try:
            return await self._stub.ListTimeline(
                audit_pb2.ListTimelineRequest(
                    tenant=caller.tenant,
                    record=record,
                    page_size=page_size,
                    page_token=page_token,
                    types=[] if include_discovery else WHAT_WAS_DONE,
                ),
                timeout=5.0,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                details = error_details(exc)
                raise InvalidArgument(details.message, reason=details.reason) from exc
            raise Unavailable(
                "the audit log is not reachable", reason="AUDIT_UNAVAILABLE", retry_after_s=1.0
            ) from exc
