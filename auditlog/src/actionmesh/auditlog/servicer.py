"""AuditService over gRPC: unpacks requests, calls the audit log, packs responses."""

from __future__ import annotations

import grpc.aio

from actionmesh.auditlog.chain import Verification
from actionmesh.auditlog.events import AuditLog
from actionmesh.auditlog.tracing import traced_append
from actionmesh.v1 import audit_pb2, audit_pb2_grpc


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Translation only: validation, paging and storage live in :mod:`auditlog.events`."""

    def __init__(self, audit_log: AuditLog) -> None:
        self._log = audit_log

    async def AppendEvents(
        self, request: audit_pb2.AppendEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AppendEventsResponse:
        result = await traced_append(self._log, request.events)
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

    async def ListExecutionSummaries(
        self, request: audit_pb2.ListExecutionSummariesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListExecutionSummariesResponse:
        return await self._log.summaries(request)

    async def ListTraceEvents(
        self, request: audit_pb2.ListTraceEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListTraceEventsResponse:
        page = await self._log.trace(
            request.tenant,
            request.trace_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return audit_pb2.ListTraceEventsResponse(
            events=page.events, next_page_token=page.next_page_token
        )

    async def VerifyChain(
        self, request: audit_pb2.VerifyChainRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.VerifyChainResponse:
        results = await self._log.verify_chain(request.tenant)
        return audit_pb2.VerifyChainResponse(chains=[_verification(r) for r in results])


def _verification(result: Verification) -> audit_pb2.ChainVerification:
    message = audit_pb2.ChainVerification(
        tenant=result.tenant,
        intact=result.intact,
        events_checked=result.events_checked,
        head_index=result.head_index,
        head_hash=result.head_hash,
    )
    if result.first_break is not None:
        message.first_break.CopyFrom(
            audit_pb2.ChainBreak(
                chain_index=result.first_break.chain_index,
                sequence=result.first_break.sequence,
                event_id=result.first_break.event_id,
                problem=result.first_break.problem,
            )
        )
    return message
