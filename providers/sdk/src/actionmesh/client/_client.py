"""The gateway client: one object per gateway address, typed calls, bounded retries."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.convert import python_to_input_value
from actionmesh.rpc.errors import ActionMeshError, from_rpc_error
from actionmesh.rpc.tls import TlsConfig
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

T = TypeVar("T")

TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]
"""The operator's bearer token: the token itself, or a function (plain or async)
called before every attempt, so a token that rotates is always fresh."""

InputLike = str | int | float | bool | common_pb2.InputValue
"""An input value: a Python scalar (converted to the InputValue of its type) or an
InputValue as is."""

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
"""What may be retried, and only on calls that are safe to repeat (see
:class:`RetryPolicy`): the gateway or a dependency was unreachable or busy (nothing
ran, per the outcome table), or the deadline passed before an answer."""


@dataclass(frozen=True)
class RetryPolicy:
    """How the client retries a call that is safe to repeat.

    Safe to repeat are the reads and ``execute``: an execution carries one idempotency
    key, chosen before the first attempt and sent with every retry, so the gateway
    runs it at most once (a TIMED_OUT call is retried only that way, as the outcome
    table says). Decisions (``approve``, ``reject``) are never retried.
    """

    attempts: int = 3
    """Attempts in all, the first included; 1 turns retries off."""
    initial_backoff_s: float = 0.1
    """Base of the exponential backoff with full jitter between attempts."""
    max_backoff_s: float = 5.0
    """Longest wait between two attempts; a server's RetryInfo is honoured up to it."""
    total_timeout_s: float = 30.0
    """No new attempt starts this long after the first one did."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        for name in ("initial_backoff_s", "max_backoff_s", "total_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


def record(
    tenant: str,
    type: str,
    id: str,
    *,
    status: str = "",
    sensitivity: common_pb2.Sensitivity.ValueType = common_pb2.SENSITIVITY_UNSPECIFIED,
    attributes: Mapping[str, str] | None = None,
    version: str = "",
) -> common_pb2.RecordContext:
    """A RecordContext: the record an operator looks at, as the caller's product sees it."""
    return common_pb2.RecordContext(
        tenant=tenant,
        type=type,
        id=id,
        status=status,
        sensitivity=sensitivity,
        attributes=dict(attributes or {}),
        version=version,
    )


def input_values(inputs: Mapping[str, InputLike]) -> dict[str, common_pb2.InputValue]:
    """Python values as the InputValues of their types."""
    return {
        name: value if isinstance(value, common_pb2.InputValue) else python_to_input_value(value)
        for name, value in inputs.items()
    }


