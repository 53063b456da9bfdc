"""The per-tenant hash chain, execution summaries and trace queries of the real AuditService."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import struct
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from actionmesh.auditlog.storage import AuditRepository
from actionmesh.rpc.errors import error_details
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.v1 import audit_pb2, common_pb2
from tests.test_auditlog import AuditClient, make_event, start

pytestmark = pytest.mark.timeout(60)

T = audit_pb2
BASE = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditClient]:
    client = await start(tmp_path / "audit.db")
    yield client
    await client.close()


def independent_hash(tenant: str, index: int, prev_hex: str, stored: bytes) -> str:
    """The chain encoding exactly as documented, written without the project's code."""
    name = tenant.encode()
    return hashlib.sha256(
        b"actionmesh.audit.chain.v1"
        + struct.pack(">I", len(name))
        + name
        + struct.pack(">Q", index)
        + bytes.fromhex(prev_hex)
        + stored
    ).hexdigest()


async def verify(audit: AuditClient, tenant: str = "") -> list[audit_pb2.ChainVerification]:
    reply = await audit.stub.VerifyChain(audit_pb2.VerifyChainRequest(tenant=tenant), timeout=10)
    return list(reply.chains)


async def seed_chain(audit: AuditClient, count: int, tenant: str = "acme") -> None:
    # Several batches, so links also cross batch boundaries.
    for start_at in range(0, count, 4):
        batch = [
            make_event(f"{tenant}-{n}", tenant=tenant)
            for n in range(start_at, min(count, start_at + 4))
        ]
        await audit.append(batch)


async def test_each_tenants_events_form_one_chain_an_auditor_can_recompute(
    audit: AuditClient,
) -> None:
    await seed_chain(audit, 10, "acme")
    await seed_chain(audit, 3, "globex")
    events = await audit.whole_timeline("acme")
    assert [e.chain_index for e in events] == list(range(1, 11))
    prev = "0" * 64
    for event in events:
        stored = audit_pb2.AuditEvent()
        stored.CopyFrom(event)
        for name in ("sequence", "chain_index", "prev_chain_hash", "chain_hash"):
            stored.ClearField(name)  # type: ignore[arg-type]
        assert event.prev_chain_hash == prev
        expected = independent_hash(
            "acme", event.chain_index, prev, stored.SerializeToString(deterministic=True)
        )
        assert event.chain_hash == expected
        prev = event.chain_hash

    chains = {c.tenant: c for c in await verify(audit)}
    assert set(chains) == {"acme", "globex"}
    assert chains["acme"].intact and chains["acme"].events_checked == 10
    assert chains["acme"].head_index == 10 and chains["acme"].head_hash == prev
    assert chains["globex"].intact and chains["globex"].head_index == 3
    # A duplicate append neither stores nor links anything.
    again = await audit.append([make_event("acme-3")])
    assert (again.stored, again.duplicates) == (0, 1)
    (acme,) = await verify(audit, "acme")
    assert acme.intact and acme.head_index == 10


def edit(db_path: Path, sql: str, *params: object) -> None:
    """Change the database behind the service's back, as an intruder with file access would."""
    connection = sqlite3.connect(db_path)
    try:
        changed = connection.execute(sql, params).rowcount
        connection.commit()
    finally:
        connection.close()
    assert changed == 1, "the tampering statement must hit exactly one row"


def stored_row(db_path: Path, event_id: str) -> tuple[int, int, bytes]:
    connection = sqlite3.connect(db_path)
    try:
        row = connection.execute(
            "SELECT sequence, chain_index, payload FROM audit_events WHERE event_id = ?",
            (event_id,),
        ).fetchone()
    finally:
        connection.close()
    return int(row[0]), int(row[1]), bytes(row[2])


