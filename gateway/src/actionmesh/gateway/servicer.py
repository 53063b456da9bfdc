"""ActionGatewayService: proto <-> domain translation and authentication only."""

from __future__ import annotations

import grpc.aio

from actionmesh.gateway.admission import Admission
from actionmesh.gateway.approvals import Approvals
from actionmesh.gateway.auth import Caller, TokenVerifier
from actionmesh.gateway.discovery import Discoverer
from actionmesh.gateway.execution import Executor
from actionmesh.gateway.history import HistoryReader
from actionmesh.gateway.interventions import Interventions
from actionmesh.gateway.ledger import Ledger
from actionmesh.gateway.model import ApprovalState, ExecuteCommand, ExecutionRecord
from actionmesh.gateway.notifier import NotificationLog
from actionmesh.gateway.policy import PolicyEngine
from actionmesh.rpc.convert import to_timestamp
from actionmesh.rpc.errors import NotFound
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class GatewayServicer(gateway_pb2_grpc.ActionGatewayServiceServicer):
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        discoverer: Discoverer,
        executor: Executor,
        approvals: Approvals,
        interventions: Interventions,
        history: HistoryReader,
        ledger: Ledger,
        policy: PolicyEngine,
        admission: Admission,
        notification_log: NotificationLog,
    ) -> None:
        self._notification_log = notification_log
        self._admission = admission
        self._verifier = verifier
        self._discoverer = discoverer
        self._executor = executor
        self._approvals = approvals
        self._interventions = interventions
        self._history = history
        self._ledger = ledger
        self._policy = policy

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """The operator behind the call and, if any, the backend service it came through."""
        return await self._verifier.authenticate_async(
            context.invocation_metadata(), context.auth_context()
        )

    async def DiscoverActions(
        self, request: gateway_pb2.DiscoverActionsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DiscoverActionsResponse:
        caller = await self._caller(context)
        await self._admission.check_rate(caller.tenant, "discover")
        result = await self._discoverer.discover(
            caller, request.record, request.HasField("record"), skip_cache=request.skip_cache
        )
        return gateway_pb2.DiscoverActionsResponse(
            actions=[
                gateway_pb2.DiscoveredActionView(
                    descriptor=a.descriptor,
                    provider_id=a.provider_id,
                    available=a.available,
                    unavailable_reason=a.unavailable_reason,
                    from_cache=a.from_cache,
                )
                for a in result.actions
            ],
            degraded_providers=[
                gateway_pb2.DegradedProvider(provider_id=p, reason=r) for p, r in result.degraded
            ],
            facts=result.facts,
        )

    async def ExecuteAction(
        self, request: gateway_pb2.ExecuteActionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ExecuteActionResponse:
        caller = await self._caller(context)
        await self._admission.check_rate(caller.tenant, "execute")
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

    async def PreviewAction(
        self, request: gateway_pb2.PreviewActionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PreviewActionResponse:
        caller = await self._caller(context)
        # A preview costs the provider a read: limited like an execution.
        await self._admission.check_rate(caller.tenant, "execute")
        preview, facts = await self._executor.preview(
            caller,
            ExecuteCommand(
                action_id=request.action_id,
                record=request.record,
                has_record=request.HasField("record"),
                inputs=dict(request.inputs),
                idempotency_key="",
            ),
        )
        return gateway_pb2.PreviewActionResponse(preview=preview, facts=facts)

    async def GetExecution(
        self, request: gateway_pb2.GetExecutionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetExecutionResponse:
        caller = await self._caller(context)
        record = await self._ledger.get(caller.tenant, request.execution_id)
        if record is None:
            raise NotFound("no such execution", reason="EXECUTION_NOT_FOUND")
        return gateway_pb2.GetExecutionResponse(execution=execution_proto(record))

    async def GetRecordHistory(
        self, request: gateway_pb2.GetRecordHistoryRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetRecordHistoryResponse:
        caller = await self._caller(context)
        page = await self._history.timeline(
            caller,
            request.record,
            request.page_size,
            request.page_token,
            include_discovery=request.include_discovery,
        )
        return gateway_pb2.GetRecordHistoryResponse(
            events=page.events, next_page_token=page.next_page_token
        )

    async def ListExecutions(
        self, request: gateway_pb2.ListExecutionsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListExecutionsResponse:
        caller = await self._caller(context)
        if request.unresolved:
            limit = min(request.page_size or 100, 500)
            rows = await self._ledger.unresolved(caller.tenant, limit)
            wanted = [
                row
                for row in rows
                if (not request.actor or request.actor in (row.actor, row.approver))
                and (not request.action_id or request.action_id == row.action_id)
                and (
                    not request.HasField("record")
                    or (request.record.type, request.record.id) == (row.record_type, row.record_id)
                )
            ]
            return gateway_pb2.ListExecutionsResponse(
                unresolved=[execution_proto(row) for row in wanted]
            )
        page = await self._history.executions(caller, request)
        return gateway_pb2.ListExecutionsResponse(
            executions=page.executions, next_page_token=page.next_page_token
        )

    async def GetTrace(
        self, request: gateway_pb2.GetTraceRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetTraceResponse:
        caller = await self._caller(context)
        page = await self._history.trace(
            caller, request.trace_id, request.page_size, request.page_token
        )
        return gateway_pb2.GetTraceResponse(
            events=page.events, next_page_token=page.next_page_token
        )

    async def ListPendingApprovals(
        self, request: gateway_pb2.ListPendingApprovalsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListPendingApprovalsResponse:
        caller = await self._caller(context)
        page = await self._approvals.list_pending(
            caller,
            request.record if request.HasField("record") else None,
            request.page_size,
            request.page_token,
        )
        return gateway_pb2.ListPendingApprovalsResponse(
            approvals=[
                gateway_pb2.PendingApproval(
                    execution=execution_proto(p.record),
                    record=p.command.record,
                    inputs=dict(p.command.inputs),
                    requester_roles=p.record.requester_roles,
                )
                for p in page.approvals
            ],
            next_page_token=page.next_page_token,
        )

    async def ApproveExecution(
        self, request: gateway_pb2.ApproveExecutionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ApproveExecutionResponse:
        caller = await self._caller(context)
        record = await self._approvals.approve(
            caller,
            request.execution_id,
            request.comment,
            request.record,
            request.HasField("record"),
        )
        return gateway_pb2.ApproveExecutionResponse(execution=execution_proto(record))

    async def RejectExecution(
        self, request: gateway_pb2.RejectExecutionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RejectExecutionResponse:
        caller = await self._caller(context)
        record = await self._approvals.reject(caller, request.execution_id, request.comment)
        return gateway_pb2.RejectExecutionResponse(execution=execution_proto(record))

    async def CancelExecution(
        self, request: gateway_pb2.CancelExecutionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CancelExecutionResponse:
        caller = await self._caller(context)
        record = await self._interventions.cancel(caller, request.execution_id, request.comment)
        return gateway_pb2.CancelExecutionResponse(execution=execution_proto(record))

    async def ResolveExecution(
        self, request: gateway_pb2.ResolveExecutionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ResolveExecutionResponse:
        caller = await self._caller(context)
        record = await self._interventions.resolve(
            caller, request.execution_id, request.outcome, request.comment, request.external_ref
        )
        return gateway_pb2.ResolveExecutionResponse(execution=execution_proto(record))

    async def ListNotificationDeliveries(
        self,
        request: gateway_pb2.ListNotificationDeliveriesRequest,
        context: grpc.aio.ServicerContext,
    ) -> gateway_pb2.ListNotificationDeliveriesResponse:
        caller = await self._caller(context)
        return await self._notification_log.list(caller, request)

    async def GetPolicyStatus(
        self, request: gateway_pb2.GetPolicyStatusRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetPolicyStatusResponse:
        await self._caller(context)
        status = self._policy.status()
        reply = gateway_pb2.GetPolicyStatusResponse(
            policy_file=status.path,
            digest=status.digest,
            loaded_at=to_timestamp(status.loaded_at),
            policy_ids=status.policy_ids,
            reload_error=status.reload_error,
        )
        if status.reload_error_at is not None:
            reply.reload_error_at.CopyFrom(to_timestamp(status.reload_error_at))
        return reply


def execution_proto(record: ExecutionRecord) -> gateway_pb2.Execution:
    message = gateway_pb2.Execution(
        execution_id=record.execution_id,
        action_id=record.action_id,
        provider_id=record.provider_id,
        tenant=record.tenant,
        record=common_pb2.RecordRef(type=record.record_type, id=record.record_id),
        actor=record.actor,
        outcome=record.outcome.to_proto(),
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
    if record.approval_state is not None:
        message.approval.state = record.approval_state.to_proto()
        message.approval.approver = record.approver
        message.approval.comment = record.approval_comment
        if record.approval_expires_at is not None:
            message.approval.expires_at.CopyFrom(to_timestamp(record.approval_expires_at))
        if record.approval_decided_at is not None:
            message.approval.decided_at.CopyFrom(to_timestamp(record.approval_decided_at))
        message.approval.required_approvals = record.approvals_needed
        message.approval.required_roles.extend(record.approver_roles_needed)
        for vote in record.votes:
            message.approval.votes.add(
                approver=vote.approver,
                roles=vote.roles,
                comment=vote.comment,
                approved_at=to_timestamp(vote.at),
            )
        if record.approval_state is ApprovalState.PENDING:
            message.approval.still_needed = record.quorum.missing(
                [(v.approver, v.roles) for v in record.votes]
            )
    if record.facts is not None:
        message.facts.CopyFrom(record.facts)
    if record.preview is not None:
        message.preview.CopyFrom(record.preview)
    if record.late_outcome is not None:
        message.late_outcome = record.late_outcome.to_proto()
        if record.late_result_at is not None:
            message.late_result_at.CopyFrom(to_timestamp(record.late_result_at))
    message.reconcile_state = record.reconcile_state.to_proto()
    message.resolved_reason = record.resolved_reason
    message.reconcile_attempts = record.reconcile_attempts
    if record.reconcile_next_at is not None:
        message.reconcile_next_at.CopyFrom(to_timestamp(record.reconcile_next_at))
    if record.progress is not None:
        message.progress.CopyFrom(record.progress)
    if record.accepted_at is not None:
        message.accepted_at.CopyFrom(to_timestamp(record.accepted_at))
    if record.run_deadline is not None:
        message.run_deadline.CopyFrom(to_timestamp(record.run_deadline))
    message.cancel_requested_by = record.cancel_requested_by
    message.cancel_comment = record.cancel_comment
    if record.cancel_requested_at is not None:
        message.cancel_requested_at.CopyFrom(to_timestamp(record.cancel_requested_at))
    return message
