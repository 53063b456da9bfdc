"""Verified facts: the system of record, not the caller, says what a record is.

A spoofing matrix through the real gateway of the session mesh. ``probe`` records have
a system of record (tests/source_provider.py, role ``source``: provider
``probesource``) and their actions live in another provider (``probeactions``), so the
source can fail while the actions stay healthy. For each lie or failure the tests check
the outcome, the status details, what reached the provider, and the audit evidence
(the facts used and who vouched for them).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from actionmesh.gateway.auth import SERVICE_METADATA, mint_service_token
from actionmesh.mesh import Mesh
from actionmesh.rpc.errors import ErrorDetails, error_details
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually
from tests.governance_fixtures import case
from tests.source_provider import EXECUTIONS_FILE, RECORDS_FILE

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
NORMAL = common_pb2.SENSITIVITY_NORMAL
SENSITIVE = common_pb2.SENSITIVITY_SENSITIVE
RESTRICTED = common_pb2.SENSITIVITY_RESTRICTED
PROVIDER = common_pb2.FACT_SOURCE_PROVIDER
TRUSTED = common_pb2.FACT_SOURCE_TRUSTED_CALLER
UNVERIFIED = common_pb2.FACT_SOURCE_UNVERIFIED


# -- the probe providers and their state ------------------------------------------


def providers_dir(mesh: Mesh) -> Path:
    return mesh.data_dir / "data" / "providers"


def put_probe(
    mesh: Mesh,
    record_id: str,
    status: str = "open",
    *,
    version: str = "1",
    sensitivity: str = "normal",
    attributes: dict[str, str] | None = None,
    tenant: str = "acme",
) -> None:
    """Write a record into the source's own state (atomically: it reads on every call)."""
    path = providers_dir(mesh) / RECORDS_FILE
    records = json.loads(path.read_text()) if path.exists() else {}
    records[f"{tenant}/{record_id}"] = {
        "status": status,
        "version": version,
        "sensitivity": sensitivity,
        "attributes": attributes or {},
    }
    scratch = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    scratch.write_text(json.dumps(records))
    os.replace(scratch, path)


def executions_of(mesh: Mesh, record_id: str) -> list[dict[str, object]]:
    """What reached the action provider for a record (one line per Execute)."""
    path = providers_dir(mesh) / EXECUTIONS_FILE
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["record"] == record_id]


def probe(
    record_id: str,
    status: str = "open",
    *,
    sensitivity: int = NORMAL,
    attributes: dict[str, str] | None = None,
    version: str = "",
    tenant: str = "acme",
) -> common_pb2.RecordContext:
    """A record as a caller claims it."""
    return common_pb2.RecordContext(
        tenant=tenant,
        type="probe",
        id=record_id,
        status=status,
        sensitivity=sensitivity,  # type: ignore[arg-type]
        attributes=attributes or {},
        version=version,
    )


def execute(
    action: str, record: common_pb2.RecordContext, note: str = "x"
) -> gateway_pb2.ExecuteActionRequest:
    return gateway_pb2.ExecuteActionRequest(
        action_id=action,
        record=record,
        inputs={"note": common_pb2.InputValue(string_value=note)},
        idempotency_key=uuid.uuid4().hex,
    )


def discover(record: common_pb2.RecordContext) -> gateway_pb2.DiscoverActionsRequest:
    return gateway_pb2.DiscoverActionsRequest(record=record, skip_cache=True)


async def refused(call: object) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return error_details(raised.value)


