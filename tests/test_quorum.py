"""Approval quorum through real processes: policy decides how many people must approve.

The shipped policy asks two approvers, one of them a supervisor, for a ticket's service
level set to ``critical`` (``critical-service-level-two-approvers``); anything else
needs one. One approval keeps it pending and says what is still needed, the same person
cannot count twice, the requester never counts, a rejection ends it, and two replicas
approving at once count each approver once and dispatch once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.policy import ActionSubject, PolicyEngine, PolicyError, parse_policies
from actionmesh.mesh import Mesh
from actionmesh.providers.records.store import Ticket
from actionmesh.rpc.errors import error_details
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually, vouching_channel
from tests.provider_state import put_ticket, ticket_state
from tests.test_cli import cli

pytestmark = pytest.mark.timeout(120)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
PENDING = common_pb2.OUTCOME_PENDING_APPROVAL


def new_ticket(mesh: Mesh) -> common_pb2.RecordContext:
    ticket_id = f"t-q{uuid.uuid4().hex[:6]}"
    put_ticket(
        mesh,
        Ticket("acme", ticket_id, "Quorum", "open", "support", "normal", "standard"),
    )
    return common_pb2.RecordContext(tenant="acme", type="ticket", id=ticket_id, status="open")


def level(record: common_pb2.RecordContext, to: str) -> gateway_pb2.ExecuteActionRequest:
    return gateway_pb2.ExecuteActionRequest(
        action_id="ticket.change_service_level",
        record=record,
        inputs={
            "level": common_pb2.InputValue(string_value=to),
            "reason": common_pb2.InputValue(string_value="customer escalation"),
        },
        idempotency_key=uuid.uuid4().hex,
    )


async def approve(
    stub: Stub, who: str, execution_id: str, comment: str = "ok"
) -> gateway_pb2.Execution:
    reply = await stub.ApproveExecution(
        gateway_pb2.ApproveExecutionRequest(execution_id=execution_id, comment=comment),
        metadata=bearer(who),
        timeout=15,
    )
    return reply.execution


async def refused(call: asyncio.Future[object] | object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


@pytest.fixture
async def stub(mesh: Mesh, token: TokenFactory) -> AsyncIterator[Stub]:
    async with vouching_channel(mesh) as channel:
        gateway = Stub(channel)
        probe = new_ticket(mesh)

        async def offered() -> bool:
            reply = await gateway.DiscoverActions(
                gateway_pb2.DiscoverActionsRequest(record=probe, skip_cache=True),
                metadata=bearer(token()),
            )
            return any(
                a.descriptor.action_id == "ticket.change_service_level" for a in reply.actions
            )

        await eventually(offered, timeout_s=20)
        yield gateway


async def test_two_approvers_one_a_supervisor_for_a_critical_service_level(
    mesh: Mesh, stub: Stub, token: TokenFactory
) -> None:
    alice = token()
    bob = token(subject="bob", roles=("approver",))
    sam = token(subject="sam", roles=("supervisor",))
    record = new_ticket(mesh)
    held = (await stub.ExecuteAction(level(record, "critical"), metadata=bearer(alice))).execution
    assert held.outcome == PENDING
    assert (held.approval.required_approvals, list(held.approval.required_roles)) == (
        2,
        ["supervisor"],
    )
    assert "2 more approval(s)" in held.approval.still_needed

    # The requester never counts.
    own = await refused(approve(stub, alice, held.execution_id))
    assert error_details(own).reason == "SELF_APPROVAL_FORBIDDEN"

    # One approval: still pending, counted, and what remains is said.
    first = await approve(stub, bob, held.execution_id, "looks right")
    assert first.outcome == PENDING
    assert [(v.approver, v.comment) for v in first.approval.votes] == [("bob", "looks right")]
    assert first.approval.still_needed == "1 more approval(s); an approver with role supervisor"
    assert ticket_state(mesh, "acme", record.id)[0].service_level == "standard"
    # The inbox says how far it got and what is missing.
    inbox = await asyncio.to_thread(cli, mesh, "approvals", token=sam, columns=400)
    assert held.execution_id in inbox.stdout, inbox.stdout + inbox.stderr
    assert "1 of 2, incl. supervisor (bob)" in inbox.stdout, inbox.stdout

    # Nobody counts twice.
    twice = await refused(approve(stub, bob, held.execution_id))
    assert twice.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(twice).reason == "APPROVER_ALREADY_COUNTED"

    # The second, a supervisor: the quorum is met and it runs, once.
    done = await approve(stub, sam, held.execution_id, "agreed")
    assert done.outcome == common_pb2.OUTCOME_SUCCEEDED, done
    assert [v.approver for v in done.approval.votes] == ["bob", "sam"]
    assert done.approval.approver == "sam" and not done.approval.still_needed
    ticket, changes = ticket_state(mesh, "acme", record.id)
    assert ticket.service_level == "critical" and len(changes) == 1

    # The evidence: requested, one counted approval, the granting one, started, finished.
    async def evidence() -> list[audit_pb2.AuditEvent] | None:
        history = await stub.GetRecordHistory(
            gateway_pb2.GetRecordHistoryRequest(
                record=common_pb2.RecordRef(type="ticket", id=record.id)
            ),
            metadata=bearer(alice),
        )
        events = [e for e in history.events if e.execution_id == held.execution_id]
        finished = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
        return events if any(e.type == finished for e in events) else None

    events = await eventually(evidence, timeout_s=20)
    assert isinstance(events, list)
    granted = [
        (e.actor, e.reason) for e in events if e.type == audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_GRANTED
    ]
    assert granted == [("bob", "APPROVAL_COUNTED"), ("sam", "")]
    refusals = [e for e in events if e.type == audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REFUSED]
    assert {e.reason for e in refusals} == {"SELF_APPROVAL_FORBIDDEN", "APPROVER_ALREADY_COUNTED"}


async def test_two_approvers_without_a_supervisor_are_not_enough(
    mesh: Mesh, stub: Stub, token: TokenFactory
) -> None:
    record = new_ticket(mesh)
    held = (await stub.ExecuteAction(level(record, "critical"), metadata=bearer(token()))).execution
    await approve(stub, token(subject="bob", roles=("approver",)), held.execution_id)
    second = await approve(stub, token(subject="ann", roles=("approver",)), held.execution_id)
    assert second.outcome == PENDING
    assert second.approval.still_needed == "an approver with role supervisor"
    # A rejection by anyone permitted ends it.
    rejected = await stub.RejectExecution(
        gateway_pb2.RejectExecutionRequest(execution_id=held.execution_id, comment="no"),
        metadata=bearer(token(subject="sam", roles=("supervisor",))),
    )
    assert (rejected.execution.outcome, rejected.execution.reason) == (
        common_pb2.OUTCOME_DENIED,
        "APPROVAL_REJECTED",
    )
    assert ticket_state(mesh, "acme", record.id)[0].service_level == "standard"


async def test_any_other_level_needs_one_approver(
    mesh: Mesh, stub: Stub, token: TokenFactory
) -> None:
    record = new_ticket(mesh)
    held = (await stub.ExecuteAction(level(record, "priority"), metadata=bearer(token()))).execution
    assert (held.approval.required_approvals, list(held.approval.required_roles)) == (1, [])
    done = await approve(stub, token(subject="bob", roles=("approver",)), held.execution_id)
    assert done.outcome == common_pb2.OUTCOME_SUCCEEDED


async def test_two_replicas_approving_at_once_count_each_approver_once_and_dispatch_once(
    mesh: Mesh, stub: Stub, token: TokenFactory, postgres_url: str
) -> None:
    names = [f"gateway-quorum-{side}-{uuid.uuid4().hex[:6]}" for side in "ab"]
    services = [mesh.start_gateway(name, database_url=postgres_url) for name in names]
    try:
        async with (
            vouching_channel(mesh, services[0].address) as ca,
            vouching_channel(mesh, services[1].address) as cb,
        ):
            a, b = Stub(ca), Stub(cb)
            record = new_ticket(mesh)
            alice = token()

            async def ready(gateway: Stub) -> bool:
                reply = await gateway.DiscoverActions(
                    gateway_pb2.DiscoverActionsRequest(record=record, skip_cache=True),
                    metadata=bearer(alice),
                )
                return any(
                    a.descriptor.action_id == "ticket.change_service_level" for a in reply.actions
                )

            for gateway in (a, b):
                await eventually(lambda gateway=gateway: ready(gateway), timeout_s=20)
            held = (
                await a.ExecuteAction(level(record, "critical"), metadata=bearer(alice))
            ).execution
            # Two approvers, one per replica, at the same moment; then a third too late.
            bob = token(subject="bob", roles=("approver",))
            sam = token(subject="sam", roles=("supervisor",))
            answers = await asyncio.gather(
                approve(a, bob, held.execution_id),
                approve(b, sam, held.execution_id),
                return_exceptions=True,
            )
            assert not [x for x in answers if isinstance(x, BaseException)], answers
            final = await a.GetExecution(
                gateway_pb2.GetExecutionRequest(execution_id=held.execution_id),
                metadata=bearer(alice),
            )
            assert final.execution.outcome == common_pb2.OUTCOME_SUCCEEDED, final.execution
            assert sorted(v.approver for v in final.execution.approval.votes) == ["bob", "sam"]
            ticket, changes = ticket_state(mesh, "acme", record.id)
            assert ticket.service_level == "critical" and len(changes) == 1
            late = await refused(
                approve(b, token(subject="ann", roles=("supervisor",)), held.execution_id)
            )
            assert error_details(late).reason == "APPROVAL_NOT_PENDING"
    finally:
        for name in names:
            mesh.stop_service(name)


@pytest.mark.parametrize(
    ("annotations", "problem"),
    [
        ('@approvers("9")', "@approvers must be"),
        ('@approvers("two")', "@approvers must be"),
        ('@approvers("2") @approver_roles("super visor")', "invalid role"),
    ],
)
def test_a_malformed_quorum_is_refused_when_the_policies_load(
    tmp_path: Path, annotations: str, problem: str
) -> None:
    text = f"""