class GatewayClient:
    """A typed, asynchronous client of the ActionGatewayService.

    ::

        async with GatewayClient("127.0.0.1:50050", token=load_token) as gateway:
            found = await gateway.discover(record("acme", "workitem", "wi-1001"))
            run = await gateway.execute(
                "workitem.retry", record("acme", "workitem", "wi-1001"),
                {"reason": "parser fixed"},
            )

    Every call has a deadline (``timeout_s``, per attempt) and carries the token.
    A refusal raises the :class:`~actionmesh.rpc.errors.ActionMeshError` subclass of
    its status code (``PermissionDenied``, ``InvalidArgument`` with ``violations``,
    ``Unavailable`` with ``retry_after_s``...), its ErrorInfo reason in ``reason``.
    An execution's outcome (REJECTED, TIMED_OUT...) is an answer, not an error: it
    is in the returned Execution.
    """

    def __init__(
        self,
        target: str,
        *,
        token: TokenSource,
        tls: TlsConfig | None = None,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._token = token
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._owns_channel = channel is None
        self._channel = channel or open_channel(target, tls)
        self._stub = gateway_pb2_grpc.ActionGatewayServiceStub(self._channel)

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (unless the caller passed its own)."""
        if self._owns_channel:
            await self._channel.close()

    # -- the calls ------------------------------------------------------------
    async def discover(
        self, record: common_pb2.RecordContext, *, skip_cache: bool = False
    ) -> gateway_pb2.DiscoverActionsResponse:
        """The actions visible to the caller on ``record``, with availability and reasons."""
        request = gateway_pb2.DiscoverActionsRequest(record=record, skip_cache=skip_cache)
        return await self._call(self._stub.DiscoverActions, request, retry_safe=True)

    async def execute(
        self,
        action_id: str,
        record: common_pb2.RecordContext,
        inputs: Mapping[str, InputLike] | None = None,
        *,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> gateway_pb2.Execution:
        """Run ``action_id`` on ``record`` once; the execution (its outcome included).

        Without ``idempotency_key`` a new one is made for this call and reused by its
        retries; pass your own to make a retry of *your* call (after a crash, say) safe.
        """
        request = gateway_pb2.ExecuteActionRequest(
            action_id=action_id,
            record=record,
            inputs=input_values(inputs or {}),
            idempotency_key=idempotency_key or str(uuid.uuid4()),
        )
        response = await self._call(
            self._stub.ExecuteAction, request, retry_safe=True, timeout_s=timeout_s
        )
        return response.execution

    async def preview(
        self,
        action_id: str,
        record: common_pb2.RecordContext,
        inputs: Mapping[str, InputLike] | None = None,
    ) -> gateway_pb2.PreviewActionResponse:
        """What executing ``action_id`` on ``record`` would change, computed by its
        provider without side effects (the preview and the facts it was authorized on).
        Read-only, so retried like a discovery."""
        request = gateway_pb2.PreviewActionRequest(
            action_id=action_id, record=record, inputs=input_values(inputs or {})
        )
        return await self._call(self._stub.PreviewAction, request, retry_safe=True)

    async def get_execution(self, execution_id: str) -> gateway_pb2.Execution:
        request = gateway_pb2.GetExecutionRequest(execution_id=execution_id)
        response = await self._call(self._stub.GetExecution, request, retry_safe=True)
        return response.execution

    async def record_history(
        self,
        record: common_pb2.RecordRef,
        *,
        page_size: int = 0,
        page_token: str = "",
        include_discovery: bool = False,
    ) -> gateway_pb2.GetRecordHistoryResponse:
        """One page of the record's timeline (audit events), oldest first."""
        request = gateway_pb2.GetRecordHistoryRequest(
            record=record,
            page_size=page_size,
            page_token=page_token,
            include_discovery=include_discovery,
        )
        return await self._call(self._stub.GetRecordHistory, request, retry_safe=True)

    async def pending_approvals(
        self,
        record: common_pb2.RecordRef | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> gateway_pb2.ListPendingApprovalsResponse:
        request = gateway_pb2.ListPendingApprovalsRequest(
            record=record, page_size=page_size, page_token=page_token
        )
        return await self._call(self._stub.ListPendingApprovals, request, retry_safe=True)

    async def approve(
        self, request: gateway_pb2.ApproveExecutionRequest
    ) -> gateway_pb2.ApproveExecutionResponse:
        """Approve a pending execution (never retried: a decision is made once)."""
        return await self._call(self._stub.ApproveExecution, request, retry_safe=False)

    async def reject(
        self, request: gateway_pb2.RejectExecutionRequest
    ) -> gateway_pb2.RejectExecutionResponse:
        """Reject a pending execution (never retried: a decision is made once)."""
        return await self._call(self._stub.RejectExecution, request, retry_safe=False)

    async def cancel(
        self, request: gateway_pb2.CancelExecutionRequest
    ) -> gateway_pb2.CancelExecutionResponse:
        """Ask a running long-running execution to stop (never retried: asked once)."""
        return await self._call(self._stub.CancelExecution, request, retry_safe=False)

    async def resolve(
        self, request: gateway_pb2.ResolveExecutionRequest
    ) -> gateway_pb2.ResolveExecutionResponse:
        """Record what became of an unsettled execution (never retried: recorded once)."""
        return await self._call(self._stub.ResolveExecution, request, retry_safe=False)

    async def policy_status(self) -> gateway_pb2.GetPolicyStatusResponse:
        request = gateway_pb2.GetPolicyStatusRequest()
        return await self._call(self._stub.GetPolicyStatus, request, retry_safe=True)

    async def list_executions(
        self, request: gateway_pb2.ListExecutionsRequest
    ) -> gateway_pb2.ListExecutionsResponse:
        return await self._call(self._stub.ListExecutions, request, retry_safe=True)

    async def get_trace(
        self, trace_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> gateway_pb2.GetTraceResponse:
        """One page of the audit events of a trace."""
        request = gateway_pb2.GetTraceRequest(
            trace_id=trace_id, page_size=page_size, page_token=page_token
        )
        return await self._call(self._stub.GetTrace, request, retry_safe=True)

    async def notification_deliveries(
        self,
        *,
        failed_only: bool = False,
        subscription_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> gateway_pb2.ListNotificationDeliveriesResponse:
        """One page of the caller's tenant's notification delivery log, newest first
        (needs one of the gateway's notification_log_roles)."""
        request = gateway_pb2.ListNotificationDeliveriesRequest(
            failed_only=failed_only,
            subscription_id=subscription_id,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(self._stub.ListNotificationDeliveries, request, retry_safe=True)

    # -- machinery --------------------------------------------------------------
    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        token: Any = self._token() if callable(self._token) else self._token
        if inspect.isawaitable(token):
            token = await token
        return (("authorization", f"Bearer {token}"),)

    async def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        retry_safe: bool,
        timeout_s: float | None = None,
    ) -> Any:
        policy = self._retry
        timeout = timeout_s or self._timeout_s
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts if retry_safe else 1)
            | stop_after_delay(policy.total_timeout_s),
            wait=_wait(policy),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await method(request, metadata=await self._metadata(), timeout=timeout)
                except grpc.RpcError as error:
                    raise from_rpc_error(error) from error
        raise AssertionError("unreachable: tenacity re-raises the last error")


def _retryable(error: BaseException) -> bool:
    return isinstance(error, ActionMeshError) and error.code in RETRYABLE_CODES


def _wait(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    jitter = wait_random_exponential(multiplier=policy.initial_backoff_s, max=policy.max_backoff_s)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        hinted = getattr(error, "retry_after_s", None)
        if hinted is not None:
            return float(min(max(hinted, 0.0), policy.max_backoff_s))
        return float(jitter(state))

    return wait
