"""The mesh end to end: real processes, real gRPC on loopback, real databases.

A backend caller with an operator token discovers and runs workitem.retry; the
workitems provider's own state changes; the record timeline holds the evidence
with the trace id that spans gateway and provider. Refusals are checked too:
no/expired/forged token, another tenant, a role without permission, bad inputs.
"""

from __future__ import annotations

import time
import uuid

import grpc
import grpc.aio
import pytest

from actionmesh.mesh import Mesh
from actionmesh.providers.workitems.store import WorkItem
from actionmesh.rpc.errors import error_details
from actionmesh.v1 import (
    audit_pb2,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import TokenFactory, bearer, eventually
from tests.provider_state import item_state, put_item

Stub = gateway_pb2_grpc.ActionGatewayServiceStub


def record(
    item_id: str, status: str, tenant: str = "acme", **kw: object
) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(tenant=tenant, type="workitem", id=item_id, status=status, **kw)  # type: ignore[arg-type]


def retry_request(
    item_id: str,
    *,
    status: str = "failed",
    tenant: str = "acme",
    inputs: dict[str, common_pb2.InputValue] | None = None,
    key: str | None = None,
) -> gateway_pb2.ExecuteActionRequest:
    return gateway_pb2.ExecuteActionRequest(
        action_id="workitem.retry",
        record=record(item_id, status, tenant),
        inputs=inputs
        if inputs is not None
        else {"reason": common_pb2.InputValue(string_value="parser fixed")},
        idempotency_key=key or uuid.uuid4().hex,
    )


async def timeline(stub: Stub, token: str, item_id: str) -> list[audit_pb2.AuditEvent]:
    reply = await stub.GetRecordHistory(
        gateway_pb2.GetRecordHistoryRequest(
            record=common_pb2.RecordRef(type="workitem", id=item_id)
        ),
        metadata=bearer(token),
    )
    return list(reply.events)


async def test_provider_registers_and_is_healthy(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)

        async def workitems_serving() -> bool:
            reply = await registry.ListProviders(registry_pb2.ListProvidersRequest())
            return any(
                p.provider_id == "workitems" and p.health == registry_pb2.PROVIDER_HEALTH_SERVING
                for p in reply.providers
            )

        await eventually(workitems_serving)


async def test_discovery_shows_retry_only_on_failed_items(
    gateway: Stub, token: TokenFactory
) -> None:
    failed = await gateway.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(record=record("wi-1001", "failed")),
        metadata=bearer(token()),
    )
    views = {a.descriptor.action_id: a for a in failed.actions}
    assert views["workitem.retry"].available
    assert views["workitem.retry"].provider_id == "workitems"
    assert [f.name for f in views["workitem.retry"].descriptor.inputs if f.required] == ["reason"]
    assert not failed.degraded_providers

    healthy = await gateway.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(record=record("wi-1003", "processed")),
        metadata=bearer(token()),
    )
    views = {a.descriptor.action_id: a for a in healthy.actions}
    assert not views["workitem.retry"].available
    assert views["workitem.retry"].unavailable_reason == "STATUS_NOT_FAILED"

    other_type = await gateway.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(
            record=common_pb2.RecordContext(tenant="acme", type="invoice", id="inv-1")
        ),
        metadata=bearer(token()),
    )
    assert list(other_type.actions) == []


async def test_execute_changes_provider_state_and_lands_in_the_timeline(
    mesh: Mesh, gateway: Stub, token: TokenFactory
) -> None:
    assert item_state(mesh, "acme", "wi-1001")[0] == "failed"
    reply = await gateway.ExecuteAction(retry_request("wi-1001"), metadata=bearer(token()))
    execution = reply.execution
    assert execution.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert execution.actor == "alice" and execution.provider_id == "workitems"
    assert execution.external_ref
    assert ("status", "failed", "processed") in {
        (c.field, c.before, c.after) for c in execution.changes
    }
    assert len(execution.trace_id) == 32 and set(execution.trace_id) != {"0"}

    status, provider_trace_ids = item_state(mesh, "acme", "wi-1001")
    assert status == "processed"
    # One trace spans gateway -> provider: the provider saw the gateway's trace id.
    assert execution.trace_id in provider_trace_ids

    fetched = await gateway.GetExecution(
        gateway_pb2.GetExecutionRequest(execution_id=execution.execution_id),
        metadata=bearer(token()),
    )
    assert fetched.execution == execution

    async def both_events() -> list[audit_pb2.AuditEvent]:
        events = [
            e
            for e in await timeline(gateway, token(), "wi-1001")
            if e.execution_id == execution.execution_id
        ]
        return events if len(events) == 2 else []

    started, finished = await eventually(both_events)  # type: ignore[misc]
    assert started.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
    assert finished.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
    assert finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert finished.actor == "alice" and finished.external_ref == execution.external_ref
    assert {e.trace_id for e in (started, finished)} == {execution.trace_id}
    assert "operators-low-and-medium-risk" in started.policy_ids
    assert finished.inputs["reason"] == "parser fixed"

    # The provider re-checks its own state: the item is no longer failed.
    again = await gateway.ExecuteAction(retry_request("wi-1001"), metadata=bearer(token()))
    assert again.execution.outcome == common_pb2.OUTCOME_REJECTED
    assert again.execution.reason == "NOT_FAILED"


