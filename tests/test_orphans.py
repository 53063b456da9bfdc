"""Executions orphaned by a stopped or crashed gateway are closed as TIMED_OUT, once.

A RUNNING row records its dispatch deadline; once that (plus a margin) has passed
its runner is gone, and any replica may close it with a compare-and-set: outcome
TIMED_OUT, reason GATEWAY_STOPPED, and one EXECUTION_FINISHED event in the outbox.
Store-level tests run on SQLite and PostgreSQL; the process-level one starts a
gateway with the same start_gateway the binary uses, next to the session mesh.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import grpc.aio
import pytest

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.claims import request_hash
from actionmesh.gateway.config import GatewayConfig
from actionmesh.gateway.directory import ProviderDirectory
from actionmesh.gateway.dispatch import ORPHAN_MARGIN_S, Deadlines, Dispatcher
from actionmesh.gateway.ledger import Ledger
from actionmesh.gateway.model import (
    ORPHAN_REASON,
    PENDING_APPROVAL,
    RUNNING,
    ApprovalState,
    ExecuteCommand,
    ExecutionRecord,
    ExecutionState,
)
from actionmesh.gateway.redaction import Redactor
from actionmesh.gateway.server import start_gateway
from actionmesh.gateway.storage import (
    GatewayStore,
    OrphanRule,
    decide_approval_op,
    finish_execution_op,
    reclaim_unavailable_op,
)
from actionmesh.gateway.sweeper import Sweeper
from actionmesh.gateway.writer import GroupCommitWriter
from actionmesh.mesh import Mesh
from actionmesh.providers.workitems.store import WorkItem
from actionmesh.rpc.outcomes import Outcome
from actionmesh.runtime.db import sqlite_url
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TokenFactory, bearer, eventually, gateway_settings
from tests.provider_state import put_item

pytestmark = pytest.mark.timeout(60)

RULE = OrphanRule(margin=timedelta(seconds=5), legacy_running=timedelta(seconds=120))
NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED
STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED


def marker(name: str) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(event_id=uuid.uuid4().hex, message=name)


def running(
    *,
    deadline: datetime | None,
    started_at: datetime = NOW - timedelta(minutes=1),
    outcome: str = RUNNING.value,
    **fields: object,
) -> ExecutionRecord:
    key = uuid.uuid4().hex
    return ExecutionRecord(
        execution_id=uuid.uuid4().hex,
        tenant="acme",
        idempotency_key=key,
        request_hash="h-" + key,
        action_id="workitem.retry",
        provider_id="workitems",
        record_type="workitem",
        record_id="wi-1",
        actor="alice",
        outcome=ExecutionState(outcome),
        started_at=started_at,
        dispatch_deadline=deadline,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GatewayStore]:
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "gateway.db")
    else:
        url = str(request.getfixturevalue("postgres_url"))
    store = GatewayStore(url)
    try:
        yield store
    finally:
        store.close()


def outbox(store: GatewayStore) -> list[str]:
    return [audit_pb2.AuditEvent.FromString(p).message for _, p in store.pending_events(100)]


def orphan_ids(store: GatewayStore, now: datetime = NOW) -> set[str]:
    return {r.execution_id for r in store.orphaned_executions(RULE, now, 100)}


# --- the store --------------------------------------------------------------------------


def test_a_row_past_its_deadline_is_resolved_exactly_once(store: GatewayStore) -> None:
    orphan = running(deadline=NOW - timedelta(seconds=6))
    store.insert_execution(orphan, [marker("started")])
    assert orphan_ids(store) == {orphan.execution_id}

    # Two replicas' sweeps (or a sweep and a same-key retry) race on the same row.
    second = GatewayStore(str(store.engine.url.render_as_string(hide_password=False)))
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(
                    lambda s: s.resolve_orphan(orphan.execution_id, RULE, NOW, [marker("done")]),
                    (store, second),
                )
            )
    finally:
        second.close()

    assert sorted(results) == [False, True]
    stored = store.get("acme", orphan.execution_id)
    assert stored is not None
    assert (stored.outcome, stored.reason, stored.finished_at) == ("TIMED_OUT", ORPHAN_REASON, NOW)
    assert "may or may not have acted" in stored.message
    assert outbox(store) == ["started", "done"]
    assert orphan_ids(store) == set()
    # Once closed, a later resolver finds nothing to do and enqueues nothing.
    later = NOW + timedelta(hours=1)
    assert not store.resolve_orphan(orphan.execution_id, RULE, later, [marker("again")])
    assert outbox(store) == ["started", "done"]


def test_a_row_within_its_deadline_and_margin_is_untouched(store: GatewayStore) -> None:
    future = running(deadline=NOW + timedelta(seconds=30))
    # Past the deadline, but the runner's finish write may still be on its way.
    in_margin = running(deadline=NOW - timedelta(seconds=4))
    for record in (future, in_margin):
        store.insert_execution(record, [])
        assert not store.resolve_orphan(record.execution_id, RULE, NOW, [marker("x")])
        stored = store.get("acme", record.execution_id)
        assert stored is not None and stored.outcome == RUNNING and stored.finished_at is None
    assert orphan_ids(store) == set()
    assert outbox(store) == []
    assert RULE.orphaned_at(in_margin) == NOW + timedelta(seconds=1)
    assert orphan_ids(store, NOW + timedelta(seconds=1)) == {in_margin.execution_id}


def test_finished_and_pending_rows_are_never_orphans(store: GatewayStore) -> None:
    done = running(deadline=NOW - timedelta(hours=1), outcome="SUCCEEDED")
    pending = running(
        deadline=None,
        started_at=NOW - timedelta(days=1),
        outcome=PENDING_APPROVAL,
        approval_state=ApprovalState.PENDING,
    )
    for record in (done, pending):
        store.insert_execution(record, [])
        assert not store.resolve_orphan(record.execution_id, RULE, NOW, [marker("x")])
    assert orphan_ids(store) == set()
    assert outbox(store) == []


def test_rows_from_before_the_migration_use_the_longest_possible_run(store: GatewayStore) -> None:
    legacy_limit = RULE.legacy_running + RULE.margin
    old = running(deadline=None, started_at=NOW - legacy_limit - timedelta(seconds=1))
    young = running(deadline=None, started_at=NOW - legacy_limit + timedelta(seconds=1))
    # Started long ago but approved just now: its dispatch began at the decision.
    approved = running(
        deadline=None,
        started_at=NOW - timedelta(days=1),
        approval_state=ApprovalState.APPROVED,
        approval_decided_at=NOW - timedelta(seconds=10),
    )
    for record in (old, young, approved):
        store.insert_execution(record, [])
    assert orphan_ids(store) == {old.execution_id}
    assert RULE.orphaned_at(approved) == NOW - timedelta(seconds=10) + legacy_limit
    assert not store.resolve_orphan(young.execution_id, RULE, NOW, [])
    assert not store.resolve_orphan(approved.execution_id, RULE, NOW, [])
    assert store.resolve_orphan(old.execution_id, RULE, NOW, [marker("old")])
    assert outbox(store) == ["old"]


def test_a_runner_finishing_after_its_row_was_closed_changes_nothing(
    store: GatewayStore,
) -> None:
    late = running(deadline=NOW - timedelta(minutes=1))
    store.insert_execution(late, [])
    assert store.resolve_orphan(late.execution_id, RULE, NOW, [marker("orphan")])
    late = late.finished_with(Outcome.SUCCEEDED, at=NOW)
    assert store.write(finish_execution_op(late, [marker("finished")])) is False
    stored = store.get("acme", late.execution_id)
    assert stored is not None and stored.reason == ORPHAN_REASON
    assert outbox(store) == ["orphan"]
    # A live row still finishes as before.
    live = running(deadline=NOW + timedelta(seconds=10))
    store.insert_execution(live, [])
    live = live.finished_with(Outcome.SUCCEEDED, at=NOW)
    assert store.write(finish_execution_op(live, [marker("finished")])) is True
    assert outbox(store) == ["orphan", "finished"]


def test_every_way_into_running_records_a_deadline(store: GatewayStore) -> None:
    deadline = NOW + timedelta(seconds=30)
    pending = running(deadline=None, outcome=PENDING_APPROVAL, approval_state=ApprovalState.PENDING)
    store.insert_execution(pending, [])
    approved = pending.approved(approver="sam", comment="", at=NOW, dispatch_deadline=deadline)
    assert store.write(decide_approval_op(approved, []))
    unavailable = running(deadline=NOW - timedelta(hours=1), outcome="UNAVAILABLE")
    store.insert_execution(unavailable, [])
    assert store.write(reclaim_unavailable_op(unavailable.execution_id, deadline))
    for record in (pending, unavailable):
        stored = store.get("acme", record.execution_id)
        assert stored is not None
        assert (stored.outcome, stored.dispatch_deadline) == (RUNNING, deadline)
    assert orphan_ids(store) == set()


# --- the executor and the sweep ---------------------------------------------------------


async def test_the_sweep_closes_a_backlog_with_one_finished_event_each(tmp_path: Path) -> None:
    store = GatewayStore(sqlite_url(tmp_path / "gateway.db"))
    writer = GroupCommitWriter(store)
    writer.start()
    deadlines = Deadlines(default_timeout_s=5.0, max_timeout_s=10.0, late_result_grace_s=60.0)
    ledger = Ledger(store, writer, Redactor.from_key_file(""), lambda: None)
    dispatcher = Dispatcher(ProviderDirectory("127.0.0.1:9"), ledger, deadlines)
    sweeper = Sweeper(ledger, dispatcher, deadlines)
    alice = Caller(subject="alice", tenant="acme", roles=("operator",))
    now = datetime.now(UTC)
    orphans = [
        orphan_of(command_of(retry_request(f"wi-{n}")), alice, now - timedelta(minutes=1))
        for n in range(25)
    ]
    live = orphan_of(command_of(retry_request("wi-live")), alice, now + timedelta(minutes=1))
    for record in (*orphans, live):
        store.insert_execution(record, [])
    try:
        # Batches of 10: the sweep goes on while each batch is full and fully closed.
        assert await sweeper.resolve_orphans(10) == 25
        assert await sweeper.resolve_orphan(orphans[0]) is None  # already closed
    finally:
        await writer.close()
    events = [audit_pb2.AuditEvent.FromString(p) for _, p in store.pending_events(100)]
    assert sorted(e.execution_id for e in events) == sorted(o.execution_id for o in orphans)
    for event in events:
        assert (event.type, event.outcome, event.reason) == (
            FINISHED,
            common_pb2.OUTCOME_TIMED_OUT,
            ORPHAN_REASON,
        )
        assert (event.actor, event.tenant, event.action_id) == ("alice", "acme", "workitem.retry")
        assert event.record.id.startswith("wi-") and event.idempotency_key
        assert event.inputs["reason"] == "parser fixed"
    stored = store.get("acme", live.execution_id)
    assert stored is not None and stored.outcome == RUNNING
    store.close()


# --- a gateway process ------------------------------------------------------------------


def orphan_of(command: ExecuteCommand, caller: Caller, deadline: datetime) -> ExecutionRecord:
    """What a gateway killed mid-dispatch leaves behind for ``command``."""
    return ExecutionRecord(
        execution_id=uuid.uuid4().hex,
        tenant=caller.tenant,
        idempotency_key=command.idempotency_key,
        request_hash=request_hash(caller, command),
        action_id=command.action_id,
        provider_id="workitems",
        record_type=command.record.type,
        record_id=command.record.id,
        actor=caller.subject,
        outcome=RUNNING,
        started_at=deadline - timedelta(seconds=5),
        request_payload=command.frozen(),
        requester_roles=tuple(caller.roles),
        dispatch_deadline=deadline,
    )


def retry_request(record_id: str) -> gateway_pb2.ExecuteActionRequest:
    return gateway_pb2.ExecuteActionRequest(
        action_id="workitem.retry",
        record=common_pb2.RecordContext(
            tenant="acme", type="workitem", id=record_id, status="failed"
        ),
        inputs={"reason": common_pb2.InputValue(string_value="parser fixed")},
        idempotency_key=uuid.uuid4().hex,
    )


def command_of(request: gateway_pb2.ExecuteActionRequest) -> ExecuteCommand:
    return ExecuteCommand.thaw(request.SerializeToString())


async def test_a_gateway_closes_orphans_at_start_by_sweep_and_on_retry(
    mesh: Mesh, token: TokenFactory, tmp_path: Path
) -> None:
    alice = Caller(subject="alice", tenant="acme", roles=("operator",))
    url = sqlite_url(tmp_path / "gateway.db")
    seeded = GatewayStore(url)
    now = datetime.now(UTC)
    requests = {name: retry_request(f"wi-orphan-{uuid.uuid4().hex[:8]}") for name in "abc"}
    # The items exist in their system of record, which the gateway asks before it answers.
    for request in requests.values():
        put_item(mesh, WorkItem("acme", request.record.id, "customer_update", "failed"))
    at_start = orphan_of(command_of(requests["a"]), alice, now - timedelta(minutes=1))
    seeded.insert_execution(at_start, [])
    config = GatewayConfig(
        **gateway_settings(mesh, port=0, database_url=url, approval_sweep_interval_s=0.3)
    )
    running_gateway = await start_gateway(config)
    try:
        # (a) Closed by the start-up sweep, before the gateway serves anything.
        stored = seeded.get("acme", at_start.execution_id)
        assert stored is not None and (stored.outcome, stored.reason) == (
            "TIMED_OUT",
            ORPHAN_REASON,
        )

        # (b) Left behind by another replica later: the periodic sweep closes it.
        swept = orphan_of(command_of(requests["b"]), alice, datetime.now(UTC) - timedelta(hours=1))
        seeded.insert_execution(swept, [])

        def closed(execution_id: str) -> bool:
            row = seeded.get("acme", execution_id)
            return row is not None and row.outcome == "TIMED_OUT"

        await eventually(lambda: closed(swept.execution_id), timeout_s=10)

        # (c) Orphaned in a moment: a same-key retry does not wait 60 s for the sweep. It
        # closes the orphan, asks the provider (which never received it) and so runs it.
        soon = datetime.now(UTC) - timedelta(seconds=ORPHAN_MARGIN_S - 1.0)
        retried = orphan_of(command_of(requests["c"]), alice, soon)
        seeded.insert_execution(retried, [])
        async with grpc.aio.insecure_channel(running_gateway.address) as channel:
            stub = gateway_pb2_grpc.ActionGatewayServiceStub(channel)
            operator = bearer(token())
            started = time.monotonic()
            reply = await stub.ExecuteAction(requests["c"], metadata=operator, timeout=10)
            elapsed = time.monotonic() - started
            assert reply.execution.execution_id == retried.execution_id
            assert reply.execution.outcome == common_pb2.OUTCOME_SUCCEEDED
            assert elapsed < 5.0

            # Each orphan's evidence holds exactly one FINISHED TIMED_OUT event (the retried
            # one then its run's own FINISHED SUCCEEDED).
            async def finished_once(request: gateway_pb2.ExecuteActionRequest) -> bool:
                history = await stub.GetRecordHistory(
                    gateway_pb2.GetRecordHistoryRequest(
                        record=common_pb2.RecordRef(type="workitem", id=request.record.id)
                    ),
                    metadata=operator,
                    timeout=10,
                )
                finished = [(e.outcome, e.reason) for e in history.events if e.type == FINISHED]
                closed = [(common_pb2.OUTCOME_TIMED_OUT, ORPHAN_REASON)]
                if request is requests["c"]:
                    return (
                        finished[:1] == closed
                        and len(finished) == 2
                        and (finished[1][0] == common_pb2.OUTCOME_SUCCEEDED)
                    )
                return finished == closed

            for request in requests.values():
                await eventually(partial(finished_once, request), timeout_s=15)
    finally:
        await running_gateway.stop(1.0)
        seeded.close()