async def test_an_event_edited_in_the_database_is_named_by_verification(
    audit: AuditClient,
) -> None:
    await seed_chain(audit, 8, "acme")
    await seed_chain(audit, 2, "globex")
    sequence, index, payload = stored_row(audit.db_path, "acme-5")
    forged = audit_pb2.AuditEvent.FromString(payload)
    forged.outcome = common_pb2.OUTCOME_SUCCEEDED
    forged.message = "all fine"
    edit(
        audit.db_path,
        "UPDATE audit_events SET payload = ? WHERE event_id = ?",
        forged.SerializeToString(deterministic=True),
        "acme-5",
    )
    chains = {c.tenant: c for c in await verify(audit)}
    acme = chains["acme"]
    assert not acme.intact
    assert acme.first_break.event_id == "acme-5"
    assert (acme.first_break.chain_index, acme.first_break.sequence) == (index, sequence)
    assert "hash mismatch" in acme.first_break.problem
    assert acme.events_checked == index - 1
    assert chains["globex"].intact, "another tenant's chain is unaffected"


async def test_an_indexed_column_changed_behind_the_evidence_is_named(audit: AuditClient) -> None:
    await seed_chain(audit, 5, "acme")
    edit(audit.db_path, "UPDATE audit_events SET actor = 'mallory' WHERE event_id = 'acme-2'")
    (acme,) = await verify(audit, "acme")
    assert not acme.intact
    assert acme.first_break.event_id == "acme-2"
    assert "'actor'" in acme.first_break.problem


async def test_removed_events_are_detected_in_the_middle_and_at_the_end(
    audit: AuditClient,
) -> None:
    await seed_chain(audit, 6, "acme")
    _, index, _ = stored_row(audit.db_path, "acme-5")  # the last one
    edit(audit.db_path, "DELETE FROM audit_events WHERE event_id = 'acme-5'")
    (acme,) = await verify(audit, "acme")
    assert not acme.intact and acme.first_break.chain_index == index
    assert "removed" in acme.first_break.problem

    _, middle, _ = stored_row(audit.db_path, "acme-2")
    edit(audit.db_path, "DELETE FROM audit_events WHERE event_id = 'acme-2'")
    (acme,) = await verify(audit, "acme")
    assert not acme.intact
    assert acme.first_break.chain_index == middle
    assert f"chain index {middle} is missing" in acme.first_break.problem


async def test_verify_chain_of_an_unknown_tenant_is_an_empty_intact_chain(
    audit: AuditClient,
) -> None:
    (chain,) = await verify(audit, "nobody-here")
    assert chain.intact and chain.head_index == 0 and chain.events_checked == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await verify(audit, "x" * 500)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh audit database: a SQLite file, or a database on the throwaway PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "audit.db")
    return str(request.getfixturevalue("postgres_url"))


def test_concurrent_writers_extend_one_linear_chain(database_url: str) -> None:
    """Two repositories (as two audit log replicas would) and several threads each."""
    url = database_url
    first = AuditRepository(make_engine(url))
    first.create_schema()
    second = AuditRepository(make_engine(url))
    errors: list[BaseException] = []

    def writer(repository: AuditRepository, name: str) -> None:
        try:
            for batch in range(10):
                repository.append(
                    [make_event(f"{name}-{batch}-{n}", tenant="acme") for n in range(5)]
                    + [make_event(f"{name}-{batch}-g", tenant="globex")]
                )
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(repository, f"w{i}-{id(repository)}"))
        for i in range(3)
        for repository in (first, second)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    try:
        assert not errors
        acme = first.verify_chain("acme")
        globex = second.verify_chain("globex")
        assert acme.intact and acme.head_index == 6 * 10 * 5 == first.count("acme")
        assert globex.intact and globex.head_index == 6 * 10 == first.count("globex")
    finally:
        first.close()
        second.close()


# -- execution summaries ---------------------------------------------------------------
def event(
    event_id: str,
    event_type: audit_pb2.AuditEventType.ValueType,
    execution_id: str,
    *,
    minute: int,
    actor: str = "alice",
    outcome: common_pb2.Outcome.ValueType = common_pb2.OUTCOME_UNSPECIFIED,
    action_id: str = "workitem.retry",
    record: tuple[str, str] = ("workitem", "wi-1001"),
    tenant: str = "acme",
    reason: str = "",
    external_ref: str = "",
    trace_id: str = "",
) -> audit_pb2.AuditEvent:
    built = make_event(event_id, tenant=tenant, record=record, event_type=event_type)
    built.execution_id = execution_id
    built.actor = actor
    built.outcome = outcome
    built.action_id = action_id
    built.provider_id = action_id.split(".")[0] + "s"
    built.reason = reason
    built.external_ref = external_ref
    built.trace_id = trace_id
    built.occurred_at.FromDatetime(BASE + timedelta(minutes=minute))
    return built


