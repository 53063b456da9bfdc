"""Previews (dry runs) through real processes: gateway, registry, audit log, records.

A preview changes nothing in the provider's store and says what executing then does;
it is governed like an execution and audited. An execution held for approval keeps the
preview its approvers see, and is dispatched with its digest: a ticket that moved
between the request and the approval is refused (REJECTED
STATE_CHANGED_SINCE_PREVIEW), audited, and left as it was.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from actionmesh.mesh import Mesh
from actionmesh.providers.records.store import Ticket
from actionmesh.rpc.errors import error_details
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually, vouching_channel
from tests.provider_state import put_ticket, ticket_state
from tests.test_cli import cli

pytestmark = pytest.mark.timeout(120)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
PREVIEWED = audit_pb2.AUDIT_EVENT_TYPE_ACTION_PREVIEWED


def new_ticket(mesh: Mesh) -> common_pb2.RecordContext:
    ticket_id = f"t-p{uuid.uuid4().hex[:6]}"
    put_ticket(mesh, Ticket("acme", ticket_id, "Preview", "open", "support", "normal", "standard"))
    return common_pb2.RecordContext(tenant="acme", type="ticket", id=ticket_id, status="open")


def text(value: str) -> common_pb2.InputValue:
    return common_pb2.InputValue(string_value=value)


def routing(field: str, value: str) -> dict[str, common_pb2.InputValue]:
    return {"field": text(field), "value": text(value), "reason": text("rebalancing queues")}


def service_level(level: str) -> dict[str, common_pb2.InputValue]:
    return {"level": text(level), "reason": text("customer escalation")}


def changes(message: gateway_pb2.Execution | common_pb2.ActionPreview) -> list[tuple[str, ...]]:
    return [(c.field, c.before, c.after) for c in message.changes]


async def history(stub: Stub, who: str, record_id: str) -> list[audit_pb2.AuditEvent]:
    reply = await stub.GetRecordHistory(
        gateway_pb2.GetRecordHistoryRequest(
            record=common_pb2.RecordRef(type="ticket", id=record_id)
        ),
        metadata=bearer(who),
    )
    return list(reply.events)


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


@pytest.fixture
async def stub(mesh: Mesh, token: TokenFactory) -> AsyncIterator[Stub]:
    async with vouching_channel(mesh) as channel:
        gateway = Stub(channel)
        probe = new_ticket(mesh)

        async def previewable() -> bool:
            reply = await gateway.DiscoverActions(
                gateway_pb2.DiscoverActionsRequest(record=probe, skip_cache=True),
                metadata=bearer(token()),
            )
            return any(
                a.descriptor.action_id == "ticket.change_service_level" and a.descriptor.previewable
                for a in reply.actions
            )

        await eventually(previewable, timeout_s=20)
        yield gateway


async def test_a_preview_changes_nothing_and_says_what_execute_then_does(
    mesh: Mesh, stub: Stub, token: TokenFactory
) -> None:
    alice = token()
    record = new_ticket(mesh)
    before, log_before = ticket_state(mesh, "acme", record.id)
    request = gateway_pb2.PreviewActionRequest(
        action_id="ticket.update_routing", record=record, inputs=routing("priority", "high")
    )
    first = await stub.PreviewAction(request, metadata=bearer(alice))
    again = await stub.PreviewAction(request, metadata=bearer(alice))
    preview = first.preview
    assert changes(preview) == [("priority", "normal", "high")]
    assert preview.effect and preview.state_digest and preview.provider_id == "records"
    assert first.facts.vouched_by == "records"
    # Stable, and read-only: the provider's store is exactly as it was.
    assert (again.preview.state_digest, changes(again.preview)) == (
        preview.state_digest,
        changes(preview),
    )
    assert ticket_state(mesh, "acme", record.id) == (before, log_before)

    # Executing the same request does what the preview said.
    done = await stub.ExecuteAction(
        gateway_pb2.ExecuteActionRequest(
            action_id="ticket.update_routing",
            record=record,
            inputs=routing("priority", "high"),
            idempotency_key=uuid.uuid4().hex,
        ),
        metadata=bearer(alice),
    )
    assert done.execution.outcome == common_pb2.OUTCOME_SUCCEEDED, done.execution
    assert changes(done.execution) == changes(preview)
    assert ticket_state(mesh, "acme", record.id)[0].priority == "high"
    # The state moved: a new preview names another digest.
    moved = await stub.PreviewAction(
        gateway_pb2.PreviewActionRequest(
            action_id="ticket.update_routing", record=record, inputs=routing("priority", "low")
        ),
        metadata=bearer(alice),
    )
    assert moved.preview.state_digest != preview.state_digest
    assert changes(moved.preview) == [("priority", "high", "low")]

    # Each preview is evidence on the record's timeline, with what it showed.
    async def previews() -> list[audit_pb2.AuditEvent] | None:
        events = [e for e in await history(stub, alice, record.id) if e.type == PREVIEWED]
        return events if len(events) == 3 else None

    events = await eventually(previews, timeout_s=20)
    assert isinstance(events, list)
    assert all(e.actor == "alice" and e.action_id == "ticket.update_routing" for e in events)
    assert changes(events[0].preview) == [("priority", "normal", "high")]
    assert events[0].policy_decisions and events[0].policy_decisions[0].operation == "execute"
    assert events[0].inputs["value"] == "high"


async def test_previews_are_governed_and_refused_with_reasons(
    mesh: Mesh, stub: Stub, token: TokenFactory
) -> None:
    record = new_ticket(mesh)

    def preview(action: str, inputs: dict[str, common_pb2.InputValue]) -> object:
        return stub.PreviewAction(
            gateway_pb2.PreviewActionRequest(action_id=action, record=record, inputs=inputs),
            metadata=bearer(token()),
        )

    # What Execute would refuse, the preview says, with the provider's reason.
    same = await refused(preview("ticket.change_service_level", service_level("standard")))
    assert same.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(same).reason == "NO_CHANGE"
    # An action without a preview says so.
    none = await refused(
        stub.PreviewAction(
            gateway_pb2.PreviewActionRequest(
                action_id="workitem.retry",
                record=common_pb2.RecordContext(
                    tenant="acme", type="workitem", id="wi-1001", status="failed"
                ),
                inputs={"reason": text("a retry is safe now")},
            ),
            metadata=bearer(token()),
        )
    )
    assert none.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_details(none).reason == "PREVIEW_NOT_SUPPORTED"
    # Invalid inputs are refused by the gateway before any provider is asked.
    bad = await refused(preview("ticket.update_routing", routing("colour", "blue")))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Policy: whoever may not execute the action may not preview it either.
    denied = await refused(
        stub.PreviewAction(
            gateway_pb2.PreviewActionRequest(
                action_id="ticket.update_routing",
                record=record,
                inputs=routing("priority", "high"),
            ),
            metadata=bearer(token(subject="vic", roles=("viewer",))),
        )
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(denied).reason == "POLICY_DENIED"
    # Another tenant's record is not previewed.
    other = await refused(
        stub.PreviewAction(
            gateway_pb2.PreviewActionRequest(
                action_id="ticket.update_routing",
                record=record,
                inputs=routing("priority", "high"),
            ),
            metadata=bearer(token(subject="carol", tenant="globex")),
        )
    )
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED

    async def refusals() -> list[audit_pb2.AuditEvent] | None:
        events = [e for e in await history(stub, token(), record.id) if e.type == PREVIEWED]
        return events if len(events) >= 3 else None

    events = await eventually(refusals, timeout_s=20)
    assert isinstance(events, list)
    outcomes = {(e.outcome, e.reason) for e in events}
    assert (common_pb2.OUTCOME_REJECTED, "NO_CHANGE") in outcomes
    assert (common_pb2.OUTCOME_DENIED, "POLICY_DENIED") in outcomes
    assert ticket_state(mesh, "acme", record.id)[1] == []


async def test_the_approver_sees_the_preview_and_a_ticket_moved_since_is_refused(
    mesh: Mesh, stub: Stub, token: TokenFactory
) -> None:
    alice = token()
    bob = token(subject="bob", roles=("approver",))
    record = new_ticket(mesh)
    held = (
        await stub.ExecuteAction(
            gateway_pb2.ExecuteActionRequest(
                action_id="ticket.change_service_level",
                record=record,
                inputs=service_level("priority"),
                idempotency_key=uuid.uuid4().hex,
            ),
            metadata=bearer(alice),
        )
    ).execution
    assert held.outcome == common_pb2.OUTCOME_PENDING_APPROVAL
    assert changes(held.preview) == [("service_level", "standard", "priority")]
    assert held.preview.state_digest and held.preview.effect

    # The inbox shows it, through the RPC and the CLI.
    inbox = await stub.ListPendingApprovals(
        gateway_pb2.ListPendingApprovalsRequest(
            record=common_pb2.RecordRef(type="ticket", id=record.id)
        ),
        metadata=bearer(bob),
    )
    [pending] = inbox.approvals
    assert pending.execution.preview == held.preview
    shown = await asyncio.to_thread(cli, mesh, "approvals", token=bob, columns=400)
    assert "service_level: standard -> priority" in shown.stdout, shown.stdout + shown.stderr

    # Someone changes the ticket before the approval: what was approved no longer holds.
    moved = await stub.ExecuteAction(
        gateway_pb2.ExecuteActionRequest(
            action_id="ticket.update_routing",
            record=record,
            inputs=routing("queue", "billing"),
            idempotency_key=uuid.uuid4().hex,
        ),
        metadata=bearer(alice),
    )
    assert moved.execution.outcome == common_pb2.OUTCOME_SUCCEEDED, moved.execution
    approved = (
        await stub.ApproveExecution(
            gateway_pb2.ApproveExecutionRequest(execution_id=held.execution_id, comment="ok"),
            metadata=bearer(bob),
        )
    ).execution
    assert (approved.outcome, approved.reason) == (
        common_pb2.OUTCOME_REJECTED,
        "STATE_CHANGED_SINCE_PREVIEW",
    ), approved
    ticket, log = ticket_state(mesh, "acme", record.id)
    assert ticket.service_level == "standard" and [c.field for c in log] == ["queue"]

    async def finished() -> audit_pb2.AuditEvent | None:
        for event in await history(stub, alice, record.id):
            if (
                event.execution_id == held.execution_id
                and event.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
            ):
                return event
        return None

    event = await eventually(finished, timeout_s=20)
    assert isinstance(event, audit_pb2.AuditEvent)
    assert (event.outcome, event.reason) == (
        common_pb2.OUTCOME_REJECTED,
        "STATE_CHANGED_SINCE_PREVIEW",
    )
    requested = [
        e
        for e in await history(stub, alice, record.id)
        if e.execution_id == held.execution_id
        and e.type == audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REQUESTED
    ]
    assert [changes(e.preview) for e in requested] == [[("service_level", "standard", "priority")]]


async def test_an_unchanged_ticket_runs_what_was_approved(
    mesh: Mesh, stub: Stub, token: TokenFactory
) -> None:
    record = new_ticket(mesh)
    held = (
        await stub.ExecuteAction(
            gateway_pb2.ExecuteActionRequest(
                action_id="ticket.change_service_level",
                record=record,
                inputs=service_level("priority"),
                idempotency_key=uuid.uuid4().hex,
            ),
            metadata=bearer(token()),
        )
    ).execution
    done = (
        await stub.ApproveExecution(
            gateway_pb2.ApproveExecutionRequest(execution_id=held.execution_id, comment="ok"),
            metadata=bearer(token(subject="bob", roles=("approver",))),
        )
    ).execution
    assert done.outcome == common_pb2.OUTCOME_SUCCEEDED, done
    assert changes(done) == changes(held.preview)


def test_the_cli_previews(mesh: Mesh, token: TokenFactory) -> None:
    record = new_ticket(mesh)
    args = (
        "preview",
        "ticket.change_service_level",
        f"ticket/{record.id}",
        "--input",
        "level=critical",
        "--input",
        "reason=customer escalation",
    )
    shown = cli(mesh, *args, token=token())
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "would change service_level: standard -> critical" in shown.stdout, shown.stdout
    assert "nothing ran" in shown.stdout
    as_json = cli(mesh, *args, "--json", token=token())
    assert as_json.returncode == 0, as_json.stdout
    reply = json.loads(as_json.stdout)
    assert reply["preview"]["changes"] == [
        {"field": "service_level", "before": "standard", "after": "critical"}
    ]
    assert ticket_state(mesh, "acme", record.id)[0].service_level == "standard"
