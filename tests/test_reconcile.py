"""Reconciliation through real processes: no execution ends in "we don't know".

A provider answering after the deadline, with its gateway SIGKILLed before the late
answer came: the restarted gateway asks the provider (GetExecutionStatus) and records
the outcome, with what the caller was told kept. An orphan the provider never received
is resolved as "nothing ran" and a same-key retry dispatches it; a provider that keeps
no results leaves the execution NEEDS_ATTENTION; two replicas on one database settle
each execution once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.claims import request_hash
from actionmesh.gateway.model import (
    ORPHAN_OUTCOME,
    ORPHAN_REASON,
    RUNNING,
    ExecuteCommand,
    ExecutionRecord,
    ReconcileState,
)
from actionmesh.gateway.storage import GatewayStore, lease_reconcile_op, reconcile_op
from actionmesh.mesh import Mesh, Service
from actionmesh.rpc.outcomes import Outcome
from actionmesh.runtime.db import sqlite_url
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually, vouching_channel
from tests.fault_provider import (
    JOURNAL_ENV,
    PROVIDER_ID_ENV,
    RECORD_TYPE,
    SLEEP_MS_ENV,
    TIMEOUT_S_ENV,
)
from tests.test_cli import cli

pytestmark = pytest.mark.timeout(120)

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
RECON = "recon"
ACTION = f"{RECON}.touch"
RECONCILED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_RECONCILED
RESOLVED = gateway_pb2.RECONCILE_STATE_RESOLVED
NEEDS_ATTENTION = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_NEEDS_ATTENTION
FAST_RECONCILE = (
    "--approval-sweep-interval-s",
    "0.3",
    "--reconcile-interval-s",
    "0.3",
    "--reconcile-max-backoff-s",
    "1",
)


@pytest.fixture(scope="module")
def recon(mesh: Mesh) -> Iterator[str]:
    """A provider with the SDK's dedupe (so it answers GetExecutionStatus), action timeout 1 s."""
    mesh.start_provider(
        "tests.fault_provider",
        name=RECON,
        env={
            PROVIDER_ID_ENV: RECON,
            JOURNAL_ENV: str(mesh.data_dir / "data" / f"{RECON}-journal.jsonl"),
            SLEEP_MS_ENV: "20",
            TIMEOUT_S_ENV: "1.0",
        },
    )
    yield RECON
    mesh.stop_service(RECON)


def start_gateway(
    mesh: Mesh, *flags: str, database_url: str = "", fast: tuple[str, ...] = FAST_RECONCILE
) -> Service:
    return mesh.start_gateway(
        f"gateway-recon-{uuid.uuid4().hex[:6]}", *fast, *flags, database_url=database_url
    )


def record(record_id: str) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(tenant="acme", type=RECORD_TYPE, id=record_id, status="open")


def touch(record_id: str, *, sleep_ms: int = 0, key: str = "") -> gateway_pb2.ExecuteActionRequest:
    return gateway_pb2.ExecuteActionRequest(
        action_id=ACTION,
        record=record(record_id),
        inputs={"sleep_ms": common_pb2.InputValue(integer_value=sleep_ms)},
        idempotency_key=key or uuid.uuid4().hex,
    )


async def sees(stub: Stub, operator: tuple[tuple[str, str]], provider: str) -> bool:
    reply = await stub.DiscoverActions(
        gateway_pb2.DiscoverActionsRequest(record=record("probe"), skip_cache=True),
        metadata=operator,
    )
    return any(a.provider_id == provider and a.available for a in reply.actions)


async def execution(
    stub: Stub, operator: tuple[tuple[str, str]], execution_id: str
) -> gateway_pb2.Execution:
    reply = await stub.GetExecution(
        gateway_pb2.GetExecutionRequest(execution_id=execution_id), metadata=operator, timeout=10
    )
    return reply.execution


async def events_of(
    stub: Stub, operator: tuple[tuple[str, str]], record_type: str, record_id: str, kind: int
) -> list[audit_pb2.AuditEvent]:
    history = await stub.GetRecordHistory(
        gateway_pb2.GetRecordHistoryRequest(
            record=common_pb2.RecordRef(type=record_type, id=record_id)
        ),
        metadata=operator,
        timeout=10,
    )
    return [e for e in history.events if e.type == kind]