OK = common_pb2.OUTCOME_SUCCEEDED
DENIED = common_pb2.OUTCOME_DENIED
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def seed_executions(audit: AuditClient) -> None:
    await audit.append(
        [
            # e1: alice retries, succeeds.
            event("e1-s", T.AUDIT_EVENT_TYPE_EXECUTION_STARTED, "e1", minute=0, trace_id=TRACE),
            event(
                "e1-f",
                T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
                "e1",
                minute=1,
                outcome=OK,
                external_ref="job-1",
                trace_id=TRACE,
            ),
            # e2: bob asks for a service level change; sam approves; it succeeds.
            event(
                "e2-r",
                T.AUDIT_EVENT_TYPE_APPROVAL_REQUESTED,
                "e2",
                minute=10,
                actor="bob",
                action_id="ticket.change_service_level",
                record=("ticket", "t-100"),
                outcome=common_pb2.OUTCOME_PENDING_APPROVAL,
            ),
            # e3: alice's attempt refused by policy (no STARTED).
            event(
                "e3-f",
                T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
                "e3",
                minute=20,
                outcome=DENIED,
                reason="POLICY_DENIED",
            ),
            # Another tenant's execution by an "alice" of their own.
            event("g1-s", T.AUDIT_EVENT_TYPE_EXECUTION_STARTED, "g1", minute=5, tenant="globex"),
        ]
    )
    # The approval's later steps arrive in a later batch, and out of order.
    await audit.append(
        [
            event(
                "e2-f",
                T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
                "e2",
                minute=32,
                actor="bob",
                action_id="ticket.change_service_level",
                record=("ticket", "t-100"),
                outcome=OK,
                external_ref="chg-9",
            ),
            event(
                "e2-g",
                T.AUDIT_EVENT_TYPE_APPROVAL_GRANTED,
                "e2",
                minute=30,
                actor="sam",
                action_id="ticket.change_service_level",
                record=("ticket", "t-100"),
            ),
            event(
                "e2-s",
                T.AUDIT_EVENT_TYPE_EXECUTION_STARTED,
                "e2",
                minute=31,
                actor="bob",
                action_id="ticket.change_service_level",
                record=("ticket", "t-100"),
            ),
        ]
    )


async def summaries(
    audit: AuditClient, **filters: object
) -> audit_pb2.ListExecutionSummariesResponse:
    request = audit_pb2.ListExecutionSummariesRequest(tenant="acme", **filters)  # type: ignore[arg-type]
    return await audit.stub.ListExecutionSummaries(request, timeout=10)


async def test_executions_are_summarised_newest_first_with_who_and_how_it_ended(
    audit: AuditClient,
) -> None:
    await seed_executions(audit)
    listed = (await summaries(audit)).executions
    assert [s.execution_id for s in listed] == ["e3", "e2", "e1"]
    e3, e2, e1 = listed
    assert (e1.actor, e1.outcome, e1.external_ref, e1.event_count) == ("alice", OK, "job-1", 2)
    assert e1.trace_id == TRACE and e1.started_at.ToDatetime(tzinfo=UTC) == BASE
    assert e1.finished_at.ToDatetime(tzinfo=UTC) == BASE + timedelta(minutes=1)
    # Out-of-order arrival still ends in the final state.
    assert (e2.actor, e2.approver, e2.outcome, e2.external_ref) == ("bob", "sam", OK, "chg-9")
    assert e2.last_event_type == T.AUDIT_EVENT_TYPE_EXECUTION_FINISHED and e2.event_count == 4
    assert e2.record == common_pb2.RecordRef(type="ticket", id="t-100")
    assert (e3.outcome, e3.reason) == (DENIED, "POLICY_DENIED")
    assert all(s.tenant == "acme" for s in listed)