async def test_same_idempotency_key_runs_once(
    mesh: Mesh, gateway: Stub, token: TokenFactory
) -> None:
    key = uuid.uuid4().hex
    first = await gateway.ExecuteAction(
        retry_request("wi-1002", status="stuck", key=key), metadata=bearer(token())
    )
    second = await gateway.ExecuteAction(
        retry_request("wi-1002", status="stuck", key=key), metadata=bearer(token())
    )
    assert first.execution.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert second.execution == first.execution
    assert len(item_state(mesh, "acme", "wi-1002")[1]) == 1

    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await gateway.ExecuteAction(
            retry_request(
                "wi-1002",
                status="stuck",
                key=key,
                inputs={"reason": common_pb2.InputValue(string_value="other")},
            ),
            metadata=bearer(token()),
        )
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(reused.value).reason == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.parametrize("method", ["DiscoverActions", "ExecuteAction", "GetRecordHistory"])
async def test_missing_token_is_unauthenticated(gateway: Stub, method: str) -> None:
    requests = {
        "DiscoverActions": gateway_pb2.DiscoverActionsRequest(record=record("wi-1001", "failed")),
        "ExecuteAction": retry_request("wi-1001"),
        "GetRecordHistory": gateway_pb2.GetRecordHistoryRequest(
            record=common_pb2.RecordRef(type="workitem", id="wi-1001")
        ),
    }
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(gateway, method)(requests[method])
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(raised.value).reason == "TOKEN_MISSING"


async def test_expired_and_forged_tokens_are_unauthenticated(
    gateway: Stub, token: TokenFactory
) -> None:
    expired = token(now=time.time() - 7200, ttl_s=60)
    from actionmesh.gateway.auth import mint_token

    forged = mint_token(
        "not-the-mesh-key-but-long-enough-for-hs256",
        subject="mallory",
        tenant="acme",
        roles=["supervisor"],
    )
    for bad, reason in (
        (expired, "TOKEN_EXPIRED"),
        (forged, "TOKEN_INVALID"),
        ("garbage", "TOKEN_INVALID"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gateway.ExecuteAction(retry_request("wi-1001"), metadata=bearer(bad))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_details(raised.value).reason == reason
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await gateway.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=record("wi-1001", "failed")),
            metadata=(("authorization", "Basic abc"),),
        )
    assert error_details(malformed.value).reason == "TOKEN_MALFORMED"


async def test_other_tenant_is_refused_and_sees_nothing(
    mesh: Mesh, gateway: Stub, token: TokenFactory
) -> None:
    globex = token(subject="gina", tenant="globex")
    with pytest.raises(grpc.aio.AioRpcError) as discover:
        await gateway.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=record("wi-1001", "failed")),
            metadata=bearer(globex),
        )
    assert discover.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(discover.value).reason == "TENANT_MISMATCH"

    before = item_state(mesh, "acme", "wi-1002")
    with pytest.raises(grpc.aio.AioRpcError) as execute:
        await gateway.ExecuteAction(
            retry_request("wi-1002", status="stuck", tenant="acme"), metadata=bearer(globex)
        )
    assert execute.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(execute.value).reason == "TENANT_MISMATCH"
    # acme's item was not touched by globex's refused attempt.
    assert item_state(mesh, "acme", "wi-1002") == before

    mine = await gateway.ExecuteAction(
        retry_request("wi-1001", status="failed"), metadata=bearer(token())
    )
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await gateway.GetExecution(
            gateway_pb2.GetExecutionRequest(execution_id=mine.execution.execution_id),
            metadata=bearer(globex),
        )
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
    assert await timeline(gateway, globex, "wi-1001") == [
        e for e in await timeline(gateway, globex, "wi-1001") if e.tenant == "globex"
    ]
    assert all(e.tenant == "globex" for e in await timeline(gateway, globex, "wi-1001"))
    assert not any(e.actor == "alice" for e in await timeline(gateway, globex, "wi-1001"))


