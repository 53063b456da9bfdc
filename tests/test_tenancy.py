"""Tenant isolation, RPC by RPC: tenant B cannot see, run, approve or read anything of A's.

Tenant acme makes one finished execution, one execution waiting for approval, and
their audit trail. A supervisor of globex (the strongest role there is) then tries
every gateway RPC on them. What B gets must tell it nothing: a foreign id is answered
exactly like an id that never existed (same code, reason and message), lists and
timelines contain none of A's entries, and a refused discovery or execution never
reaches a provider (so no provider-side lookup can leak through timing).

The audit log's own RPCs take the tenant from the request: they are internal (the
gateway is their only caller) and are not reachable through the gateway; see
docs/security.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from actionmesh.rpc.errors import error_details
from actionmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually
from tests.governance_fixtures import case
from tests.test_governance import DISCOVER_LOG, provider_calls, request

pytestmark = pytest.mark.timeout(120)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub


@dataclass(frozen=True)
class AcmeState:
    finished: gateway_pb2.Execution
    pending: gateway_pb2.Execution
    record_id: str


@pytest.fixture
async def acme(gov: Stub, token: TokenFactory) -> AcmeState:
    alice = token(subject="alice", tenant="acme")
    record_id = f"c-tenancy-{uuid.uuid4().hex[:6]}"
    finished = (
        await gov.ExecuteAction(
            request("partial", case(record_id)), metadata=bearer(alice), timeout=30
        )
    ).execution
    pending = (
        await gov.ExecuteAction(
            request("guarded", case(record_id), note="needs a second person"),
            metadata=bearer(alice),
            timeout=30,
        )
    ).execution
    assert finished.outcome == common_pb2.OUTCOME_PARTIAL
    assert pending.outcome == common_pb2.OUTCOME_PENDING_APPROVAL

    async def trail_stored() -> bool:
        history = await gov.GetRecordHistory(
            gateway_pb2.GetRecordHistoryRequest(
                record=common_pb2.RecordRef(type="govtest", id=record_id)
            ),
            metadata=bearer(alice),
        )
        return len(history.events) >= 3  # started, finished, approval requested

    await eventually(trail_stored, timeout_s=20)
    return AcmeState(finished, pending, record_id)


async def refusal(call: Awaitable[object]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    details = error_details(raised.value)
    return raised.value.code(), details.reason, raised.value.details() or ""


def never_existed(real_id: str) -> str:
    """An id of the same shape that was never issued."""
    return uuid.uuid4().hex if len(real_id) == 32 else f"{real_id[:-6]}{uuid.uuid4().hex[:6]}"


async def test_foreign_ids_are_answered_like_ids_that_never_existed(
    gov: Stub, token: TokenFactory, acme: AcmeState
) -> None:
    gus = bearer(token(subject="gus", tenant="globex", roles=("supervisor", "operator")))
    foreign_record = case(acme.record_id, tenant="globex")

    calls = {
        "GetExecution": lambda execution_id: gov.GetExecution(
            gateway_pb2.GetExecutionRequest(execution_id=execution_id), metadata=gus
        ),
        "ApproveExecution": lambda execution_id: gov.ApproveExecution(
            gateway_pb2.ApproveExecutionRequest(
                execution_id=execution_id, comment="looks fine", record=foreign_record
            ),
            metadata=gus,
        ),
        "RejectExecution": lambda execution_id: gov.RejectExecution(
            gateway_pb2.RejectExecutionRequest(execution_id=execution_id, comment="no"),
            metadata=gus,
        ),
    }
    for name, call in calls.items():
        for execution in (acme.finished, acme.pending):
            foreign = await refusal(call(execution.execution_id))
            made_up = await refusal(call(never_existed(execution.execution_id)))
            assert foreign[0] == grpc.StatusCode.NOT_FOUND, (name, foreign)
            # Same code, reason and message: nothing tells B that A's id exists.
            assert foreign == made_up, (name, foreign, made_up)
            assert "acme" not in foreign[2] and acme.record_id not in foreign[2]

    async def trace_refusal(trace_id: str) -> tuple[grpc.StatusCode, str, str]:
        code, reason, message = await refusal(
            gov.GetTrace(gateway_pb2.GetTraceRequest(trace_id=trace_id), metadata=gus)
        )
        return code, reason, message.replace(trace_id, "<the id asked for>")

    foreign = await trace_refusal(acme.finished.trace_id)
    assert foreign[0] == grpc.StatusCode.NOT_FOUND
    assert foreign == await trace_refusal(uuid.uuid4().hex)

    # The pending execution is still waiting: B's attempts decided nothing.
    alice = bearer(token(subject="alice", tenant="acme"))
    still = await gov.GetExecution(
        gateway_pb2.GetExecutionRequest(execution_id=acme.pending.execution_id), metadata=alice
    )
    assert still.execution.outcome == common_pb2.OUTCOME_PENDING_APPROVAL


async def test_lists_and_timelines_hold_nothing_of_the_other_tenant(
    gov: Stub, token: TokenFactory, acme: AcmeState
) -> None:
    gus = bearer(token(subject="gus", tenant="globex", roles=("supervisor", "operator")))
    ours = {acme.finished.execution_id, acme.pending.execution_id}

    history = await gov.GetRecordHistory(
        gateway_pb2.GetRecordHistoryRequest(
            record=common_pb2.RecordRef(type="govtest", id=acme.record_id),
            include_discovery=True,
        ),
        metadata=gus,
    )
    assert list(history.events) == []

    listed = await gov.ListExecutions(
        gateway_pb2.ListExecutionsRequest(
            record=common_pb2.RecordRef(type="govtest", id=acme.record_id)
        ),
        metadata=gus,
    )
    assert list(listed.executions) == []
    by_actor = await gov.ListExecutions(
        gateway_pb2.ListExecutionsRequest(actor="alice", page_size=500), metadata=gus
    )
    assert not ours & {e.execution_id for e in by_actor.executions}

    approvals = await gov.ListPendingApprovals(
        gateway_pb2.ListPendingApprovalsRequest(), metadata=gus
    )
    assert acme.pending.execution_id not in {a.execution.execution_id for a in approvals.approvals}

    # The same queries as acme do find them: the filters above were not simply empty.
    alice = bearer(token(subject="alice", tenant="acme"))
    mine = await gov.ListExecutions(
        gateway_pb2.ListExecutionsRequest(
            record=common_pb2.RecordRef(type="govtest", id=acme.record_id)
        ),
        metadata=alice,
    )
    assert ours <= {e.execution_id for e in mine.executions}


async def test_the_other_tenants_records_are_refused_before_any_provider_is_asked(
    gov: Stub, token: TokenFactory, acme: AcmeState, govtest: Path
) -> None:
    gus = bearer(token(subject="gus", tenant="globex", roles=("supervisor", "operator")))
    acme_record = case(acme.record_id)  # tenant acme, asked with globex's token
    discovered_before = len(provider_calls(govtest, DISCOVER_LOG, record=acme.record_id))

    code, reason, message = await refusal(
        gov.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=acme_record, skip_cache=True), metadata=gus
        )
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_MISMATCH")
    key = uuid.uuid4().hex
    code, reason, message = await refusal(
        gov.ExecuteAction(request("partial", acme_record, key=key), metadata=gus)
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_MISMATCH")
    assert "acme" not in message

    assert provider_calls(govtest, key=key) == []
    assert len(provider_calls(govtest, DISCOVER_LOG, record=acme.record_id)) == discovered_before