async def test_execution_filters_narrow_by_actor_action_outcome_record_and_time(
    audit: AuditClient,
) -> None:
    await seed_executions(audit)

    async def ids(**filters: object) -> list[str]:
        return [s.execution_id for s in (await summaries(audit, **filters)).executions]

    assert await ids(actor="alice") == ["e3", "e1"]
    assert await ids(actor="sam") == ["e2"], "the approver is an actor too"
    assert await ids(action_id="ticket.change_service_level") == ["e2"]
    assert await ids(outcomes=[DENIED]) == ["e3"]
    assert await ids(outcomes=[DENIED, OK]) == ["e3", "e2", "e1"]
    assert await ids(record=common_pb2.RecordRef(type="ticket", id="t-100")) == ["e2"]
    after = audit_pb2.ListExecutionSummariesRequest().started_after
    after.FromDatetime(BASE + timedelta(minutes=5))
    before = audit_pb2.ListExecutionSummariesRequest().started_before
    before.FromDatetime(BASE + timedelta(minutes=15))
    assert await ids(started_after=after) == ["e3", "e2"]
    assert await ids(started_after=after, started_before=before) == ["e2"]
    assert await ids(actor="nobody") == []
    # Paging: one at a time, newest first, no gaps or repeats.
    seen, token = [], ""
    while True:
        page = await summaries(audit, page_size=1, page_token=token)
        seen += [s.execution_id for s in page.executions]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["e3", "e2", "e1"]


async def test_bad_execution_filters_are_named_in_the_error(audit: AuditClient) -> None:
    later = audit_pb2.ListExecutionSummariesRequest().started_after
    later.FromDatetime(BASE + timedelta(days=1))
    earlier = audit_pb2.ListExecutionSummariesRequest().started_before
    earlier.FromDatetime(BASE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await summaries(
            audit,
            outcomes=[99],
            record=common_pb2.RecordRef(type="ticket"),
            started_after=later,
            started_before=earlier,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in error_details(caught.value).violations}
    assert fields == {"outcomes[0]", "record", "started_before"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.ListExecutionSummaries(
            audit_pb2.ListExecutionSummariesRequest(), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_trace_events_are_tenant_scoped_paged_and_validated(audit: AuditClient) -> None:
    await seed_executions(audit)
    first = await audit.stub.ListTraceEvents(
        audit_pb2.ListTraceEventsRequest(tenant="acme", trace_id=TRACE, page_size=1), timeout=10
    )
    assert [e.event_id for e in first.events] == ["e1-s"] and first.next_page_token
    rest = await audit.stub.ListTraceEvents(
        audit_pb2.ListTraceEventsRequest(
            tenant="acme", trace_id=TRACE, page_token=first.next_page_token
        ),
        timeout=10,
    )
    assert [e.event_id for e in rest.events] == ["e1-f"] and not rest.next_page_token
    other = await audit.stub.ListTraceEvents(
        audit_pb2.ListTraceEventsRequest(tenant="globex", trace_id=TRACE), timeout=10
    )
    assert list(other.events) == []
    for bad in ("", "XYZ", TRACE.upper()):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await audit.stub.ListTraceEvents(
                audit_pb2.ListTraceEventsRequest(tenant="acme", trace_id=bad), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_audit_verify_command_exits_5_and_names_the_tampered_event(
    audit: AuditClient,
) -> None:
    await seed_chain(audit, 4, "acme")

    async def run_cli(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "actionmesh.cli",
            "audit",
            "verify",
            "--auditlog",
            audit.running.address,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "250"},
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        return int(process.returncode or 0), output.decode()

    code, output = await run_cli()
    assert code == 0 and "intact" in output
    edit(
        audit.db_path,
        "UPDATE audit_events SET outcome = 'OUTCOME_SUCCEEDED' WHERE event_id = 'acme-1'",
    )
    code, output = await run_cli("--tenant", "acme")
    assert code == 5, output
    assert "BROKEN" in output and "acme-1" in output and "'outcome'" in output
