"""Governance through the real gateway: outcomes, idempotency, approvals, discovery, policy.

A provider written for these tests (tests/governance_provider.py) runs as its
own process in the session mesh and logs every Discover and Execute it really
handles, so "reached the provider once" is counted, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.mesh import Mesh, Service
from actionmesh.rpc.errors import ErrorDetails, error_details
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually, vouching_channel
from tests.governance_fixtures import case

pytestmark = pytest.mark.timeout(90)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
EXECUTE_LOG = "govtest-execute.jsonl"
DISCOVER_LOG = "govtest-discover.jsonl"


@pytest.fixture(scope="session")
def short_gateway(mesh: Mesh, govtest: Path) -> Service:
    """A second gateway whose approvals expire after one second and whose cache is off."""
    return mesh.start_gateway(
        "gateway-short-approvals",
        "--approval-ttl-s",
        "1",
        "--approval-sweep-interval-s",
        "0.2",
        "--discover-cache-ttl-s",
        "0",
    )


def request(
    action: str,
    record: common_pb2.RecordContext,
    *,
    key: str | None = None,
    **inputs: str | int,
) -> gateway_pb2.ExecuteActionRequest:
    values = {
        name: common_pb2.InputValue(string_value=v)
        if isinstance(v, str)
        else common_pb2.InputValue(integer_value=v)
        for name, v in inputs.items()
    }
    return gateway_pb2.ExecuteActionRequest(
        action_id=f"govtest.{action}",
        record=record,
        inputs=values,
        idempotency_key=key or uuid.uuid4().hex,
    )


def provider_calls(logs: Path, name: str = EXECUTE_LOG, **match: str) -> list[dict[str, str]]:
    path = logs / name
    if not path.exists():
        return []
    calls = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [c for c in calls if all(c.get(k) == v for k, v in match.items())]


async def refused(call: Awaitable[object]) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return error_details(raised.value)


async def history(
    stub: Stub, token: str, record_id: str, *, include_discovery: bool = False
) -> list[audit_pb2.AuditEvent]:
    reply = await stub.GetRecordHistory(
        gateway_pb2.GetRecordHistoryRequest(
            record=common_pb2.RecordRef(type="govtest", id=record_id),
            page_size=500,
            include_discovery=include_discovery,
        ),
        metadata=bearer(token),
    )
    return list(reply.events)


async def events_of(
    stub: Stub, token: str, record_id: str, execution_id: str, count: int
) -> list[audit_pb2.AuditEvent]:
    """The execution's events once ``count`` of them reached the audit log."""

    async def arrived() -> list[audit_pb2.AuditEvent]:
        events = [
            e for e in await history(stub, token, record_id) if e.execution_id == execution_id
        ]
        return events if len(events) >= count else []

    return await eventually(arrived)  # type: ignore[return-value]


# -- the outcome vocabulary ---------------------------------------------------------


async def test_succeeded_and_partial_are_reported_with_their_evidence(
    gov: Stub, token: TokenFactory, govtest: Path
) -> None:
    alice = token()
    done = (
        await gov.ExecuteAction(request("slow", case("c-ok")), metadata=bearer(alice))
    ).execution
    assert done.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert done.external_ref == "slow/c-ok"

    half = (
        await gov.ExecuteAction(request("partial", case("c-half")), metadata=bearer(alice))
    ).execution
    assert half.outcome == common_pb2.OUTCOME_PARTIAL
    assert half.reason == "WRITE_BACK_FAILED" and half.external_ref == "job/c-half"
    assert [(c.field, c.after) for c in half.changes] == [("job", "created")]
    events = await events_of(gov, alice, "c-half", half.execution_id, 2)
    assert events[-1].outcome == common_pb2.OUTCOME_PARTIAL


