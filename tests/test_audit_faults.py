"""Nothing lost: the audit log down during executions, the gateway SIGKILLed with events unsent.

Every service is a real process of its own mesh. Counts come from the audit
log's database and the gateway's outbox table, never from logs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from actionmesh.auditlog.storage import AuditRepository
from actionmesh.gateway.auth import mint_token
from actionmesh.gateway.storage import GatewayStore
from actionmesh.mesh import Mesh, MeshSettings, tail
from actionmesh.rpc.errors import error_details
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.v1 import audit_pb2, audit_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TEST_MESH, bearer, eventually

pytestmark = pytest.mark.timeout(150)

EXECUTIONS = 24
STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED


@pytest.fixture
def own_mesh(tmp_path: Path) -> Iterator[Mesh]:
    settings = {**TEST_MESH, "provider_modules": ("actionmesh.providers.workitems",)}
    mesh = Mesh(MeshSettings(data_dir=tmp_path / "mesh", **settings))  # type: ignore[arg-type]
    mesh.start()
    yield mesh
    mesh.stop()
    for service in mesh.services.values():  # shown only when the test failed
        print(f"--- {service.name} log ---\n{tail(service.log_path, 40)}")


def audit_events(mesh: Mesh, execution_ids: set[str]) -> list[audit_pb2.AuditEvent]:
    """What the audit log really stored for these executions (read from its database)."""
    repository = AuditRepository(make_engine(sqlite_url(mesh.data_dir / "data" / "audit.db")))
    try:
        found: list[audit_pb2.AuditEvent] = []
        for execution_id in execution_ids:
            found += repository.list_by_execution("acme", execution_id)
        return found
    finally:
        repository.close()


def outbox_depth(mesh: Mesh) -> int:
    store = GatewayStore(sqlite_url(mesh.data_dir / "data" / "gateway.db"))
    try:
        return store.outbox_depth()
    finally:
        store.close()


async def run_executions(mesh: Mesh, token: str) -> dict[str, common_pb2.Outcome.ValueType]:
    """EXECUTIONS retries, eight at a time, each with its own key; execution id -> outcome."""
    request = gateway_pb2.ExecuteActionRequest(
        action_id="workitem.retry",
        record=common_pb2.RecordContext(
            tenant="acme", type="workitem", id="wi-1001", status="failed"
        ),
        inputs={"reason": common_pb2.InputValue(string_value="audit fault test")},
    )
    limit = asyncio.Semaphore(8)
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

        async def one() -> gateway_pb2.Execution:
            async with limit:
                call = gateway_pb2.ExecuteActionRequest()
                call.CopyFrom(request)
                call.idempotency_key = uuid.uuid4().hex
                reply = await gateway.ExecuteAction(call, metadata=bearer(token), timeout=30)
                return reply.execution

        executions = await asyncio.gather(*(one() for _ in range(EXECUTIONS)))
    return {e.execution_id: e.outcome for e in executions}


def assert_each_execution_audited_once(
    events: list[audit_pb2.AuditEvent], outcomes: dict[str, common_pb2.Outcome.ValueType]
) -> None:
    per_execution = Counter((e.execution_id, e.type) for e in events)
    for execution_id, outcome in outcomes.items():
        assert per_execution[(execution_id, STARTED)] == 1, execution_id
        assert per_execution[(execution_id, FINISHED)] == 1, execution_id
        finished = next(e for e in events if e.execution_id == execution_id and e.type == FINISHED)
        assert finished.outcome == outcome
    assert len(events) == 2 * len(outcomes), "no event twice, none missing, nothing else"
    assert len({e.event_id for e in events}) == len(events)


async def verify_chain(mesh: Mesh) -> audit_pb2.ChainVerification:
    async with grpc.aio.insecure_channel(mesh.address("auditlog")) as channel:
        reply = await audit_pb2_grpc.AuditServiceStub(channel).VerifyChain(
            audit_pb2.VerifyChainRequest(tenant="acme"), timeout=30
        )
    (chain,) = reply.chains
    return chain


async def test_audit_log_down_during_executions_then_back_loses_nothing(own_mesh: Mesh) -> None:
    token = mint_token(own_mesh.signing_key(), subject="alice", tenant="acme", roles=["operator"])
    own_mesh.stop_service("auditlog")

    outcomes = await run_executions(own_mesh, token)

    # Executions do not wait for the audit log; their events wait in the outbox.
    assert len(outcomes) == EXECUTIONS
    assert Counter(outcomes.values())[common_pb2.OUTCOME_SUCCEEDED] == 1, outcomes
    assert outbox_depth(own_mesh) == 2 * EXECUTIONS
    async with grpc.aio.insecure_channel(own_mesh.address("gateway")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gateway_pb2_grpc.ActionGatewayServiceStub(channel).GetRecordHistory(
                gateway_pb2.GetRecordHistoryRequest(
                    record=common_pb2.RecordRef(type="workitem", id="wi-1001")
                ),
                metadata=bearer(token),
                timeout=10,
            )
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(raised.value).reason == "AUDIT_UNAVAILABLE"

    own_mesh.restart_service("auditlog")

    await eventually(lambda: outbox_depth(own_mesh) == 0, timeout_s=30)
    assert_each_execution_audited_once(audit_events(own_mesh, set(outcomes)), outcomes)
    chain = await verify_chain(own_mesh)
    assert chain.intact and chain.head_index == 2 * EXECUTIONS


async def test_gateway_killed_with_undelivered_events_delivers_them_after_restart(
    own_mesh: Mesh,
) -> None:
    token = mint_token(own_mesh.signing_key(), subject="alice", tenant="acme", roles=["operator"])
    own_mesh.stop_service("auditlog")
    outcomes = await run_executions(own_mesh, token)
    assert outbox_depth(own_mesh) == 2 * EXECUTIONS

    # SIGKILL: no drain, no goodbye; only what was committed survives.
    own_mesh.stop_service("gateway", kill=True)
    own_mesh.restart_service("auditlog")
    await asyncio.sleep(1.0)
    assert audit_events(own_mesh, set(outcomes)) == [], "nobody ships while the gateway is dead"
    assert outbox_depth(own_mesh) == 2 * EXECUTIONS

    own_mesh.restart_service("gateway")

    await eventually(lambda: outbox_depth(own_mesh) == 0, timeout_s=30)
    assert_each_execution_audited_once(audit_events(own_mesh, set(outcomes)), outcomes)
    # The restarted gateway still knows every execution (its idempotency records survived).
    async with grpc.aio.insecure_channel(own_mesh.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(channel)
        for execution_id, outcome in outcomes.items():
            reply = await gateway.GetExecution(
                gateway_pb2.GetExecutionRequest(execution_id=execution_id),
                metadata=bearer(token),
                timeout=10,
            )
            assert reply.execution.outcome == outcome
    chain = await verify_chain(own_mesh)
    assert chain.intact and chain.head_index == 2 * EXECUTIONS
