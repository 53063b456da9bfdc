"""Long-running actions through real processes: accepted, progress, final, cancel, overrun.

The ``longjobs`` provider (tests/long_provider.py) runs each execution until the test
opens its gates, so the order of events is the test's: the gateway answers ACCEPTED at
once, follows the execution by polling the provider, records its progress and its final
outcome on the same execution, lets a permitted caller cancel it (policy decides, the
evidence says who and why), and ends one that runs past its maximum duration TIMED_OUT,
then records what the provider finally reports.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from actionmesh.mesh import Mesh
from actionmesh.rpc.errors import error_details
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually, vouching_channel
from tests.long_provider import RECORD_TYPE, gate_path
from tests.test_cli import cli

pytestmark = pytest.mark.timeout(120)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
T = audit_pb2.AuditEventType
PROVIDER = "longjobs"


@pytest.fixture(scope="module")
def longjobs(mesh: Mesh) -> Iterator[Path]:
    """The provider's data directory (where the gates are)."""
    mesh.start_provider("tests.long_provider", name=PROVIDER)
    yield mesh.data_dir / "data" / "providers"
    mesh.stop_service(PROVIDER)


def job(action: str = "lrjob.run", key: str = "") -> gateway_pb2.ExecuteActionRequest:
    return gateway_pb2.ExecuteActionRequest(
        action_id=action,
        record=common_pb2.RecordContext(
            tenant="acme", type=RECORD_TYPE, id=f"job-{uuid.uuid4().hex[:8]}", status="open"
        ),
        idempotency_key=key or uuid.uuid4().hex,
    )


def open_gate(data_dir: Path, key: str, step: int) -> None:
    gate_path(data_dir, key, step).write_text("go")


async def offered(stub: Stub, operator: tuple[tuple[str, str]]) -> bool:
    reply = await stub.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(record=job().record, skip_cache=True),
        metadata=operator,
    )
    return {"lrjob.run", "lrjob.stuck", "lrjob.fixed"} <= {
        a.descriptor.action_id for a in reply.actions if a.available
    }


async def get(
    stub: Stub, operator: tuple[tuple[str, str]], execution_id: str
) -> gateway_pb2.Execution:
    reply = await stub.GetExecution(
        gateway_pb2.GetExecutionRequest(execution_id=execution_id), metadata=operator, timeout=10
    )
    return reply.execution


async def timeline(
    stub: Stub, operator: tuple[tuple[str, str]], request: gateway_pb2.ExecuteActionRequest
) -> list[audit_pb2.AuditEvent]:
    history = await stub.GetRecordHistory(
        gateway_pb2.GetRecordHistoryRequest(
            record=common_pb2.RecordRef(type=RECORD_TYPE, id=request.record.id)
        ),
        metadata=operator,
        timeout=10,
    )
    return sorted(history.events, key=lambda e: e.sequence)


async def until(
    stub: Stub,
    operator: tuple[tuple[str, str]],
    execution_id: str,
    outcome: common_pb2.Outcome.ValueType,
) -> gateway_pb2.Execution:
    async def reached() -> gateway_pb2.Execution | None:
        found = await get(stub, operator, execution_id)
        return found if found.outcome == outcome else None

    result = await eventually(reached, timeout_s=30)
    assert isinstance(result, gateway_pb2.Execution)
    return result


