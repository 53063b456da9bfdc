"""AuditService over gRPC: unpacks requests, calls the audit log, packs responses."""

from __future__ import annotations

import grpc.aio

from actionmesh.v1 import audit_pb2, audit_pb2_grpc
from auditlog.events import AuditLog


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Translation only: validation, paging and storage live in :mod:`auditlog.events`."""

    def __init__(self, audit_log: AuditLog) -> None:
        self._log = audit_log

    async def AppendEvents(
        self, request: audit_pb2.AppendEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AppendEventsResponse:
        result = await self._log.append(request.events)
        return audit_pb2.AppendEventsResponse(stored=result.stored, duplicates=result.duplicates)

    async def ListTimeline(
        self, request: audit_pb2.ListTimelineRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListTimelineResponse:
        page = await self._log.timeline(
            request.tenant,
            request.record.type,
            request.record.id,
            page_size=request.page_size,
            page_token=request.page_token,
            types=list(request.types),
        )
        return audit_pb2.ListTimelineResponse(
            events=page.events, next_page_token=page.next_page_token
        )
