"""A provider that dies: executions get UNAVAILABLE, then the registry drops it."""

from __future__ import annotations

import uuid

import grpc
import grpc.aio
import pytest

from actionmesh.gateway.auth import mint_token
from actionmesh.mesh import Mesh, tail
from actionmesh.rpc.errors import ErrorDetails, error_details
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import bearer, eventually, start_mesh


@pytest.fixture
def own_mesh(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    mesh = start_mesh(tmp_path_factory.mktemp("mesh-down"))
    yield mesh
    mesh.stop()
    # Shown by pytest only when the test failed: what each process said.
    for service in mesh.services.values():
        print(f"--- {service.name} log ---\n{tail(service.log_path, 40)}")


async def test_stopped_provider_gives_unavailable_then_leaves_the_registry(own_mesh: Mesh) -> None:
    token = mint_token(own_mesh.signing_key(), subject="alice", tenant="acme", roles=["operator"])
    request = gateway_pb2.ExecuteActionRequest(
        action_id="workitem.retry",
        record=common_pb2.RecordContext(
            tenant="acme", type="workitem", id="wi-1001", status="failed"
        ),
        inputs={"reason": common_pb2.InputValue(string_value="retry after outage")},
    )
    # SIGKILL: the provider gets no chance to deregister, so only its lease can remove it.
    own_mesh.stop_service("workitems", kill=True)
    async with (
        grpc.aio.insecure_channel(own_mesh.address("gateway")) as gw_channel,
        grpc.aio.insecure_channel(own_mesh.address("registry")) as reg_channel,
    ):
        gateway = gateway_pb2_grpc.ActionGatewayServiceStub(gw_channel)
        registry = registry_pb2_grpc.RegistryServiceStub(reg_channel)

        async def unavailable() -> ErrorDetails:
            request.idempotency_key = uuid.uuid4().hex
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                reply = await gateway.ExecuteAction(request, metadata=bearer(token))
                pytest.fail(f"expected UNAVAILABLE, got {reply.execution}")
            details = error_details(raised.value)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, details
            assert details.retry_after_s is not None and details.retry_after_s > 0
            return details

        # The provider is also the system of record of work items. Before the registry's
        # health check reaches the gateway, the gateway meets the dead provider as the
        # record's source; it is the action's own provider, so that is what it names.
        details = await unavailable()
        assert details.reason == "PROVIDER_UNAVAILABLE", details

        # Discovery still answers, naming the provider as degraded instead of hiding it:
        # as the source of the record's facts (so they are unverified) and as the
        # provider of its actions.
        discovered = await gateway.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=request.record, skip_cache=True),
            metadata=bearer(token),
        )
        degraded = [(d.provider_id, d.reason) for d in discovered.degraded_providers]
        assert degraded[0] == ("workitems", "RECORD_SOURCE_UNAVAILABLE"), degraded
        assert [(p, r in ("UNAVAILABLE", "NOT_SERVING")) for p, r in degraded[1:]] == [
            ("workitems", True)
        ], degraded
        assert discovered.facts.source == common_pb2.FACT_SOURCE_UNVERIFIED
        assert not any(a.provider_id == "workitems" for a in discovered.actions)

        # Before and after the gateway hears that the provider is not serving (then it
        # does not ask the record's source at all), until the lease expires (below).
        again = await unavailable()
        assert again.reason == "PROVIDER_UNAVAILABLE", again

        async def gone() -> bool:
            reply = await registry.ListProviders(registry_pb2.ListProvidersRequest())
            return all(p.provider_id != "workitems" for p in reply.providers)

        await eventually(gone, timeout_s=20)  # lease is 2 s in tests

        async def unknown_to_gateway() -> bool:
            request.idempotency_key = uuid.uuid4().hex
            try:
                await gateway.ExecuteAction(request, metadata=bearer(token))
            except grpc.aio.AioRpcError as exc:
                return error_details(exc).reason == "UNKNOWN_ACTION"
            return False

        await eventually(unknown_to_gateway, timeout_s=15)