def orphan(
    request: gateway_pb2.ExecuteActionRequest, provider_id: str, caller: Caller
) -> ExecutionRecord:
    """A row a gateway left RUNNING long ago, as if it died before dispatching."""
    command = ExecuteCommand.thaw(request.SerializeToString())
    deadline = datetime.now(UTC) - timedelta(minutes=5)
    return ExecutionRecord(
        execution_id=uuid.uuid4().hex,
        tenant=caller.tenant,
        idempotency_key=command.idempotency_key,
        request_hash=request_hash(caller, command),
        action_id=command.action_id,
        provider_id=provider_id,
        record_type=command.record.type,
        record_id=command.record.id,
        actor=caller.subject,
        outcome=RUNNING,
        started_at=deadline - timedelta(seconds=5),
        request_payload=command.frozen(),
        requester_roles=tuple(caller.roles),
        dispatch_deadline=deadline,
    )


ALICE = Caller(subject="alice", tenant="acme", roles=("operator",))


async def test_a_late_answer_lost_with_its_gateway_is_recorded_by_reconciliation(
    mesh: Mesh, recon: str, token: TokenFactory
) -> None:
    service = start_gateway(mesh, "--late-result-grace-s", "2")
    operator = bearer(token())
    record_id = f"late-{uuid.uuid4().hex[:8]}"
    try:
        async with vouching_channel(mesh, service.address) as channel:
            stub = Stub(channel)
            await eventually(lambda: sees(stub, operator, recon), timeout_s=20)
            # The provider works 3 s; the gateway answers TIMED_OUT after 1 s.
            reply = await stub.ExecuteAction(
                touch(record_id, sleep_ms=3000), metadata=operator, timeout=10
            )
            told = reply.execution
            assert told.outcome == common_pb2.OUTCOME_TIMED_OUT
            assert told.reconcile_state == gateway_pb2.RECONCILE_STATE_PENDING
        # Killed while it still waited for the late answer: that answer is lost with it.
        mesh.stop_service(service.name, kill=True)
        mesh.restart_service(service.name)
        async with vouching_channel(mesh, mesh.address(service.name)) as channel:
            stub = Stub(channel)

            async def resolved() -> gateway_pb2.Execution | None:
                found = await execution(stub, operator, told.execution_id)
                return (
                    found if found.reconcile_state == gateway_pb2.RECONCILE_STATE_RESOLVED else None
                )

            settled = await eventually(resolved, timeout_s=30)
            assert isinstance(settled, gateway_pb2.Execution)
            # What the caller was told stays; the resolved outcome is added.
            assert settled.outcome == common_pb2.OUTCOME_TIMED_OUT
            assert settled.reason == told.reason
            assert settled.late_outcome == common_pb2.OUTCOME_SUCCEEDED
            assert settled.external_ref == f"{recon}/{record_id}"
            assert settled.HasField("late_result_at")

            async def one_reconciled() -> list[audit_pb2.AuditEvent]:
                found = await events_of(stub, operator, RECORD_TYPE, record_id, RECONCILED)
                return found if found else []

            events = await eventually(one_reconciled, timeout_s=20)
            assert isinstance(events, list) and len(events) == 1
            assert events[0].outcome == common_pb2.OUTCOME_SUCCEEDED
            assert events[0].told_outcome == common_pb2.OUTCOME_TIMED_OUT
            assert events[0].execution_id == told.execution_id

        # The CLI shows both: what the caller was told and what became of it.
        address = mesh.address(service.name)
        shown = await asyncio.to_thread(
            cli, mesh, "execution", told.execution_id, "--gateway", address, token=token()
        )
        assert "told: TIMED_OUT" in shown.stdout, shown.stdout + shown.stderr
        assert "resolved: SUCCEEDED" in shown.stdout
        listed = await asyncio.to_thread(
            cli, mesh, "executions", "--unresolved", "--json", "--gateway", address, token=token()
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert told.execution_id not in listed.stdout
    finally:
        mesh.stop_service(service.name)


async def test_a_same_key_retry_asks_the_provider_instead_of_repeating_timed_out(
    mesh: Mesh, recon: str, token: TokenFactory
) -> None:
    # The reconcile loop would not come round for an hour, and no late answer is awaited:
    # only the retry can learn the outcome.
    service = start_gateway(
        mesh, "--late-result-grace-s", "0", "--reconcile-interval-s", "3600", fast=()
    )
    operator = bearer(token())
    record_id = f"retry-{uuid.uuid4().hex[:8]}"
    request = touch(record_id, sleep_ms=1500)
    try:
        async with vouching_channel(mesh, service.address) as channel:
            stub = Stub(channel)
            await eventually(lambda: sees(stub, operator, recon), timeout_s=20)
            first = await stub.ExecuteAction(request, metadata=operator, timeout=10)
            assert first.execution.outcome == common_pb2.OUTCOME_TIMED_OUT
            assert first.execution.reconcile_state == gateway_pb2.RECONCILE_STATE_PENDING

            async def retried() -> gateway_pb2.Execution | None:
                reply = await stub.ExecuteAction(request, metadata=operator, timeout=10)
                found = reply.execution
                return found if found.reconcile_state == RESOLVED else None

            settled = await eventually(retried, timeout_s=20)
            assert isinstance(settled, gateway_pb2.Execution)
            assert settled.execution_id == first.execution.execution_id
            assert settled.outcome == common_pb2.OUTCOME_TIMED_OUT
            assert settled.late_outcome == common_pb2.OUTCOME_SUCCEEDED
            assert settled.external_ref == f"{recon}/{record_id}"
    finally:
        mesh.stop_service(service.name)


async def test_an_orphan_never_received_is_resolved_and_a_same_key_retry_runs_it(
    mesh: Mesh, recon: str, token: TokenFactory, tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "gateway.db")
    seeded = GatewayStore(url)
    request = touch(f"never-{uuid.uuid4().hex[:8]}")
    row = orphan(request, recon, ALICE)
    seeded.insert_execution(row, [])
    service = start_gateway(mesh, database_url=url)
    operator = bearer(token())
    try:
        async with vouching_channel(mesh, service.address) as channel:
            stub = Stub(channel)
            await eventually(lambda: sees(stub, operator, recon), timeout_s=20)

            async def nothing_ran() -> gateway_pb2.Execution | None:
                found = await execution(stub, operator, row.execution_id)
                return (
                    found if found.reconcile_state == gateway_pb2.RECONCILE_STATE_RESOLVED else None
                )

            settled = await eventually(nothing_ran, timeout_s=30)
            assert isinstance(settled, gateway_pb2.Execution)
            assert (settled.outcome, settled.reason) == (
                common_pb2.OUTCOME_TIMED_OUT,
                ORPHAN_REASON,
            )
            assert settled.late_outcome == common_pb2.OUTCOME_UNAVAILABLE
            assert settled.resolved_reason == "PROVIDER_NEVER_RECEIVED"

            # Nothing ran, so the same key dispatches now.
            reply = await stub.ExecuteAction(request, metadata=operator, timeout=10)
            assert reply.execution.execution_id == row.execution_id
            assert reply.execution.outcome == common_pb2.OUTCOME_SUCCEEDED
            assert reply.execution.reconcile_state == gateway_pb2.RECONCILE_STATE_NONE
    finally:
        mesh.stop_service(service.name)
        seeded.close()


async def test_a_provider_keeping_no_results_leaves_the_execution_needing_attention(
    mesh: Mesh, govtest: Path, token: TokenFactory, tmp_path: Path
) -> None:
    url = sqlite_url(tmp_path / "gateway.db")
    seeded = GatewayStore(url)
    record_id = f"attention-{uuid.uuid4().hex[:8]}"
    request = gateway_pb2.ExecuteActionRequest(
        action_id="govtest.slow",
        record=common_pb2.RecordContext(tenant="acme", type="govtest", id=record_id, status="open"),
        inputs={"sleep_ms": common_pb2.InputValue(integer_value=10)},
        idempotency_key=uuid.uuid4().hex,
    )
    row = orphan(request, "govtest", ALICE)
    seeded.insert_execution(row, [])
    service = start_gateway(mesh, database_url=url)
    operator = bearer(token())
    try:
        async with vouching_channel(mesh, service.address) as channel:
            stub = Stub(channel)

            async def attention() -> gateway_pb2.Execution | None:
                found = await execution(stub, operator, row.execution_id)
                state = found.reconcile_state
                return found if state == gateway_pb2.RECONCILE_STATE_NEEDS_ATTENTION else None

            settled = await eventually(attention, timeout_s=30)
            assert isinstance(settled, gateway_pb2.Execution)
            assert settled.outcome == common_pb2.OUTCOME_TIMED_OUT
            assert settled.resolved_reason == "RECONCILE_UNSUPPORTED"
            assert settled.late_outcome == common_pb2.OUTCOME_UNSPECIFIED

            async def flagged() -> list[audit_pb2.AuditEvent]:
                return await events_of(stub, operator, "govtest", record_id, NEEDS_ATTENTION)

            events = await eventually(flagged, timeout_s=20)
            assert isinstance(events, list) and len(events) == 1
            assert events[0].told_outcome == common_pb2.OUTCOME_TIMED_OUT
            assert events[0].reason == "RECONCILE_UNSUPPORTED"

        # `actionmesh executions --unresolved` lists it, and exits 3: a person must look.
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
        assert listed.returncode == 3, listed.stdout + listed.stderr
        unresolved = {e["execution_id"]: e for e in json.loads(listed.stdout)}
        assert row.execution_id in unresolved
        assert unresolved[row.execution_id]["reconcile_state"].endswith("NEEDS_ATTENTION")
        shown = await asyncio.to_thread(
            cli, mesh, "execution", row.execution_id, "--gateway", service.address, token=token()
        )
        assert "NEEDS ATTENTION" in shown.stdout, shown.stdout + shown.stderr

        # A person finds out and records it. Policy decides who may: not an operator...
        resolve = (
            "resolve",
            row.execution_id,
            "--outcome",
            "succeeded",
            "--comment",
            "the govtest console shows it done",
            "--ref",
            "GT-7",
            "--gateway",
            service.address,
        )
        refused = await asyncio.to_thread(cli, mesh, *resolve, token=token())
        assert refused.returncode != 0 and "POLICY_DENIED" in refused.stdout, refused.stdout
        # ...a supervisor.
        supervisor = token(subject="sam", roles=("supervisor",))
        resolved = await asyncio.to_thread(cli, mesh, *resolve, "--json", token=supervisor)
        assert resolved.returncode == 0, resolved.stdout + resolved.stderr
        shown_json = json.loads(resolved.stdout)
        assert shown_json["outcome"] == "OUTCOME_TIMED_OUT"  # what the caller was told stays
        assert shown_json["late_outcome"] == "OUTCOME_SUCCEEDED"
        assert shown_json["resolved_reason"] == "RESOLVED_BY_PERSON"
        assert shown_json["external_ref"] == "GT-7"
        again = await asyncio.to_thread(cli, mesh, *resolve, token=supervisor)
        assert again.returncode != 0 and "NOTHING_TO_RESOLVE" in again.stdout, again.stdout
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
        assert row.execution_id not in listed.stdout
        async with vouching_channel(mesh, service.address) as channel:
            stub = Stub(channel)

            async def recorded() -> list[audit_pb2.AuditEvent]:
                return await events_of(stub, operator, "govtest", record_id, RECONCILED)

            found = await eventually(recorded, timeout_s=20)
            assert isinstance(found, list)
            assert [(e.actor, e.reason, e.outcome, e.told_outcome) for e in found] == [
                (
                    "sam",
                    "RESOLVED_BY_PERSON",
                    common_pb2.OUTCOME_SUCCEEDED,
                    common_pb2.OUTCOME_TIMED_OUT,
                )
            ]
            assert found[0].message == "the govtest console shows it done"
            refusals = await events_of(
                stub,
                operator,
                "govtest",
                record_id,
                audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_RESOLVE_REFUSED,
            )
            assert [(e.actor, e.reason) for e in refusals] == [("alice", "POLICY_DENIED")]
    finally:
        mesh.stop_service(service.name)
        seeded.close()


async def test_a_provider_still_running_after_the_bound_leaves_the_execution_needing_attention(
    mesh: Mesh, recon: str, token: TokenFactory
) -> None:
    # Asked twice, still RUNNING both times: the gateway gives up and says so.
    service = start_gateway(mesh, "--late-result-grace-s", "0", "--reconcile-max-attempts", "2")
    operator = bearer(token())
    try:
        async with vouching_channel(mesh, service.address) as channel:
            stub = Stub(channel)
            await eventually(lambda: sees(stub, operator, recon), timeout_s=20)
            reply = await stub.ExecuteAction(
                touch(f"bound-{uuid.uuid4().hex[:8]}", sleep_ms=15000),
                metadata=operator,
                timeout=10,
            )
            assert reply.execution.outcome == common_pb2.OUTCOME_TIMED_OUT

            async def gave_up() -> gateway_pb2.Execution | None:
                found = await execution(stub, operator, reply.execution.execution_id)
                state = found.reconcile_state
                return found if state == gateway_pb2.RECONCILE_STATE_NEEDS_ATTENTION else None

            settled = await eventually(gave_up, timeout_s=30)
            assert isinstance(settled, gateway_pb2.Execution)
            assert settled.resolved_reason == "RECONCILE_GAVE_UP"
            assert settled.reconcile_attempts == 3  # two questions, then the verdict
            assert settled.late_outcome == common_pb2.OUTCOME_UNSPECIFIED
    finally:
        mesh.stop_service(service.name)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One database for two replicas: SQLite, and PostgreSQL when the suite has one."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "gateway.db")
    return str(request.getfixturevalue("postgres_url"))


async def test_two_replicas_on_one_database_reconcile_each_execution_once(
    mesh: Mesh, recon: str, token: TokenFactory, shared_url: str
) -> None:
    url = shared_url
    seeded = GatewayStore(url)
    requests = [touch(f"pair-{uuid.uuid4().hex[:8]}") for _ in range(8)]
    rows = [orphan(request, recon, ALICE) for request in requests]
    for row in rows:
        seeded.insert_execution(row, [])
    services = [start_gateway(mesh, database_url=url) for _ in range(2)]
    operator = bearer(token())
    try:

        def all_resolved() -> bool:
            found = [seeded.get("acme", row.execution_id) for row in rows]
            return all(r is not None and r.reconcile_state == "RESOLVED" for r in found)

        await eventually(all_resolved, timeout_s=40)
        async with vouching_channel(mesh, services[0].address) as channel:
            stub = Stub(channel)
            for request in requests:

                async def reconciled(
                    request: gateway_pb2.ExecuteActionRequest = request,
                ) -> list[audit_pb2.AuditEvent]:
                    return await events_of(
                        stub, operator, RECORD_TYPE, request.record.id, RECONCILED
                    )

                events = await eventually(reconciled, timeout_s=20)
                assert isinstance(events, list) and len(events) == 1, events
    finally:
        for service in services:
            mesh.stop_service(service.name)
        seeded.close()


def test_one_lease_at_a_time_and_a_lapsed_lease_passes_to_another_replica(
    tmp_path: Path,
) -> None:
    store = GatewayStore(sqlite_url(tmp_path / "gateway.db"))
    try:
        now = datetime.now(UTC)
        told = orphan(touch("lease"), RECON, ALICE).orphaned(at=now - timedelta(seconds=1))
        store.insert_execution(told, [])
        lease = timedelta(seconds=30)
        assert store.write(lease_reconcile_op(told.execution_id, "a", now, now + lease))
        assert not store.write(lease_reconcile_op(told.execution_id, "b", now, now + lease))
        # Replica "a" crashed: once its lease lapses, "b" takes over...
        later = now + lease + timedelta(seconds=1)
        assert store.write(lease_reconcile_op(told.execution_id, "b", later, later + lease))
        # ... and "a", back late, may no longer write what it found.
        settled = told.reconciled(Outcome.SUCCEEDED, at=later, external_ref="ref")
        assert not store.write(reconcile_op(settled, "a", []))
        assert store.write(reconcile_op(settled, "b", []))
        stored = store.get("acme", told.execution_id)
        assert stored is not None and stored.reconcile_state is ReconcileState.RESOLVED
        assert (stored.outcome, stored.late_outcome) == (ORPHAN_OUTCOME, Outcome.SUCCEEDED)
        # Settled: nobody leases it again, and it is not due.
        assert not store.write(lease_reconcile_op(told.execution_id, "c", later, later + lease))
        assert store.due_reconciles(later + lease * 10, 10) == []
    finally:
        store.close()
