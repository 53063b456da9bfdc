"""Two gateway processes on one PostgreSQL: idempotency and approvals hold across replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from actionmesh.mesh import Mesh
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually, vouching_channel
from tests.governance_fixtures import case
from tests.test_governance import provider_calls, refused, request

pytestmark = pytest.mark.timeout(120)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub


@pytest.fixture
async def replicas(
    mesh: Mesh, govtest: Path, postgres_url: str, token: TokenFactory
) -> AsyncIterator[tuple[Stub, Stub]]:
    """Gateways "a" and "b": separate processes, one PostgreSQL database between them."""
    names = (f"gateway-pg-a-{uuid.uuid4().hex[:6]}", f"gateway-pg-b-{uuid.uuid4().hex[:6]}")
    services = [mesh.start_gateway(name, database_url=postgres_url) for name in names]
    # The test backend vouches for the govtest records on both (a trusted caller).
    channels = [vouching_channel(mesh, service.address) for service in services]
    stubs = [Stub(channel) for channel in channels]
    supervisor = token(subject="probe", roles=("supervisor",))

    async def sees_govtest(stub: Stub) -> bool:
        reply = await stub.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=case("probe"), skip_cache=True),
            metadata=bearer(supervisor),
        )
        return any(a.provider_id == "govtest" and a.available for a in reply.actions)

    try:
        for stub in stubs:
            await eventually(lambda stub=stub: sees_govtest(stub), timeout_s=20)
        yield stubs[0], stubs[1]
    finally:
        for channel in channels:
            await channel.close()
        for name in names:
            mesh.stop_service(name)


async def test_the_same_key_on_both_replicas_reaches_the_provider_once(
    replicas: tuple[Stub, Stub], token: TokenFactory, govtest: Path
) -> None:
    a, b = replicas
    alice = token()
    key = uuid.uuid4().hex
    same = request("slow", case("c-replicas"), key=key, sleep_ms=400)
    replies = await asyncio.gather(
        *(
            (a if n % 2 else b).ExecuteAction(same, metadata=bearer(alice), timeout=30)
            for n in range(16)
        )
    )
    assert len({r.execution.execution_id for r in replies}) == 1
    assert {r.execution.outcome for r in replies} == {common_pb2.OUTCOME_SUCCEEDED}
    assert len(provider_calls(govtest, key=key)) == 1
    # Afterwards either replica answers the stored execution, still without a new call.
    again = await a.ExecuteAction(same, metadata=bearer(alice), timeout=30)
    assert again.execution.execution_id == replies[0].execution.execution_id
    other = request("slow", case("c-replicas"), key=key, sleep_ms=401)
    reused = await refused(b.ExecuteAction(other, metadata=bearer(alice), timeout=30))
    assert reused.code == grpc.StatusCode.ALREADY_EXISTS
    assert len(provider_calls(govtest, key=key)) == 1


async def test_a_request_on_one_replica_is_approved_on_the_other(
    replicas: tuple[Stub, Stub], token: TokenFactory, govtest: Path
) -> None:
    a, b = replicas
    alice, sam = token(), token(subject="sam", roles=("supervisor",))
    key = uuid.uuid4().hex
    held = (
        await a.ExecuteAction(
            request("guarded", case("c-cross"), key=key, note="cross replica"),
            metadata=bearer(alice),
            timeout=30,
        )
    ).execution
    assert held.outcome == common_pb2.OUTCOME_PENDING_APPROVAL

    listed = await b.ListPendingApprovals(
        gateway_pb2.ListPendingApprovalsRequest(), metadata=bearer(sam), timeout=10
    )
    assert held.execution_id in {p.execution.execution_id for p in listed.approvals}

    def approve(stub: Stub) -> asyncio.Future[gateway_pb2.ApproveExecutionResponse]:
        return stub.ApproveExecution(  # type: ignore[no-any-return]
            gateway_pb2.ApproveExecutionRequest(
                execution_id=held.execution_id, comment="ok", record=case("c-cross")
            ),
            metadata=bearer(sam),
            timeout=30,
        )

    # Both replicas get the same approval at once: exactly one decision is recorded.
    outcomes = await asyncio.gather(approve(b), approve(a), return_exceptions=True)
    approved = [o for o in outcomes if isinstance(o, gateway_pb2.ApproveExecutionResponse)]
    lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(approved) == 1 and len(lost) == 1, outcomes
    assert lost[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert approved[0].execution.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert len(provider_calls(govtest, key=key)) == 1

    seen_by_a = await a.GetExecution(
        gateway_pb2.GetExecutionRequest(execution_id=held.execution_id),
        metadata=bearer(alice),
        timeout=10,
    )
    assert seen_by_a.execution.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert seen_by_a.execution.approval.approver == "sam"