async def test_rejected_and_denied_are_told_apart(gov: Stub, token: TokenFactory) -> None:
    rejected = (
        await gov.ExecuteAction(
            request("echo", case("c-rej"), note="anything"), metadata=bearer(token())
        )
    ).execution
    assert rejected.outcome == common_pb2.OUTCOME_REJECTED
    assert rejected.reason == "NOT_ELIGIBLE"

    viewer = token(subject="vera", roles=("viewer",))
    denied = await refused(
        gov.ExecuteAction(request("slow", case("c-den")), metadata=bearer(viewer))
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED and denied.reason == "POLICY_DENIED"

    # The refusal is evidence: which decision, by which policies, on which inputs.
    async def denial() -> list[audit_pb2.AuditEvent]:
        return [e for e in await history(gov, token(), "c-den") if e.actor == "vera"]

    found = await eventually(denial)
    assert isinstance(found, list)
    (event,) = found
    assert event.outcome == common_pb2.OUTCOME_DENIED
    (decision,) = event.policy_decisions
    assert decision.operation == "execute" and decision.action_id == "govtest.slow"
    assert not decision.allowed and list(decision.policy_ids) == []
    assert event.policy_context["principal.roles"] == "viewer"
    assert event.policy_context["record.status"] == "open"


async def test_timed_out_returns_at_the_deadline_and_the_late_result_is_recorded(
    gov: Stub, token: TokenFactory, govtest: Path
) -> None:
    alice = token()
    key = uuid.uuid4().hex
    slow = request("slow", case("c-late"), key=key, sleep_ms=1500)  # deadline is 500 ms
    first = (await gov.ExecuteAction(slow, metadata=bearer(alice))).execution
    assert first.outcome == common_pb2.OUTCOME_TIMED_OUT
    assert first.reason == "DEADLINE_EXCEEDED"
    # The gateway answered before the provider did: nothing late is known yet.
    assert first.late_outcome == common_pb2.OUTCOME_UNSPECIFIED and not first.external_ref

    async def late() -> gateway_pb2.Execution | None:
        reply = await gov.GetExecution(
            gateway_pb2.GetExecutionRequest(execution_id=first.execution_id),
            metadata=bearer(alice),
        )
        return reply.execution if reply.execution.late_outcome else None

    recorded = await eventually(late)
    assert isinstance(recorded, gateway_pb2.Execution)
    assert recorded.outcome == common_pb2.OUTCOME_TIMED_OUT  # what the caller was told
    assert recorded.late_outcome == common_pb2.OUTCOME_SUCCEEDED
    assert recorded.external_ref == "slow/c-late"
    assert [(c.field, c.before, c.after) for c in recorded.changes] == [("state", "idle", "done")]

    events = await events_of(gov, alice, "c-late", first.execution_id, 3)
    assert [e.type for e in events] == [
        audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED,
        audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
        audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_LATE_RESULT,
    ]
    assert events[1].outcome == common_pb2.OUTCOME_TIMED_OUT
    assert events[2].outcome == common_pb2.OUTCOME_SUCCEEDED
    assert events[2].external_ref == "slow/c-late"

    # Retrying with the same key is safe: the stored execution, no second call.
    again = (await gov.ExecuteAction(slow, metadata=bearer(alice))).execution
    assert again.execution_id == first.execution_id
    assert again.late_outcome == common_pb2.OUTCOME_SUCCEEDED
    assert len(provider_calls(govtest, key=key)) == 1


async def test_an_execution_finishes_and_is_recorded_when_the_caller_hangs_up(
    gov: Stub, token: TokenFactory, govtest: Path
) -> None:
    key = uuid.uuid4().hex
    slow = request("slow", case("c-hangup"), key=key, sleep_ms=350)  # deadline: 500 ms
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gov.ExecuteAction(slow, metadata=bearer(token()), timeout=0.15)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # Nobody asks again, yet the execution finishes and its outcome is recorded.
    async def finished() -> list[audit_pb2.AuditEvent]:
        return [
            e
            for e in await history(gov, token(), "c-hangup")
            if e.idempotency_key == key and e.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
        ]

    found = await eventually(finished)
    assert isinstance(found, list)
    (event,) = found
    assert event.outcome == common_pb2.OUTCOME_SUCCEEDED and event.external_ref == "slow/c-hangup"
    again = (await gov.ExecuteAction(slow, metadata=bearer(token()))).execution
    assert again.execution_id == event.execution_id
    assert len(provider_calls(govtest, key=key)) == 1


# -- idempotency ---------------------------------------------------------------------


async def test_fifty_concurrent_identical_requests_reach_the_provider_once(
    gov: Stub, token: TokenFactory, govtest: Path
) -> None:
    key = uuid.uuid4().hex
    same = request("slow", case("c-fifty"), key=key, sleep_ms=200)
    replies = await asyncio.gather(
        *(gov.ExecuteAction(same, metadata=bearer(token())) for _ in range(50))
    )
    assert len({r.execution.execution_id for r in replies}) == 1
    assert {r.execution.outcome for r in replies} == {common_pb2.OUTCOME_SUCCEEDED}
    assert len(provider_calls(govtest, key=key)) == 1

    other_payload = request("slow", case("c-fifty"), key=key, sleep_ms=201)
    reused = await refused(gov.ExecuteAction(other_payload, metadata=bearer(token())))
    assert reused.code == grpc.StatusCode.ALREADY_EXISTS
    assert reused.reason == "IDEMPOTENCY_KEY_REUSED"
    assert reused.metadata["execution_id"] == replies[0].execution.execution_id
    # Another operator with the same key is another request, not a replay of alice's.
    bob = await refused(gov.ExecuteAction(same, metadata=bearer(token(subject="bob"))))
    assert bob.reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(provider_calls(govtest, key=key)) == 1


# -- approvals -----------------------------------------------------------------------


async def pending(stub: Stub, token: str) -> list[gateway_pb2.PendingApproval]:
    reply = await stub.ListPendingApprovals(
        gateway_pb2.ListPendingApprovalsRequest(), metadata=bearer(token)
    )
    return list(reply.approvals)


async def test_four_eyes_approval_runs_the_frozen_payload_once(
    gov: Stub, token: TokenFactory, govtest: Path
) -> None:
    alice, sam = token(), token(subject="sam", roles=("supervisor",))
    key = uuid.uuid4().hex
    asked = request("guarded", case("c-4eyes", "open"), key=key, note="switch it on")
    held = (await gov.ExecuteAction(asked, metadata=bearer(alice))).execution
    assert held.outcome == common_pb2.OUTCOME_PENDING_APPROVAL
    assert held.approval.state == gateway_pb2.APPROVAL_STATE_PENDING
    assert held.approval.expires_at.seconds > held.started_at.seconds
    assert provider_calls(govtest, key=key) == []
    # A repeat is the same pending execution, not a second request.
    repeat = (await gov.ExecuteAction(asked, metadata=bearer(alice))).execution
    assert repeat.execution_id == held.execution_id

    listed = [p for p in await pending(gov, sam) if p.execution.execution_id == held.execution_id]
    assert len(listed) == 1
    assert listed[0].inputs["note"].string_value == "switch it on"
    assert listed[0].record.status == "open" and list(listed[0].requester_roles) == ["operator"]
    assert held.execution_id not in {p.execution.execution_id for p in await pending(gov, alice)}

    now = case("c-4eyes", "in-progress")

    def approve(
        who: str, record: common_pb2.RecordContext = now
    ) -> Awaitable[gateway_pb2.ApproveExecutionResponse]:
        return gov.ApproveExecution(
            gateway_pb2.ApproveExecutionRequest(
                execution_id=held.execution_id, comment="checked with the customer", record=record
            ),
            metadata=bearer(who),
        )

    own = await refused(approve(alice))
    assert own.code == grpc.StatusCode.PERMISSION_DENIED
    assert own.reason == "SELF_APPROVAL_FORBIDDEN"
    peer = await refused(approve(token(subject="bob")))
    assert peer.code == grpc.StatusCode.PERMISSION_DENIED and peer.reason == "POLICY_DENIED"
    stranger = token(subject="gus", tenant="globex", roles=("supervisor",))
    other_tenant = await refused(approve(stranger, case("c-4eyes", tenant="globex")))
    assert other_tenant.code == grpc.StatusCode.NOT_FOUND
    mismatch = await refused(approve(sam, case("c-other")))
    assert mismatch.code == grpc.StatusCode.INVALID_ARGUMENT
    assert mismatch.reason == "RECORD_MISMATCH"
    assert provider_calls(govtest, key=key) == []

    done = (await approve(sam)).execution
    assert done.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert done.actor == "alice" and done.external_ref == "guarded/c-4eyes"
    assert done.approval.state == gateway_pb2.APPROVAL_STATE_APPROVED
    assert done.approval.approver == "sam"
    assert done.approval.comment == "checked with the customer"
    (call,) = provider_calls(govtest, key=key)
    # The provider ran the requester's frozen inputs, on the record as it is now.
    assert call["operator"] == "alice" and call["note"] == "switch it on"
    assert call["status"] == "in-progress"

    twice = await refused(approve(sam))
    assert twice.code == grpc.StatusCode.FAILED_PRECONDITION
    assert twice.reason == "APPROVAL_NOT_PENDING"
    assert len(provider_calls(govtest, key=key)) == 1

    events = await events_of(gov, alice, "c-4eyes", held.execution_id, 6)
    steps = [(audit_pb2.AuditEventType.Name(e.type), e.actor, e.reason) for e in events]
    # Refusals that name no execution of this tenant (other tenant, wrong record,
    # already decided) leave no event on this record.
    assert steps == [
        ("AUDIT_EVENT_TYPE_APPROVAL_REQUESTED", "alice", "APPROVAL_REQUIRED"),
        ("AUDIT_EVENT_TYPE_APPROVAL_REFUSED", "alice", "SELF_APPROVAL_FORBIDDEN"),
        ("AUDIT_EVENT_TYPE_APPROVAL_REFUSED", "bob", "POLICY_DENIED"),
        ("AUDIT_EVENT_TYPE_APPROVAL_GRANTED", "sam", ""),
        ("AUDIT_EVENT_TYPE_EXECUTION_STARTED", "alice", ""),
        ("AUDIT_EVENT_TYPE_EXECUTION_FINISHED", "alice", ""),
    ]
    granted = events[3]
    assert granted.message == "checked with the customer"
    assert [d.operation for d in granted.policy_decisions] == ["approve"]
    assert "supervisors-approve" in granted.policy_ids
    assert events[4].policy_decisions[0].operation == "execute"  # requester re-authorized


async def test_approval_re_authorizes_the_requester_against_the_record_as_it_is_now(
    gov: Stub, token: TokenFactory, govtest: Path
) -> None:
    key = uuid.uuid4().hex
    held = (
        await gov.ExecuteAction(
            request("guarded", case("c-recheck"), key=key, note="x"), metadata=bearer(token())
        )
    ).execution
    # Meanwhile the record became sensitive: operators may no longer run actions on it.
    now = case("c-recheck", sensitivity=common_pb2.SENSITIVITY_SENSITIVE)
    done = (
        await gov.ApproveExecution(
            gateway_pb2.ApproveExecutionRequest(
                execution_id=held.execution_id, comment="ok", record=now
            ),
            metadata=bearer(token(subject="sam", roles=("supervisor",))),
        )
    ).execution
    assert done.outcome == common_pb2.OUTCOME_DENIED and done.reason == "POLICY_DENIED"
    assert done.approval.state == gateway_pb2.APPROVAL_STATE_APPROVED
    assert provider_calls(govtest, key=key) == []


async def test_rejection_needs_a_comment_and_denies_the_execution(
    gov: Stub, token: TokenFactory, govtest: Path
) -> None:
    alice, sam = token(), token(subject="sam", roles=("supervisor",))
    key = uuid.uuid4().hex
    held = (
        await gov.ExecuteAction(
            request("guarded", case("c-reject"), key=key, note="x"), metadata=bearer(alice)
        )
    ).execution
    silent = await refused(
        gov.RejectExecution(
            gateway_pb2.RejectExecutionRequest(execution_id=held.execution_id),
            metadata=bearer(sam),
        )
    )
    assert silent.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in silent.violations] == ["comment"]

    rejected = (
        await gov.RejectExecution(
            gateway_pb2.RejectExecutionRequest(
                execution_id=held.execution_id, comment="wrong customer"
            ),
            metadata=bearer(sam),
        )
    ).execution
    assert rejected.outcome == common_pb2.OUTCOME_DENIED
    assert rejected.reason == "APPROVAL_REJECTED"
    assert rejected.approval.state == gateway_pb2.APPROVAL_STATE_REJECTED
    assert rejected.approval.comment == "wrong customer"
    # The same key now answers the rejection; it never runs.
    again = (
        await gov.ExecuteAction(
            request("guarded", case("c-reject"), key=key, note="x"), metadata=bearer(alice)
        )
    ).execution
    assert again.outcome == common_pb2.OUTCOME_DENIED
    events = await events_of(gov, alice, "c-reject", held.execution_id, 2)
    assert events[-1].type == audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_REJECTED
    assert events[-1].actor == "sam" and events[-1].message == "wrong customer"
    assert provider_calls(govtest, key=key) == []