async def evidence(
    stub: Stub, token: str, record_type: str, record_id: str, key: str
) -> audit_pb2.AuditEvent:
    """The EXECUTION_FINISHED event of the attempt with idempotency key ``key``."""

    async def arrived() -> audit_pb2.AuditEvent | None:
        reply = await stub.GetRecordHistory(
            gateway_pb2.GetRecordHistoryRequest(
                record=common_pb2.RecordRef(type=record_type, id=record_id), page_size=200
            ),
            metadata=bearer(token),
        )
        for event in reply.events:
            if (
                event.idempotency_key == key
                and event.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
            ):
                return event
        return None

    return await eventually(arrived, timeout_s=15)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def probes(mesh: Mesh) -> Iterator[None]:
    """The probe source and action providers in the session mesh (stopped afterwards)."""
    for role, name in (("source", "probesource"), ("actions", "probeactions")):
        mesh.start_provider("tests.source_provider", name=name, env={"PROBE_ROLE": role})
    yield
    for name in ("probeactions", "probesource"):
        mesh.stop_service(name)


@pytest.fixture
async def stub(gateway: Stub, probes: None, mesh: Mesh, token: TokenFactory) -> Stub:
    """The gateway once it routes to both probe providers and asks the source."""
    put_probe(mesh, "p-ready")

    async def ready() -> bool:
        reply = await gateway.DiscoverActions(
            discover(probe("p-ready")), metadata=bearer(token(roles=("supervisor",)))
        )
        return reply.facts.source == PROVIDER and any(
            a.provider_id == "probeactions" for a in reply.actions
        )

    await eventually(ready, timeout_s=30)
    return gateway


@pytest.fixture
async def plain(mesh: Mesh) -> AsyncIterator[Stub]:
    """A gateway stub without the test backend's service token: nobody vouches."""
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        yield gateway_pb2_grpc.ActionGatewayServiceStub(channel)


def supervisor(token: TokenFactory) -> str:
    return token(subject="sam", roles=("supervisor",))


# -- lies the source corrects --------------------------------------------------------


