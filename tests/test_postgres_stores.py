"""The stores' correctness-critical behaviours on a real PostgreSQL, and the mesh on it.

SQLite serializes writers, so races that matter in production (several gateway or
audit log replicas on one PostgreSQL) only show up here: each "replica" below is
its own repository with its own engine and connection pool, run from its own thread.
The database comes from tests/postgres.py (skipped without PostgreSQL unless
ACTIONMESH_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

import grpc.aio
import pytest

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.server import start_auditlog
from actionmesh.auditlog.storage import AuditRepository
from actionmesh.gateway.auth import mint_token
from actionmesh.gateway.config import GatewayConfig
from actionmesh.gateway.model import (
    PENDING_APPROVAL,
    RUNNING,
    ApprovalState,
    ExecutionRecord,
    ExecutionState,
)
from actionmesh.gateway.server import start_gateway
from actionmesh.gateway.storage import GatewayStore, KeyConflict
from actionmesh.providers.workitems import workitems
from actionmesh.registry.config import RegistryConfig
from actionmesh.registry.model import Health, Provider
from actionmesh.registry.server import start_registry
from actionmesh.registry.storage import ProviderRepository
from actionmesh.runtime.db import make_engine
from actionmesh.sdk import ProviderConfig, start_provider
from actionmesh.v1 import audit_pb2, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import bearer, eventually, gateway_settings
from tests.postgres import PostgresServer

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
REPLICAS = 8


def race(work: Sequence[Callable[[], T]], *, timeout_s: float = 60) -> list[T | BaseException]:
    """Run each callable in its own thread, released together; results or exceptions."""
    barrier = threading.Barrier(len(work))
    results: list[T | BaseException] = [RuntimeError("did not finish")] * len(work)

    def run(index: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[index] = work[index]()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(work))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return results


# --- audit log ----------------------------------------------------------------------------


def audit_event(
    event_id: str, *, tenant: str = "acme", record_id: str = "wi-1"
) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(
        event_id=event_id,
        type=audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
        tenant=tenant,
        record=common_pb2.RecordRef(type="workitem", id=record_id),
        actor="alice",
        action_id="workitem.retry",
        execution_id=f"x-{event_id}",
        outcome=common_pb2.OUTCOME_SUCCEEDED,
    )
    event.occurred_at.FromDatetime(datetime(2025, 1, 2, tzinfo=UTC))
    return event


@pytest.fixture
def audit_url(postgres_url: str) -> str:
    AuditRepository(make_engine(postgres_url)).create_schema()
    return postgres_url


@pytest.fixture
def audit(audit_url: str) -> Iterator[AuditRepository]:
    repository = AuditRepository(make_engine(audit_url))
    try:
        yield repository
    finally:
        repository.close()


def test_audit_append_is_idempotent_on_the_event_id(audit: AuditRepository) -> None:
    first = audit.append([audit_event("a"), audit_event("b"), audit_event("a")])
    assert (first.stored, first.duplicates) == (2, 1)

    again = audit.append([audit_event("b"), audit_event("c")])
    assert (again.stored, again.duplicates) == (1, 1)

    assert [e.event_id for e in audit.timeline("acme", "workitem", "wi-1")] == ["a", "b", "c"]
    assert audit.count_all() == 3


def test_concurrent_overlapping_batches_store_each_event_exactly_once(audit_url: str) -> None:
    ids = [f"e-{n:03d}" for n in range(120)]
    rng = random.Random(7)
    # Every replica sends its own random overlapping half of the ids, in its own order.
    batches = [rng.sample(ids, 60) for _ in range(REPLICAS)]
    replicas = [AuditRepository(make_engine(audit_url)) for _ in range(REPLICAS)]
    try:
        results = race(
            [
                partial(replica.append, [audit_event(i) for i in batch])
                for replica, batch in zip(replicas, batches, strict=True)
            ]
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        expected = set().union(*map(set, batches))
        stored = sum(r.stored for r in results if not isinstance(r, BaseException))
        assert stored == len(expected), "each event is counted as stored by exactly one writer"

        timeline = replicas[0].timeline("acme", "workitem", "wi-1", limit=1000)
        assert sorted(e.event_id for e in timeline) == sorted(expected)
        assert replicas[0].count_all() == len(expected)
        # The per-tenant hash chain stayed linear under the race.
        assert replicas[0].verify_chain("acme").intact
    finally:
        for replica in replicas:
            replica.close()


def test_audit_timeline_pages_in_store_order_within_the_tenant(audit: AuditRepository) -> None:
    for n in range(25):
        audit.append(
            [
                audit_event(f"mine-{n:02d}"),
                audit_event(f"other-record-{n:02d}", record_id="wi-2"),
                audit_event(f"other-tenant-{n:02d}", tenant="globex"),
            ]
        )
    seen: list[audit_pb2.AuditEvent] = []
    after = 0
    while page := audit.timeline("acme", "workitem", "wi-1", after_sequence=after, limit=10):
        assert len(page) <= 10
        seen += page
        after = page[-1].sequence
    assert [e.event_id for e in seen] == [f"mine-{n:02d}" for n in range(25)]
    sequences = [e.sequence for e in seen]
    assert sequences == sorted(sequences) and len(set(sequences)) == 25
    assert audit.timeline("globex", "workitem", "wi-1", limit=1000)[0].event_id == "other-tenant-00"


# --- gateway store ------------------------------------------------------------------------

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def execution(
    *,
    key: str,
    tenant: str = "acme",
    outcome: ExecutionState = RUNNING,
    approval_state: ApprovalState | None = None,
) -> ExecutionRecord:
    return ExecutionRecord(
        execution_id=uuid.uuid4().hex,
        tenant=tenant,
        idempotency_key=key,
        request_hash="h" * 64,
        action_id="ticket.change_service_level",
        provider_id="records",
        record_type="ticket",
        record_id="t-100",
        actor="alice",
        outcome=outcome,
        started_at=NOW,
        approval_state=approval_state,
        approval_expires_at=NOW + timedelta(hours=1) if approval_state else None,
    )


def marker(name: str) -> audit_pb2.AuditEvent:
    return audit_event(f"{name}-{uuid.uuid4().hex}")


@pytest.fixture
def gateway_url(postgres_url: str) -> str:
    GatewayStore(postgres_url).close()  # migrates once, before the replicas race
    return postgres_url


def test_concurrent_claims_of_one_idempotency_key_let_exactly_one_win(gateway_url: str) -> None:
    stores = [GatewayStore(gateway_url) for _ in range(REPLICAS)]
    try:
        claims = [execution(key="k-1") for _ in stores]
        results = race(
            [
                partial(store.insert_execution, claim, [marker("started")])
                for store, claim in zip(stores, claims, strict=True)
            ]
        )
        winners = [c for c, r in zip(claims, results, strict=True) if r is None]
        conflicts = [r for r in results if isinstance(r, KeyConflict)]
        assert len(winners) == 1 and len(conflicts) == REPLICAS - 1
        # Every loser is shown the winner's execution, the idempotent answer.
        assert {c.existing.execution_id for c in conflicts} == {winners[0].execution_id}
        # Only the winner's audit event was enqueued: losers rolled back whole.
        assert stores[0].outbox_depth() == 1

        # The key is scoped to the tenant: another tenant may use the same one.
        stores[0].insert_execution(execution(key="k-1", tenant="globex"), [])
        found = stores[0].find_by_key("globex", "k-1")
        assert found is not None and found.tenant == "globex"
    finally:
        for store in stores:
            store.close()


def test_two_concurrent_approval_decisions_exactly_one_wins(gateway_url: str) -> None:
    approve_store, reject_store = GatewayStore(gateway_url), GatewayStore(gateway_url)
    try:
        for round_ in range(10):
            pending = execution(
                key=f"k-{round_}", outcome=PENDING_APPROVAL, approval_state=ApprovalState.PENDING
            )
            approve_store.insert_execution(pending, [])
            approve = pending.approved(
                approver="sam", comment="", at=NOW, dispatch_deadline=NOW + timedelta(seconds=5)
            )
            reject = pending.rejected(approver="rita", comment="no", at=NOW)
            depth = approve_store.outbox_depth()
            won = race(
                [
                    partial(
                        approve_store.decide_approval,
                        approve,
                        [marker("granted")],
                    ),
                    partial(
                        reject_store.decide_approval,
                        reject,
                        [marker("rejected")],
                    ),
                ]
            )
            assert sorted(won, key=str) == [False, True], won
            stored = approve_store.get("acme", pending.execution_id)
            assert stored is not None
            winner = approve if won[0] is True else reject
            assert (stored.approval_state, stored.approver) == (
                winner.approval_state,
                winner.approver,
            )
            # Exactly the winner's event went to the outbox.
            assert approve_store.outbox_depth() == depth + 1
            # A late third decision finds it decided.
            assert not approve_store.decide_approval(approve, [])
    finally:
        approve_store.close()
        reject_store.close()


# --- registry -----------------------------------------------------------------------------


def provider(lease_id: str, expires_at: datetime) -> Provider:
    return Provider(
        provider_id="workitems",
        endpoint="127.0.0.1:1",
        version="1.0.0",
        actions=(),
        lease_id=lease_id,
        lease_expires_at=expires_at,
        registered_at=NOW,
        health=Health.UNKNOWN,
    )


@pytest.fixture
def registry_repositories(postgres_url: str) -> Iterator[tuple[ProviderRepository, ...]]:
    engines = [make_engine(postgres_url) for _ in range(2)]
    repositories = tuple(ProviderRepository(engine) for engine in engines)
    repositories[0].create_schema()
    try:
        yield repositories
    finally:
        for engine in engines:
            engine.dispose()


def test_registry_renews_only_a_live_matching_lease(
    registry_repositories: tuple[ProviderRepository, ...],
) -> None:
    repository = registry_repositories[0]
    expires = NOW + timedelta(seconds=10)
    assert repository.register(provider("lease-a", expires)) == ([], None)

    assert repository.renew("workitems", "lease-a", NOW, expires + timedelta(seconds=10))
    assert not repository.renew("workitems", "lease-b", NOW, expires + timedelta(seconds=20))
    assert not repository.renew("nobody", "lease-a", NOW, expires)
    # Lapsed: a renewal after expiry is refused (the provider must register again).
    late = expires + timedelta(seconds=30)
    assert not repository.renew("workitems", "lease-a", late, late + timedelta(seconds=10))
    stored = repository.get("workitems")
    assert stored is not None and stored.lease_expires_at == expires + timedelta(seconds=10)

    # A health result for an old lease is dropped; for the current one it is kept.
    assert repository.set_health("workitems", "lease-b", Health.SERVING) is None
    updated = repository.set_health("workitems", "lease-a", Health.SERVING)
    assert updated is not None and updated.health == Health.SERVING


def swept_one(repository: ProviderRepository, now: datetime) -> bool:
    return len(repository.remove_expired(now)) == 1


def test_a_renewal_racing_the_expiry_sweep_never_loses_a_live_lease(
    registry_repositories: tuple[ProviderRepository, ...],
) -> None:
    renewer, sweeper = registry_repositories
    for round_ in range(15):
        expires = NOW + timedelta(seconds=round_)
        renewer.register(provider(f"lease-{round_}", expires))
        # The renewal is sent just before expiry, the sweep runs just after it.
        renew_now, sweep_now = expires - timedelta(milliseconds=1), expires
        renewed, swept = race(
            [
                partial(
                    renewer.renew,
                    "workitems",
                    f"lease-{round_}",
                    renew_now,
                    expires + timedelta(seconds=10),
                ),
                partial(swept_one, sweeper, sweep_now),
            ]
        )
        present = renewer.get("workitems") is not None
        # Exactly one side wins: renewed and still there, or swept and the renewal refused.
        assert (renewed, present, swept) in {(True, True, False), (False, False, True)}


# --- end to end: every service on PostgreSQL ----------------------------------------------


async def test_discover_execute_history_with_every_service_on_postgresql(
    postgres_url: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    # Registry, audit log and gateway share one database, as a production deployment may;
    # the example provider keeps its own store in another.
    provider_url = await asyncio.to_thread(postgres_server.create_database)
    secret = tmp_path / "signing-key"
    secret.write_text(uuid.uuid4().hex)
    registry = await start_registry(
        RegistryConfig(port=0, database_url=postgres_url, health_check_interval_s=0.2)
    )
    audit = await start_auditlog(AuditLogConfig(port=0, database_url=postgres_url))
    gateway = await start_gateway(
        GatewayConfig(
            **gateway_settings(
                port=0,
                database_url=postgres_url,
                registry=registry.address,
                auditlog=audit.address,
                jwt_secret_file=str(secret),
                jwt_dev_mode=True,
            )
        )
    )
    items = await start_provider(
        workitems,
        ProviderConfig(
            port=0,
            registry=registry.address,
            data_dir=str(tmp_path),
            database_url=provider_url,
            seed_demo=True,
        ),
    )
    token = mint_token(secret.read_text(), subject="alice", tenant="acme", roles=["operator"])
    record = common_pb2.RecordContext(tenant="acme", type="workitem", id="wi-1001", status="failed")
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.ActionGatewayServiceStub(channel)

            async def retry_available() -> bool:
                reply = await stub.DiscoverActions(
                    gateway_pb2.DiscoverActionsRequest(record=record, skip_cache=True),
                    metadata=bearer(token),
                )
                return any(
                    a.descriptor.action_id == "workitem.retry" and a.available
                    for a in reply.actions
                )

            await eventually(retry_available, timeout_s=20)

            reply = await stub.ExecuteAction(
                gateway_pb2.ExecuteActionRequest(
                    action_id="workitem.retry",
                    record=record,
                    inputs={"reason": common_pb2.InputValue(string_value="parser fixed")},
                    idempotency_key=uuid.uuid4().hex,
                ),
                metadata=bearer(token),
            )
            execution_id = reply.execution.execution_id
            assert reply.execution.outcome == common_pb2.OUTCOME_SUCCEEDED

            async def started_and_finished() -> list[audit_pb2.AuditEvent]:
                history = await stub.GetRecordHistory(
                    gateway_pb2.GetRecordHistoryRequest(
                        record=common_pb2.RecordRef(type="workitem", id="wi-1001")
                    ),
                    metadata=bearer(token),
                )
                events = [e for e in history.events if e.execution_id == execution_id]
                return events if len(events) == 2 else []

            events = await eventually(started_and_finished, timeout_s=20)
            assert isinstance(events, list)
            started, finished = events
            assert started.type == audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
            assert finished.outcome == common_pb2.OUTCOME_SUCCEEDED
            assert finished.actor == "alice"
    finally:
        await items.stop(grace_s=1.0)
        await gateway.stop(1.0)
        await audit.stop(1.0)
        await registry.stop(1.0)
        await asyncio.to_thread(postgres_server.drop_database, provider_url)
    # The evidence is in PostgreSQL, in the tables the migrations made.
    repository = AuditRepository(make_engine(postgres_url))
    try:
        assert repository.count("acme", execution_id=execution_id) == 2
        assert repository.verify_chain("acme").intact
    finally:
        repository.close()