async def test_unapproved_execution_expires(
    mesh: Mesh, short_gateway: Service, token: TokenFactory, govtest: Path
) -> None:
    async with vouching_channel(mesh, short_gateway.address) as channel:
        stub = Stub(channel)
        alice = token()

        async def held() -> gateway_pb2.Execution | None:
            try:
                reply = await stub.ExecuteAction(
                    request("guarded", case("c-expire"), note="x"), metadata=bearer(alice)
                )
            except grpc.aio.AioRpcError:
                return None  # This gateway may not have synced the provider yet.
            return reply.execution

        execution = await eventually(held, timeout_s=20)
        assert isinstance(execution, gateway_pb2.Execution)
        assert execution.outcome == common_pb2.OUTCOME_PENDING_APPROVAL

        async def expired() -> gateway_pb2.Execution | None:
            reply = await stub.GetExecution(
                gateway_pb2.GetExecutionRequest(execution_id=execution.execution_id),
                metadata=bearer(alice),
            )
            done = reply.execution.approval.state == gateway_pb2.APPROVAL_STATE_EXPIRED
            return reply.execution if done else None

        final = await eventually(expired)
        assert isinstance(final, gateway_pb2.Execution)
        assert final.outcome == common_pb2.OUTCOME_DENIED and final.reason == "APPROVAL_EXPIRED"
        late = await refused(
            stub.ApproveExecution(
                gateway_pb2.ApproveExecutionRequest(
                    execution_id=execution.execution_id, comment="too late", record=case("c-expire")
                ),
                metadata=bearer(token(subject="sam", roles=("supervisor",))),
            )
        )
        assert late.code == grpc.StatusCode.FAILED_PRECONDITION
        events = await events_of(stub, alice, "c-expire", execution.execution_id, 2)
        assert events[-1].type == audit_pb2.AUDIT_EVENT_TYPE_APPROVAL_EXPIRED
        assert events[-1].outcome == common_pb2.OUTCOME_DENIED


