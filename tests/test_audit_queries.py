"""ListExecutions, GetTrace and `actionmesh audit verify` through the real session mesh."""

from __future__ import annotations

import json
import uuid

import grpc
import grpc.aio
import pytest

from actionmesh.mesh import Mesh
from actionmesh.rpc.errors import error_details
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually
from tests.governance_fixtures import case
from tests.test_cli import cli

pytestmark = pytest.mark.timeout(90)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
OUTCOME = common_pb2


async def execute(gateway: Stub, token: str, action: str, record_id: str) -> gateway_pb2.Execution:
    reply = await gateway.ExecuteAction(
        gateway_pb2.ExecuteActionRequest(
            action_id=action,
            record=case(record_id),
            idempotency_key=uuid.uuid4().hex,
            inputs={"note": common_pb2.InputValue(string_value="query test")},
        ),
        metadata=bearer(token),
        timeout=20,
    )
    return reply.execution


async def test_list_executions_filters_and_get_trace_are_tenant_scoped(
    gov: Stub, token: TokenFactory
) -> None:
    subject = f"query-{uuid.uuid4().hex[:8]}"
    mine = token(subject=subject)
    first = await execute(gov, mine, "govtest.echo", "q-1")
    second = await execute(gov, mine, "govtest.partial", "q-2")
    third = await execute(gov, mine, "govtest.echo", "q-3")
    assert (first.outcome, second.outcome) == (OUTCOME.OUTCOME_REJECTED, OUTCOME.OUTCOME_PARTIAL)

    async def listed(**filters: object) -> list[audit_pb2.ExecutionSummary]:
        reply = await gov.ListExecutions(
            gateway_pb2.ListExecutionsRequest(actor=subject, **filters),  # type: ignore[arg-type]
            metadata=bearer(mine),
            timeout=10,
        )
        return list(reply.executions)

    async def all_three_finished() -> bool:
        found = await listed()
        return len(found) == 3 and all(s.finished_at.seconds for s in found)

    await eventually(all_three_finished, timeout_s=15)
    everything = await listed()
    assert [s.execution_id for s in everything] == [
        third.execution_id,
        second.execution_id,
        first.execution_id,
    ]
    partial = everything[1]
    assert (partial.outcome, partial.reason, partial.actor) == (
        OUTCOME.OUTCOME_PARTIAL,
        "WRITE_BACK_FAILED",
        subject,
    )
    assert partial.external_ref == "job/q-2" and partial.trace_id == second.trace_id
    only_partial = await listed(outcomes=[OUTCOME.OUTCOME_PARTIAL])
    assert [s.execution_id for s in only_partial] == [second.execution_id]
    by_record = await listed(record=common_pb2.RecordRef(type="govtest", id="q-3"))
    assert [s.execution_id for s in by_record] == [third.execution_id]

    # Same subject name, other tenant: sees none of it.
    theirs = token(subject=subject, tenant="globex")
    other = await gov.ListExecutions(
        gateway_pb2.ListExecutionsRequest(actor=subject), metadata=bearer(theirs), timeout=10
    )
    assert list(other.executions) == []

    trace = await gov.GetTrace(
        gateway_pb2.GetTraceRequest(trace_id=second.trace_id), metadata=bearer(mine), timeout=10
    )
    assert {(e.execution_id, e.type) for e in trace.events} >= {
        (second.execution_id, audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED),
        (second.execution_id, audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED),
    }
    assert all(e.tenant == "acme" and e.trace_id == second.trace_id for e in trace.events)

    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await gov.GetTrace(
            gateway_pb2.GetTraceRequest(trace_id=second.trace_id),
            metadata=bearer(theirs),
            timeout=10,
        )
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await gov.GetTrace(
            gateway_pb2.GetTraceRequest(trace_id="not-a-trace"), metadata=bearer(mine), timeout=10
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_details(bad.value).violations] == ["trace_id"]

    with pytest.raises(grpc.aio.AioRpcError) as bad_filter:
        await listed(outcomes=[42])
    assert bad_filter.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_details(bad_filter.value).violations] == ["outcomes[0]"]


async def test_cli_executions_trace_and_audit_verify(
    mesh: Mesh, gov: Stub, token: TokenFactory
) -> None:
    subject = f"cli-{uuid.uuid4().hex[:8]}"
    mine = token(subject=subject)
    done = await execute(gov, mine, "govtest.partial", "q-cli")

    async def listed() -> list[dict[str, object]]:
        result = cli(mesh, "executions", "--actor", subject, "--json", token=mine)
        assert result.returncode == 0, result.stdout + result.stderr
        executions: list[dict[str, object]] = json.loads(result.stdout)["executions"]
        return executions if executions and "finished_at" in executions[0] else []

    found: list[dict[str, object]] = await eventually(listed, timeout_s=15)  # type: ignore[assignment]
    (summary,) = found
    assert summary["execution_id"] == done.execution_id
    assert summary["outcome"] == "OUTCOME_PARTIAL"

    table = cli(mesh, "executions", "--actor", subject, "--since", "1h", token=mine)
    assert table.returncode == 0 and done.execution_id in table.stdout and "PARTIAL" in table.stdout
    future = cli(mesh, "executions", "--actor", subject, "--since", "2999-01-01", token=mine)
    assert future.returncode == 0 and done.execution_id not in future.stdout

    trace = cli(mesh, "trace", done.trace_id, token=mine)
    assert trace.returncode == 0, trace.stdout + trace.stderr
    assert "execution finished" in trace.stdout and "WRITE_BACK_FAILED" in trace.stdout

    verified = cli(mesh, "audit", "verify", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    chains = {c["tenant"]: c for c in json.loads(verified.stdout)}
    assert chains["acme"]["intact"] is True and int(chains["acme"]["head_index"]) > 0
    table = cli(mesh, "audit", "verify", "--tenant", "acme")
    assert table.returncode == 0 and "intact" in table.stdout