async def test_a_wrong_sensitivity_claim_is_ignored(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-restricted", sensitivity="restricted", version="7")
    claimed = probe("p-restricted", sensitivity=NORMAL)
    seen = await stub.DiscoverActions(discover(claimed), metadata=bearer(supervisor(token)))
    assert (seen.facts.source, seen.facts.vouched_by, seen.facts.sensitivity) == (
        PROVIDER,
        "probesource",
        RESTRICTED,
    )
    request = execute("probe.touch", claimed)
    details = await refused(stub.ExecuteAction(request, metadata=bearer(supervisor(token))))
    assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    assert executions_of(mesh, "p-restricted") == []
    key = request.idempotency_key
    event = await evidence(stub, supervisor(token), "probe", "p-restricted", key)
    assert event.outcome == common_pb2.OUTCOME_DENIED
    assert (event.facts.source, event.facts.vouched_by, event.facts.version) == (
        PROVIDER,
        "probesource",
        "7",
    )
    assert event.facts.sensitivity == RESTRICTED
    assert "restricted-records-never-executed" in event.policy_ids
    # Restricted: the inputs are kept only as digests, whatever the caller said.
    assert event.inputs_redacted


async def test_a_wrong_status_claim_is_ignored_by_discovery_and_the_provider(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-closed", "closed", version="4")
    claimed = probe("p-closed", "open")
    seen = await stub.DiscoverActions(discover(claimed), metadata=bearer(supervisor(token)))
    touch = [a for a in seen.actions if a.descriptor.action_id == "probe.touch"]
    assert [(a.available, a.unavailable_reason) for a in touch] == [(False, "NOT_OPEN")]
    assert seen.facts.status == "closed"
    request = execute("probe.touch", claimed)
    reply = await stub.ExecuteAction(request, metadata=bearer(supervisor(token)))
    assert reply.execution.outcome == common_pb2.OUTCOME_REJECTED
    assert reply.execution.reason == "NOT_OPEN"
    # The provider was handed the source's facts, not the claim.
    assert [e["status"] for e in executions_of(mesh, "p-closed")] == ["closed"]
    assert (reply.execution.facts.status, reply.execution.facts.version) == ("closed", "4")


async def test_wrong_and_missing_attributes_are_replaced_by_the_sources(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-attrs", attributes={"queue": "billing", "region": "eu"})
    for claimed_attributes in ({"queue": "vip"}, {}):
        claimed = probe("p-attrs", attributes=claimed_attributes)
        reply = await stub.ExecuteAction(
            execute("probe.touch", claimed), metadata=bearer(supervisor(token))
        )
        assert reply.execution.outcome == common_pb2.OUTCOME_SUCCEEDED
        assert dict(reply.execution.facts.attributes) == {"queue": "billing", "region": "eu"}
    assert [e["attributes"] for e in executions_of(mesh, "p-attrs")] == [
        {"queue": "billing", "region": "eu"}
    ] * 2


async def test_a_stale_version_is_refused_and_discovery_says_the_view_is_stale(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-moved", version="3")
    claimed = probe("p-moved", version="2")
    seen = await stub.DiscoverActions(discover(claimed), metadata=bearer(supervisor(token)))
    assert (seen.facts.version, seen.facts.caller_version) == ("3", "2")
    request = execute("probe.touch", claimed)
    details = await refused(stub.ExecuteAction(request, metadata=bearer(supervisor(token))))
    assert (details.code, details.reason, details.metadata["version"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RECORD_CHANGED",
        "3",
    )
    assert executions_of(mesh, "p-moved") == []
    event = await evidence(stub, supervisor(token), "probe", "p-moved", request.idempotency_key)
    assert (event.reason, event.facts.version, event.facts.caller_version) == (
        "RECORD_CHANGED",
        "3",
        "2",
    )
    # The version the caller saw is the current one: it runs.
    reply = await stub.ExecuteAction(
        execute("probe.touch", probe("p-moved", version="3")), metadata=bearer(supervisor(token))
    )
    assert reply.execution.outcome == common_pb2.OUTCOME_SUCCEEDED


async def test_another_tenants_record_and_an_unknown_record_are_not_found(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-globex", tenant="globex")
    for record_id in ("p-globex", "p-nobody"):
        seen = await refused(
            stub.DiscoverActions(discover(probe(record_id)), metadata=bearer(supervisor(token)))
        )
        assert (seen.code, seen.reason) == (grpc.StatusCode.NOT_FOUND, "RECORD_NOT_FOUND")
        request = execute("probe.touch", probe(record_id))
        details = await refused(stub.ExecuteAction(request, metadata=bearer(supervisor(token))))
        assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "RECORD_NOT_FOUND")
        assert details.metadata["provider_id"] == "probesource"
        assert executions_of(mesh, record_id) == []
        event = await evidence(stub, supervisor(token), "probe", record_id, request.idempotency_key)
        assert (event.outcome, event.reason) == (common_pb2.OUTCOME_DENIED, "RECORD_NOT_FOUND")
        # Nobody vouched for the record: its inputs are kept as digests.
        assert event.inputs_redacted


# -- a source that fails -------------------------------------------------------------


@pytest.mark.parametrize(
    ("record_id", "why"),
    [
        ("hang-1", "did not answer (DEADLINE_EXCEEDED)"),
        ("boom-1", "did not answer"),
        # The SDK refuses facts beyond the record limits at the source (its resolver
        # raises); the gateway's own check of an answer is in test_conformance.py.
        ("garbage-1", "did not answer"),
        ("huge-1", "did not answer"),
    ],
    ids=["hanging", "raising", "malformed", "oversized"],
)
async def test_a_failing_source_makes_execute_unavailable_and_discovery_degraded(
    stub: Stub, mesh: Mesh, token: TokenFactory, record_id: str, why: str
) -> None:
    request = execute("probe.touch", probe(record_id))
    details = await refused(stub.ExecuteAction(request, metadata=bearer(supervisor(token))))
    assert (details.code, details.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "RECORD_SOURCE_UNAVAILABLE",
    )
    assert why in details.message and details.retry_after_s is not None
    assert details.metadata == {"provider_id": "probesource", "record_type": "probe"}
    assert executions_of(mesh, record_id) == []
    event = await evidence(stub, supervisor(token), "probe", record_id, request.idempotency_key)
    assert (event.outcome, event.reason) == (
        common_pb2.OUTCOME_UNAVAILABLE,
        "RECORD_SOURCE_UNAVAILABLE",
    )
    seen = await stub.DiscoverActions(
        discover(probe(record_id)), metadata=bearer(supervisor(token))
    )
    assert ("probesource", "RECORD_SOURCE_UNAVAILABLE") in [
        (d.provider_id, d.reason) for d in seen.degraded_providers
    ]
    # Shown on the caller's word, marked as such: only low-risk actions.
    assert seen.facts.source == UNVERIFIED
    assert {a.descriptor.action_id for a in seen.actions} == {"probe.peek"}


async def test_a_source_that_is_gone_is_unavailable_not_the_callers_word(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-away", sensitivity="restricted")
    mesh.stop_service("probesource")
    try:

        async def gone() -> bool:
            details = await refused(
                stub.ExecuteAction(
                    execute("probe.touch", probe("p-away")), metadata=bearer(supervisor(token))
                )
            )
            return details.reason == "RECORD_SOURCE_UNAVAILABLE" and "not registered" in (
                details.message
            )

        # Deregistered (SIGTERM): the type's facts stay the source's to give.
        await eventually(gone, timeout_s=20)
        assert executions_of(mesh, "p-away") == []
    finally:
        mesh.restart_service("probesource")

    async def back() -> bool:
        reply = await stub.DiscoverActions(
            discover(probe("p-away")), metadata=bearer(supervisor(token))
        )
        return reply.facts.source == PROVIDER and reply.facts.sensitivity == RESTRICTED

    await eventually(back, timeout_s=30)


# -- trusted callers -----------------------------------------------------------------


async def test_a_trusted_caller_vouches_and_the_same_claim_alone_is_unverified(
    gateway: Stub, plain: Stub, mesh: Mesh, token: TokenFactory, govtest: Path
) -> None:
    claimed = case("c-vouched")
    operator = token()
    vouched = await gateway.ExecuteAction(
        execute("govtest.echo", claimed), metadata=bearer(operator)
    )
    assert (vouched.execution.facts.source, vouched.execution.facts.vouched_by) == (
        TRUSTED,
        "test-backend",
    )
    request = execute("govtest.echo", claimed)
    details = await refused(plain.ExecuteAction(request, metadata=bearer(operator)))
    assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    event = await evidence(gateway, operator, "govtest", "c-vouched", request.idempotency_key)
    assert event.facts.source == UNVERIFIED and not event.facts.vouched_by
    assert "unverified-facts-never-executed" in event.policy_ids
    # Discovery on unverified facts shows low-risk actions only, marked unverified.
    seen = await plain.DiscoverActions(discover(claimed), metadata=bearer(operator))
    assert seen.facts.source == UNVERIFIED
    risks = {a.descriptor.risk for a in seen.actions}
    assert risks == {common_pb2.RISK_LOW}


async def test_a_service_the_gateway_does_not_list_vouches_for_nothing(
    plain: Stub, mesh: Mesh, token: TokenFactory, govtest: Path
) -> None:
    rogue = mint_service_token(mesh.signing_key(), client_id="rogue-backend", ttl_s=600.0)
    metadata = (*bearer(token()), (SERVICE_METADATA, f"Bearer {rogue}"))
    seen = await plain.DiscoverActions(discover(case("c-rogue")), metadata=metadata)
    assert seen.facts.source == UNVERIFIED
    # A service token that does not verify is refused outright, not ignored.
    forged = (*bearer(token()), (SERVICE_METADATA, "Bearer not.a.token"))
    details = await refused(plain.DiscoverActions(discover(case("c-rogue")), metadata=forged))
    assert (details.code, details.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SERVICE_TOKEN_INVALID",
    )


async def test_a_trusted_caller_cannot_override_a_system_of_record(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    # The test backend vouches for its own types only; probe facts come from the source.
    put_probe(mesh, "p-sourced", sensitivity="sensitive", version="9")
    seen = await stub.DiscoverActions(
        discover(probe("p-sourced", sensitivity=NORMAL)), metadata=bearer(supervisor(token))
    )
    assert (seen.facts.source, seen.facts.sensitivity) == (PROVIDER, SENSITIVE)


# -- approvals -----------------------------------------------------------------------


async def test_approval_reauthorizes_on_the_facts_as_they_are_at_approval(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-approve", version="1")
    operator = token(subject="olga")
    request = execute("probe.guarded", probe("p-approve"))
    held = (await stub.ExecuteAction(request, metadata=bearer(operator))).execution
    assert held.outcome == common_pb2.OUTCOME_PENDING_APPROVAL
    assert held.facts.version == "1"
    # The record becomes sensitive before anyone approves: operators may not act on it.
    put_probe(mesh, "p-approve", version="2", sensitivity="sensitive")
    done = (
        await stub.ApproveExecution(
            # The approver does not restate the record; the source is asked.
            gateway_pb2.ApproveExecutionRequest(execution_id=held.execution_id, comment="ok"),
            metadata=bearer(supervisor(token)),
        )
    ).execution
    assert (done.outcome, done.reason) == (common_pb2.OUTCOME_DENIED, "POLICY_DENIED")
    assert (done.facts.version, done.facts.sensitivity) == ("2", SENSITIVE)
    assert executions_of(mesh, "p-approve") == []


async def test_an_approver_cannot_restate_a_sourced_record(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-approve2", version="1")
    held = (
        await stub.ExecuteAction(
            execute("probe.guarded", probe("p-approve2")), metadata=bearer(token(subject="olga"))
        )
    ).execution
    put_probe(mesh, "p-approve2", "closed", version="2")
    done = (
        await stub.ApproveExecution(
            gateway_pb2.ApproveExecutionRequest(
                execution_id=held.execution_id, comment="ok", record=probe("p-approve2", "open")
            ),
            metadata=bearer(supervisor(token)),
        )
    ).execution
    # Approved and dispatched on the source's facts: the provider sees it closed.
    assert (done.outcome, done.reason) == (common_pb2.OUTCOME_REJECTED, "NOT_OPEN")
    assert done.facts.status == "closed" and done.facts.version == "2"
    assert [e["status"] for e in executions_of(mesh, "p-approve2")] == ["closed"]


# -- retries with the same key -------------------------------------------------------


async def test_a_retry_gets_the_stored_answer_even_when_the_first_run_changed_the_record(
    stub: Stub, mesh: Mesh, token: TokenFactory
) -> None:
    put_probe(mesh, "p-retry", version="1")
    request = execute("probe.touch", probe("p-retry", version="1"))
    first = (await stub.ExecuteAction(request, metadata=bearer(supervisor(token)))).execution
    assert first.outcome == common_pb2.OUTCOME_SUCCEEDED
    # What the action did moved the record on (and made it restricted, say): a retry
    # of the same request with the same key is not refused for it.
    put_probe(mesh, "p-retry", version="2", sensitivity="restricted")
    again = (await stub.ExecuteAction(request, metadata=bearer(supervisor(token)))).execution
    assert (again.execution_id, again.outcome) == (first.execution_id, first.outcome)
    assert len(executions_of(mesh, "p-retry")) == 1
    # Another request under the same key is still refused as a reuse, not replayed.
    other = execute("probe.touch", probe("p-retry", version="1"), note="different")
    other.idempotency_key = request.idempotency_key
    details = await refused(stub.ExecuteAction(other, metadata=bearer(supervisor(token))))
    assert details.reason == "RECORD_CHANGED"
    # A new key on the moved record: the facts as they are now decide.
    fresh = execute("probe.touch", probe("p-retry", version="2"))
    denied = await refused(stub.ExecuteAction(fresh, metadata=bearer(supervisor(token))))
    assert denied.reason == "POLICY_DENIED"