# -- discovery -----------------------------------------------------------------------


async def test_discovery_is_cached_per_record_version_and_roles(
    gov: Stub, token: TokenFactory, govtest: Path
) -> None:
    alice = token()

    async def discover(record: common_pb2.RecordContext, **kw: bool) -> list[bool]:
        reply = await gov.DiscoverActions(
            gateway_pb2.DiscoverActionsRequest(record=record, **kw), metadata=bearer(alice)
        )
        views = [a for a in reply.actions if a.provider_id == "govtest"]
        assert views, "the governance provider answered nothing"
        return [a.from_cache for a in views]

    def asked(record_id: str) -> int:
        return len(provider_calls(govtest, DISCOVER_LOG, record=record_id))

    record = case("c-cache", version="7")
    assert not any(await discover(record))
    calls = asked("c-cache")
    assert calls > 0
    assert all(await discover(record))  # a refresh: answered from the cache
    assert asked("c-cache") == calls
    assert not any(await discover(record, skip_cache=True))  # bypassed on request
    assert asked("c-cache") == 2 * calls
    assert not any(await discover(case("c-cache", version="8")))  # a new version asks again
    assert asked("c-cache") == 3 * calls


async def test_policy_hidden_actions_are_not_revealed_but_recorded(
    gov: Stub, token: TokenFactory
) -> None:
    viewer = token(subject="vera", roles=("viewer",))
    reply = await gov.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(record=case("c-hidden")), metadata=bearer(viewer)
    )
    assert list(reply.actions) == []  # as if there were no actions at all
    assert list(reply.degraded_providers) == []

    async def recorded() -> list[audit_pb2.AuditEvent]:
        events = await history(gov, token(), "c-hidden", include_discovery=True)
        return [e for e in events if e.type == audit_pb2.AUDIT_EVENT_TYPE_ACTIONS_DISCOVERED]

    found = await eventually(recorded)
    assert isinstance(found, list)
    (event,) = found
    decisions = {d.action_id: d for d in event.policy_decisions}
    assert {"govtest.slow", "govtest.guarded"} <= set(decisions)
    assert not any(d.allowed for d in decisions.values())
    assert event.actor == "vera" and event.policy_context["principal.roles"] == "viewer"
    # The default history shows what was done, not every look at the record.
    assert await history(gov, token(), "c-hidden") == []


