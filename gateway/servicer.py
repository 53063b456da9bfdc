"""ActionGatewayService: proto <-> domain translation and authentication only."""

from __future__ import annotations

import asyncio

import grpc.aio

from actionmesh.rpc.convert import to_timestamp
from actionmesh.rpc.errors import NotFound
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.auth import TokenVerifier
from gateway.discovery import Discoverer
from gateway.execution import ExecuteCommand, Executor
from gateway.history import HistoryReader
from gateway.storage import ExecutionRecord, GatewayStore


class GatewayServicer(gateway_pb2_grpc.ActionGatewayServiceServicer):
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        discoverer: Discoverer,
        executor: Executor,
        history: HistoryReader,
        store: GatewayStore,
    ) -> None:
        self._verifier = verifier
        self._discoverer = discoverer
        self._executor = executor
        self._history = history
        self._store = store

    async def DiscoverActions(
        self, request: gateway_pb2.DiscoverActionsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DiscoverActionsResponse:
        caller = self._verifier.authenticate(context.invocation_metadata())
        result = await self._discoverer.discover(caller, request.record, request.HasField("record"))
        return gateway_pb2.DiscoverActionsResponse(
            actions=[
                gateway_pb2.DiscoveredActionView(
                    descriptor=a.descriptor,
                    provider_id=a.provider_id,
                    available=a.available,
                    unavailable_reason=a.unavailable_reason,
                )
                for a in result.actions
            ],
            degraded_providers=[
                gateway_pb2.DegradedProvider(provider_id=p, reason=r) for p, r in result.degraded
            ],
        )

    async def ExecuteAction(
        self, request: gateway_pb2.ExecuteActionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ExecuteActionResponse:
        caller = self._verifier.authenticate(context.invocation_metadata())
        record = await self._executor.execute(
            caller,
            ExecuteCommand(
                action_id=request.action_id,
                record=request.record,
                has_record=request.HasField("record"),
                inputs=dict(request.inputs),
                idempotency_key=request.idempotency_key,
            ),
        )
        return gateway_pb2.ExecuteActionResponse(execution=execution_proto(record))

    async def GetExecution(
        self, request: gateway_pb2.GetExecutionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetExecutionResponse:
        caller = self._verifier.authenticate(context.invocation_metadata())
        record = await asyncio.to_thread(self._store.get, caller.tenant, request.execution_id)
        if record is None:
            raise NotFound("no such execution", reason="EXECUTION_NOT_FOUND")
        return gateway_pb2.GetExecutionResponse(execution=execution_proto(record))

    async def GetRecordHistory(
        self, request: gateway_pb2.GetRecordHistoryRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetRecordHistoryResponse:
        caller = self._verifier.authenticate(context.invocation_metadata())
        page = await self._history.timeline(
            caller, request.record, request.page_size, request.page_token
        )
        return gateway_pb2.GetRecordHistoryResponse(
            events=page.events, next_page_token=page.next_page_token
        )


def execution_proto(record: ExecutionRecord) -> gateway_pb2.Execution:
    outcome = (
        common_pb2.OUTCOME_UNSPECIFIED
        if not record.finished
        else common_pb2.Outcome.Value(f"OUTCOME_{record.outcome}")
    )
    message = gateway_pb2.Execution(
        execution_id=record.execution_id,
        action_id=record.action_id,
        provider_id=record.provider_id,
        tenant=record.tenant,
        record=common_pb2.RecordRef(type=record.record_type, id=record.record_id),
        actor=record.actor,
        outcome=outcome,
        reason=record.reason,
        message=record.message,
        external_ref=record.external_ref,
        changes=[common_pb2.FieldChange(field=f, before=b, after=a) for f, b, a in record.changes],
        warnings=record.warnings,
        trace_id=record.trace_id,
        idempotency_key=record.idempotency_key,
        started_at=to_timestamp(record.started_at),
    )
    if record.finished_at is not None:
        message.finished_at.CopyFrom(to_timestamp(record.finished_at))
    return message
