"""The typed gateway client (actionmesh.client), as a backend service uses it.

Against the real mesh: calls carry the token (a function called per attempt),
refusals arrive as the exception of their status code with the ErrorInfo reason and
the field violations, and an execution's outcome is an answer, not an error.

Against a scripted ActionGatewayService (a real grpc.aio server on loopback that
answers UNAVAILABLE with RetryInfo a set number of times): retries keep the
idempotency key, honour RetryInfo, stop at the policy's attempts, and never repeat
a decision (approve, reject).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest

from actionmesh.client import (
    AlreadyExists,
    GatewayClient,
    InvalidArgument,
    PermissionDenied,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    record,
)
from actionmesh.mesh import Mesh
from actionmesh.rpc.errors import Unavailable as UnavailableError
from actionmesh.rpc.server import RunningServer, start_server
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory

pytestmark = pytest.mark.timeout(120)

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["ActionGatewayService"].full_name


# -- against the mesh -------------------------------------------------------------------
async def test_discover_and_execute_with_a_token_function(mesh: Mesh, token: TokenFactory) -> None:
    asked: list[float] = []

    async def fresh_token() -> str:
        asked.append(time.monotonic())
        return token("alice", roles=("operator",))

    async with GatewayClient(mesh.address("gateway"), token=fresh_token) as gateway:
        found = await gateway.discover(record("acme", "workitem", "wi-1003", status="processed"))
        views = {v.descriptor.action_id: v for v in found.actions}
        assert "workitem.retry" in views
        # wi-1003 is processed: the provider refuses, and that is an outcome, not an error.
        execution = await gateway.execute(
            "workitem.retry",
            record("acme", "workitem", "wi-1003", status="processed"),
            {"reason": "client library check"},
        )
        assert execution.outcome == common_pb2.OUTCOME_REJECTED
        assert execution.idempotency_key  # made by the client
        again = await gateway.get_execution(execution.execution_id)
        assert again.execution_id == execution.execution_id
    assert len(asked) == 3  # one token per call


async def test_refusals_are_typed_with_reason_and_violations(
    mesh: Mesh, token: TokenFactory
) -> None:
    item = record("acme", "workitem", "wi-1003", status="processed")
    viewer = GatewayClient(mesh.address("gateway"), token=token("vera", roles=("viewer",)))
    async with viewer:
        with pytest.raises(PermissionDenied) as denied:
            await viewer.execute("workitem.retry", item, {"reason": "not mine to run"})
    assert denied.value.reason and denied.value.code == grpc.StatusCode.PERMISSION_DENIED

    expired = token("alice", ttl_s=1.0, now=time.time() - 3600)
    async with GatewayClient(mesh.address("gateway"), token=expired) as gateway:
        with pytest.raises(Unauthenticated) as unauthenticated:
            await gateway.discover(item)
    assert unauthenticated.value.reason

    async with GatewayClient(mesh.address("gateway"), token=token("alice")) as gateway:
        with pytest.raises(InvalidArgument) as invalid:
            await gateway.execute("workitem.retry", item, {"reason": "x"})
        assert [v.field for v in invalid.value.violations] == ["inputs.reason"]

        key = uuid.uuid4().hex
        await gateway.execute(
            "workitem.retry", item, {"reason": "first payload"}, idempotency_key=key
        )
        with pytest.raises(AlreadyExists) as reused:
            await gateway.execute(
                "workitem.retry", item, {"reason": "other payload"}, idempotency_key=key
            )
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_an_unreachable_gateway_is_unavailable_after_the_policy_attempts() -> None:
    tokens = 0

    def counting() -> str:
        nonlocal tokens
        tokens += 1
        return "not-a-real-token"

    policy = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    async with GatewayClient("127.0.0.1:1", token=counting, timeout_s=2.0, retry=policy) as gw:
        with pytest.raises(Unavailable):
            await gw.discover(record("acme", "workitem", "wi-1001"))
    assert tokens == 3


# -- against a scripted gateway ---------------------------------------------------------
@dataclass
class ScriptedGateway(gateway_pb2_grpc.ActionGatewayServiceServicer):
    """Refuses the first ``failures`` calls of each method with UNAVAILABLE and RetryInfo."""

    failures: int
    retry_after_s: float = 0.2
    seen: dict[str, list[tuple[float, object]]] = field(default_factory=dict)

    def _record(self, method: str, request: object) -> None:
        calls = self.seen.setdefault(method, [])
        calls.append((time.monotonic(), request))
        if len(calls) <= self.failures:
            raise UnavailableError(
                "the store is restarting",
                reason="STORE_UNAVAILABLE",
                retry_after_s=self.retry_after_s,
            )

    async def ExecuteAction(
        self, request: gateway_pb2.ExecuteActionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ExecuteActionResponse:
        self._record("ExecuteAction", request)
        return gateway_pb2.ExecuteActionResponse(
            execution=gateway_pb2.Execution(
                execution_id="ex-1",
                idempotency_key=request.idempotency_key,
                outcome=common_pb2.OUTCOME_SUCCEEDED,
            )
        )

    async def ApproveExecution(
        self, request: gateway_pb2.ApproveExecutionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ApproveExecutionResponse:
        self._record("ApproveExecution", request)
        return gateway_pb2.ApproveExecutionResponse()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedGateway, RunningServer]]:
    # The other RPCs stay the generated ones (UNIMPLEMENTED).
    servicer = ScriptedGateway(failures=2)  # type: ignore[abstract]
    running = await start_server(
        [(gateway_pb2_grpc.add_ActionGatewayServiceServicer_to_server, servicer, GATEWAY_SERVICE)]
    )
    try:
        yield servicer, running
    finally:
        await running.stop(0.5)


async def test_retries_keep_the_key_and_honour_retry_info(
    scripted: tuple[ScriptedGateway, RunningServer],
) -> None:
    servicer, running = scripted
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=2.0)
    async with GatewayClient(running.address, token="t", retry=policy) as gateway:
        execution = await gateway.execute("workitem.retry", record("acme", "workitem", "wi-1"))
    assert execution.outcome == common_pb2.OUTCOME_SUCCEEDED
    calls = servicer.seen["ExecuteAction"]
    assert len(calls) == 3
    keys = {request.idempotency_key for _, request in calls}  # type: ignore[attr-defined]
    assert keys == {execution.idempotency_key}, "every attempt carries the same key"
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(calls)]
    assert all(gap >= servicer.retry_after_s * 0.9 for gap in gaps), gaps


async def test_a_decision_is_never_retried(
    scripted: tuple[ScriptedGateway, RunningServer],
) -> None:
    servicer, running = scripted
    async with GatewayClient(running.address, token="t") as gateway:
        with pytest.raises(Unavailable) as refused:
            await gateway.approve(gateway_pb2.ApproveExecutionRequest(execution_id="ex-1"))
    assert len(servicer.seen["ApproveExecution"]) == 1
    assert refused.value.reason == "STORE_UNAVAILABLE"
    assert refused.value.retry_after_s == pytest.approx(servicer.retry_after_s)


async def test_attempts_stop_at_the_policy(
    scripted: tuple[ScriptedGateway, RunningServer],
) -> None:
    servicer, running = scripted
    policy = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.5)
    async with GatewayClient(running.address, token="t", retry=policy) as gateway:
        with pytest.raises(Unavailable):
            await gateway.execute("workitem.retry", record("acme", "workitem", "wi-1"))
    assert len(servicer.seen["ExecuteAction"]) == 2