# -- policy hot reload -----------------------------------------------------------------

FORBID_PARTIAL = """
@id("no-partial-actions")
forbid (principal, action == ActionMesh::Action::"execute", resource)
when { resource == ActionMesh::ProviderAction::"govtest.partial" };
"""


def read(path: Path) -> str:
    return path.read_text()


def write(path: Path, text: str) -> None:
    path.write_text(text)


async def policy_status(stub: Stub, token: str) -> gateway_pb2.GetPolicyStatusResponse:
    return await stub.GetPolicyStatus(gateway_pb2.GetPolicyStatusRequest(), metadata=bearer(token))


async def policy_health(mesh: Mesh) -> int:
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="actionmesh.gateway.policy")
        )
    return int(reply.status)


@pytest.fixture
async def policy_file(mesh: Mesh, gov: Stub, token: TokenFactory) -> AsyncIterator[Path]:
    """The mesh's policy file, put back (and reloaded) after the test."""
    original = read(mesh.policy_path)
    before = (await policy_status(gov, token())).digest
    yield mesh.policy_path
    write(mesh.policy_path, original)

    async def restored() -> bool:
        status = await policy_status(gov, token())
        return status.digest == before and not status.reload_error

    await eventually(restored)


async def test_policies_reload_and_a_broken_file_keeps_the_previous_ones(
    mesh: Mesh, gov: Stub, token: TokenFactory, policy_file: Path
) -> None:
    alice = token()
    original = read(policy_file)
    write(policy_file, original + FORBID_PARTIAL)

    async def forbidden() -> ErrorDetails | None:
        try:
            await gov.ExecuteAction(request("partial", case("c-reload")), metadata=bearer(alice))
        except grpc.aio.AioRpcError as exc:
            return error_details(exc)
        return None

    denial = await eventually(forbidden)
    assert isinstance(denial, ErrorDetails) and denial.reason == "POLICY_DENIED"
    status = await policy_status(gov, alice)
    assert "no-partial-actions" in status.policy_ids and not status.reload_error
    loaded_digest = status.digest

    write(policy_file, original + "permit (principal, action, resource) when {")

    async def refused_reload() -> gateway_pb2.GetPolicyStatusResponse | None:
        status = await policy_status(gov, alice)
        return status if status.reload_error else None

    broken = await eventually(refused_reload)
    assert isinstance(broken, gateway_pb2.GetPolicyStatusResponse)
    assert broken.digest == loaded_digest  # the previous policies stay in force
    assert await policy_health(mesh) == health_pb2.HealthCheckResponse.NOT_SERVING
    still = await refused(
        gov.ExecuteAction(request("partial", case("c-reload")), metadata=bearer(alice))
    )
    assert still.reason == "POLICY_DENIED"