async def test_accepted_then_progress_then_the_final_outcome_on_the_same_execution(
    mesh: Mesh, longjobs: Path, token: TokenFactory
) -> None:
    operator = bearer(token())
    request = job()
    key = request.idempotency_key
    async with vouching_channel(mesh) as channel:
        stub = Stub(channel)
        await eventually(lambda: offered(stub, operator), timeout_s=20)
        reply = await stub.ExecuteAction(request, metadata=operator, timeout=10)
        accepted = reply.execution
        assert accepted.outcome == common_pb2.OUTCOME_ACCEPTED, accepted
        assert accepted.accepted_at.seconds and accepted.run_deadline.seconds
        assert not accepted.finished_at.seconds
        # ACCEPTED is known, not unknown: not listed as unresolved.
        listed = await stub.ListExecutions(
            gateway_pb2.ListExecutionsRequest(unresolved=True), metadata=operator
        )
        assert accepted.execution_id not in {e.execution_id for e in listed.unresolved}
        # A same-key retry returns the same execution, still at work.
        again = await stub.ExecuteAction(request, metadata=operator, timeout=10)
        assert again.execution.execution_id == accepted.execution_id
        assert again.execution.outcome == common_pb2.OUTCOME_ACCEPTED

        open_gate(longjobs, key, 1)

        async def halfway() -> bool:
            found = await get(stub, operator, accepted.execution_id)
            return found.progress.percent == 50 and found.progress.message == "halfway"

        await eventually(halfway, timeout_s=20)
        shown = await asyncio.to_thread(
            cli, mesh, "execution", accepted.execution_id, token=token()
        )
        assert "progress: 50% halfway" in shown.stdout, shown.stdout + shown.stderr

        open_gate(longjobs, key, 2)
        done = await until(stub, operator, accepted.execution_id, common_pb2.OUTCOME_SUCCEEDED)
        assert done.external_ref == f"job-{key[:8]}"
        assert [(c.field, c.before, c.after) for c in done.changes] == [("state", "queued", "done")]
        assert done.finished_at.seconds and done.reconcile_state == gateway_pb2.RECONCILE_STATE_NONE

        async def told_in_order() -> list[int] | None:
            kinds = [e.type for e in await timeline(stub, operator, request)]
            return kinds if kinds and kinds[-1] == T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED else None

        kinds = await eventually(told_in_order, timeout_s=20)
        assert isinstance(kinds, list)
        assert kinds[:2] == [
            T.AUDIT_EVENT_TYPE_EXECUTION_STARTED,
            T.AUDIT_EVENT_TYPE_EXECUTION_ACCEPTED,
        ]
        progress = kinds[2:-1]
        assert progress and set(progress) == {T.AUDIT_EVENT_TYPE_EXECUTION_PROGRESS}, kinds
        events = await timeline(stub, operator, request)
        assert events[-1].outcome == common_pb2.OUTCOME_SUCCEEDED
        assert any(e.progress.percent == 50 for e in events if e.progress.message)


async def test_a_cancel_is_governed_audited_and_stops_the_provider(
    mesh: Mesh, longjobs: Path, token: TokenFactory
) -> None:
    operator = bearer(token())
    auditor = bearer(token(subject="audrey", roles=("auditor",)))
    request = job()
    async with vouching_channel(mesh) as channel:
        stub = Stub(channel)
        await eventually(lambda: offered(stub, operator), timeout_s=20)
        accepted = (await stub.ExecuteAction(request, metadata=operator, timeout=10)).execution
        assert accepted.outcome == common_pb2.OUTCOME_ACCEPTED

        # Policy decides: an auditor may not stop it; the refusal is evidence.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CancelExecution(
                gateway_pb2.CancelExecutionRequest(
                    execution_id=accepted.execution_id, comment="curious"
                ),
                metadata=auditor,
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_details(refused.value).reason == "POLICY_DENIED"
        # A comment is required.
        with pytest.raises(grpc.aio.AioRpcError) as bare:
            await stub.CancelExecution(
                gateway_pb2.CancelExecutionRequest(execution_id=accepted.execution_id),
                metadata=operator,
            )
        assert bare.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # The operator cancels through the CLI.
        cancelled = await asyncio.to_thread(
            cli,
            mesh,
            "cancel",
            accepted.execution_id,
            "--comment",
            "opened on the wrong case",
            token=token(),
        )
        assert cancelled.returncode in (0, 3), cancelled.stdout + cancelled.stderr
        assert "asked by alice" in cancelled.stdout, cancelled.stdout
        stopped = await until(stub, operator, accepted.execution_id, common_pb2.OUTCOME_CANCELLED)
        assert stopped.cancel_requested_by == "alice"
        assert stopped.cancel_comment == "opened on the wrong case"

        # Once it ended, there is nothing to cancel.
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.CancelExecution(
                gateway_pb2.CancelExecutionRequest(
                    execution_id=accepted.execution_id, comment="again"
                ),
                metadata=operator,
            )
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(late.value).reason == "EXECUTION_NOT_RUNNING"

        async def evidence() -> list[audit_pb2.AuditEvent] | None:
            events = await timeline(stub, operator, request)
            done = any(e.type == T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED for e in events)
            return events if done else None

        events = await eventually(evidence, timeout_s=20)
        assert isinstance(events, list)
        asks = [e for e in events if e.type == T.AUDIT_EVENT_TYPE_EXECUTION_CANCEL_REQUESTED]
        assert [(e.actor, e.reason) for e in asks] == [
            ("audrey", "POLICY_DENIED"),
            ("alice", "CANCEL_REQUESTED"),
        ]
        assert asks[1].message == "opened on the wrong case"
        assert events[-1].type == T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
        assert events[-1].outcome == common_pb2.OUTCOME_CANCELLED