@id("bad-quorum")
{annotations}
permit (principal, action == ActionMesh::Action::"quorum", resource);
"""
    with pytest.raises(PolicyError, match=problem):
        parse_policies(tmp_path / "p.cedar", text)


def test_the_largest_quorum_and_every_role_apply(tmp_path: Path) -> None:
    path = tmp_path / "p.cedar"
    path.write_text(
        """
@id("two") @approvers("2") @approver_roles("supervisor")
permit (principal, action == ActionMesh::Action::"quorum", resource);
@id("three") @approvers("3") @approver_roles("security,supervisor")
permit (principal, action == ActionMesh::Action::"quorum", resource)
when { context.inputs has level && context.inputs.level == "critical" };
"""
    )
    engine = PolicyEngine(path)
    caller = Caller(subject="alice", tenant="acme", roles=("operator",))
    record = common_pb2.RecordContext(tenant="acme", type="ticket", id="t-1", status="open")
    subject = ActionSubject(
        "ticket.change_service_level",
        "records",
        common_pb2.ActionDescriptor(
            action_id="ticket.change_service_level", requires_approval=True
        ),
    )
    both = engine.quorum(caller, record, subject, {"level": "critical"})
    assert (both.approvers, both.roles, both.policy_ids) == (
        3,
        ("security", "supervisor"),
        ("three", "two"),
    )
    one = engine.quorum(caller, record, subject, {"level": "priority"})
    assert (one.approvers, one.roles) == (2, ("supervisor",))
    assert one.met_by([("bob", ("approver",)), ("sam", ("supervisor",))])
    assert not one.met_by([("bob", ("approver",)), ("ann", ("approver",))])