async def test_role_without_permission_sees_and_runs_nothing(
    gateway: Stub, token: TokenFactory
) -> None:
    viewer = token(subject="victor", roles=("viewer",))
    discovered = await gateway.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(record=record("wi-1001", "failed")),
        metadata=bearer(viewer),
    )
    assert list(discovered.actions) == []
    key = uuid.uuid4().hex
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gateway.ExecuteAction(retry_request("wi-1001", key=key), metadata=bearer(viewer))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(raised.value).reason == "POLICY_DENIED"

    async def denial_recorded() -> list[audit_pb2.AuditEvent]:
        return [e for e in await timeline(gateway, viewer, "wi-1001") if e.idempotency_key == key]

    (event,) = await eventually(denial_recorded)  # type: ignore[misc]
    assert event.outcome == common_pb2.OUTCOME_DENIED
    assert event.reason == "POLICY_DENIED" and event.actor == "victor"


async def test_restricted_record_is_visible_to_supervisor_but_not_executable(
    mesh: Mesh, gateway: Stub, token: TokenFactory
) -> None:
    # Restricted in the provider's own store (the system of record of work items).
    put_item(
        mesh, WorkItem("acme", "wi-1090", "inbound_email", "stuck", 1, sensitivity="restricted")
    )
    supervisor = token(subject="sam", roles=("supervisor",))
    # The caller claims the record is normal: the gateway governs on the source's facts.
    claimed = record("wi-1090", "stuck", sensitivity=common_pb2.SENSITIVITY_NORMAL)
    discovered = await gateway.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(record=claimed, skip_cache=True),
        metadata=bearer(supervisor),
    )
    assert "workitem.retry" in [a.descriptor.action_id for a in discovered.actions]
    assert discovered.facts.source == common_pb2.FACT_SOURCE_PROVIDER
    assert discovered.facts.vouched_by == "workitems"
    assert discovered.facts.sensitivity == common_pb2.SENSITIVITY_RESTRICTED
    request = retry_request("wi-1090", status="stuck")
    request.record.CopyFrom(claimed)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gateway.ExecuteAction(request, metadata=bearer(supervisor))
    assert error_details(raised.value).reason == "POLICY_DENIED"
    assert item_state(mesh, "acme", "wi-1090")[0] == "stuck"


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        (
            {
                "reason": common_pb2.InputValue(string_value="ok!"),
                "force": common_pb2.InputValue(bool_value=True),
            },
            "inputs.force",
        ),
        ({"reason": common_pb2.InputValue(integer_value=42)}, "inputs.reason"),
        ({}, "inputs.reason"),
        (
            {
                "reason": common_pb2.InputValue(string_value="ok"),
                "priority": common_pb2.InputValue(string_value="urgent"),
            },
            None,
        ),
    ],
    ids=["unknown-field", "wrong-type", "missing-required", "bad-enum-and-too-short"],
)
async def test_bad_inputs_are_invalid_argument_with_field_violations(
    gateway: Stub, token: TokenFactory, inputs: dict[str, common_pb2.InputValue], field: str | None
) -> None:
    key = uuid.uuid4().hex
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gateway.ExecuteAction(
            retry_request("wi-1001", inputs=inputs, key=key), metadata=bearer(token())
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(raised.value)
    assert details.reason == "INVALID_INPUT"
    fields = {v.field for v in details.violations}
    if field is None:
        assert fields == {"inputs.reason", "inputs.priority"}
    else:
        assert field in fields

    async def refusal_recorded() -> list[audit_pb2.AuditEvent]:
        return [e for e in await timeline(gateway, token(), "wi-1001") if e.idempotency_key == key]

    (event,) = await eventually(refusal_recorded)  # type: ignore[misc]
    assert event.outcome == common_pb2.OUTCOME_DENIED and event.reason == "INVALID_INPUT"


async def test_malformed_requests_are_invalid_argument(gateway: Stub, token: TokenFactory) -> None:
    no_key = retry_request("wi-1001")
    no_key.idempotency_key = ""
    no_record = gateway_pb2.ExecuteActionRequest(action_id="workitem.retry", idempotency_key="k-1")
    for request, field in ((no_key, "idempotency_key"), (no_record, "record")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gateway.ExecuteAction(request, metadata=bearer(token()))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in {v.field for v in error_details(raised.value).violations}
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await gateway.ExecuteAction(
            gateway_pb2.ExecuteActionRequest(
                action_id="nothing.here", record=record("wi-1001", "failed"), idempotency_key="k-2"
            ),
            metadata=bearer(token()),
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(unknown.value).reason == "UNKNOWN_ACTION"