async def test_an_action_that_cannot_be_cancelled_says_so(
    mesh: Mesh, longjobs: Path, token: TokenFactory
) -> None:
    operator = bearer(token())
    request = job("lrjob.fixed")
    async with vouching_channel(mesh) as channel:
        stub = Stub(channel)
        await eventually(lambda: offered(stub, operator), timeout_s=20)
        accepted = (await stub.ExecuteAction(request, metadata=operator, timeout=10)).execution
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CancelExecution(
                gateway_pb2.CancelExecutionRequest(
                    execution_id=accepted.execution_id, comment="stop"
                ),
                metadata=operator,
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(refused.value).reason == "ACTION_NOT_CANCELLABLE"
        for step in (1, 2):
            open_gate(longjobs, request.idempotency_key, step)
        await until(stub, operator, accepted.execution_id, common_pb2.OUTCOME_SUCCEEDED)


async def test_past_its_maximum_duration_it_times_out_and_is_reconciled(
    mesh: Mesh, longjobs: Path, token: TokenFactory
) -> None:
    operator = bearer(token())
    request = job("lrjob.stuck")
    async with vouching_channel(mesh) as channel:
        stub = Stub(channel)
        await eventually(lambda: offered(stub, operator), timeout_s=20)
        accepted = (await stub.ExecuteAction(request, metadata=operator, timeout=10)).execution
        assert accepted.outcome == common_pb2.OUTCOME_ACCEPTED
        overran = await until(stub, operator, accepted.execution_id, common_pb2.OUTCOME_TIMED_OUT)
        assert overran.reason == "MAX_DURATION_EXCEEDED"

        # The gateway told the provider to stop; what it reports is the resolved outcome.
        async def resolved() -> gateway_pb2.Execution | None:
            found = await get(stub, operator, accepted.execution_id)
            return found if found.reconcile_state == gateway_pb2.RECONCILE_STATE_RESOLVED else None

        settled = await eventually(resolved, timeout_s=40)
        assert isinstance(settled, gateway_pb2.Execution)
        assert settled.outcome == common_pb2.OUTCOME_TIMED_OUT
        assert settled.late_outcome == common_pb2.OUTCOME_CANCELLED


async def test_a_restarted_gateway_keeps_following_an_accepted_execution(
    mesh: Mesh, longjobs: Path, token: TokenFactory
) -> None:
    """Its own gateway, SIGKILLed while the execution is ACCEPTED and restarted on its
    database: the final outcome is recorded all the same."""
    operator = bearer(token())
    request = job()
    key = request.idempotency_key
    name = f"gateway-lr-{uuid.uuid4().hex[:6]}"
    service = mesh.start_gateway(name)
    try:
        async with vouching_channel(mesh, service.address) as channel:
            stub = Stub(channel)
            await eventually(lambda: offered(stub, operator), timeout_s=20)
            reply = await stub.ExecuteAction(request, metadata=operator, timeout=10)
            accepted = reply.execution
            assert accepted.outcome == common_pb2.OUTCOME_ACCEPTED
        mesh.stop_service(name, kill=True)
        open_gate(longjobs, key, 1)
        open_gate(longjobs, key, 2)
        service = mesh.restart_service(name)
        async with vouching_channel(mesh, service.address) as channel:
            stub = Stub(channel)
            await eventually(lambda: offered(stub, operator), timeout_s=30)
            done = await until(stub, operator, accepted.execution_id, common_pb2.OUTCOME_SUCCEEDED)
            assert done.external_ref == f"job-{key[:8]}"
        listed = await asyncio.to_thread(
            cli,
            mesh,
            "executions",
            "--unresolved",
            "--json",
            "--gateway",
            service.address,
            token=token(),
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert accepted.execution_id not in {e["execution_id"] for e in json.loads(listed.stdout)}
    finally:
        mesh.stop_service(name)