# -- sensitive records -----------------------------------------------------------------


async def test_sensitive_inputs_are_redacted_in_evidence_and_never_echoed(
    gov: Stub, token: TokenFactory
) -> None:
    sam = token(subject="sam", roles=("supervisor",))
    secret = "hunter2-customer-secret"
    record = case("c-secret", sensitivity=common_pb2.SENSITIVITY_SENSITIVE)
    reply = (
        await gov.ExecuteAction(request("echo", record, note=secret), metadata=bearer(sam))
    ).execution
    assert reply.outcome == common_pb2.OUTCOME_REJECTED
    assert secret not in reply.message and "[redacted]" in reply.message

    too_long = await refused(
        gov.ExecuteAction(request("echo", record, note=secret * 20), metadata=bearer(sam))
    )
    assert too_long.code == grpc.StatusCode.INVALID_ARGUMENT
    assert secret not in str(too_long) + "".join(v.description for v in too_long.violations)

    async def both() -> list[audit_pb2.AuditEvent]:
        events = await history(gov, sam, "c-secret")
        return events if len(events) >= 3 else []

    events = await eventually(both)
    assert isinstance(events, list)
    for event in events:
        assert event.inputs_redacted
        assert event.inputs["note"].startswith("hmac-sha256:")
        assert secret not in event.SerializeToString().decode("utf-8", "replace")
    # Equal values give equal digests: the evidence still proves which value was used.
    assert events[0].inputs["note"] == events[1].inputs["note"] != events[2].inputs["note"]
