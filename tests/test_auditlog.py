"""AuditService against a real server on a loopback port with a SQLite file in tmp_path."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from sqlalchemy.orm import Session

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.events import MAX_REPORTED_VIOLATIONS, encode_page_token
from actionmesh.auditlog.server import start_auditlog
from actionmesh.auditlog.storage import AuditRepository
from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.errors import error_details
from actionmesh.rpc.server import RunningServer
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.v1 import audit_pb2, audit_pb2_grpc, common_pb2

pytestmark = pytest.mark.timeout(60)

STARTED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_STARTED
FINISHED = audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED


def make_event(
    event_id: str,
    *,
    tenant: str = "acme",
    record: tuple[str, str] = ("workitem", "wi-1001"),
    event_type: audit_pb2.AuditEventType.ValueType = FINISHED,
    execution_id: str = "",
    trace_id: str = "",
) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(
        event_id=event_id,
        type=event_type,
        tenant=tenant,
        record=common_pb2.RecordRef(type=record[0], id=record[1]),
        actor="alice",
        action_id="workitem.retry",
        execution_id=execution_id or f"exec-{event_id}",
        trace_id=trace_id,
    )
    event.occurred_at.FromDatetime(datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
    return event


class AuditClient:
    """A started server, a real channel to it and the database file behind it."""

    def __init__(self, running: RunningServer, db_path: Path) -> None:
        self.running = running
        self.db_path = db_path
        self.channel = open_channel(running.address)
        self.stub = audit_pb2_grpc.AuditServiceStub(self.channel)

    async def append(
        self, events: Sequence[audit_pb2.AuditEvent]
    ) -> audit_pb2.AppendEventsResponse:
        return await self.stub.AppendEvents(
            audit_pb2.AppendEventsRequest(events=events), timeout=10
        )

    async def timeline(
        self,
        tenant: str = "acme",
        record: tuple[str, str] = ("workitem", "wi-1001"),
        page_size: int = 0,
        page_token: str = "",
    ) -> audit_pb2.ListTimelineResponse:
        return await self.stub.ListTimeline(
            audit_pb2.ListTimelineRequest(
                tenant=tenant,
                record=common_pb2.RecordRef(type=record[0], id=record[1]),
                page_size=page_size,
                page_token=page_token,
            ),
            timeout=10,
        )

    async def whole_timeline(
        self, tenant: str = "acme", record: tuple[str, str] = ("workitem", "wi-1001")
    ) -> list[audit_pb2.AuditEvent]:
        events: list[audit_pb2.AuditEvent] = []
        token = ""
        while True:
            page = await self.timeline(tenant, record, page_size=500, page_token=token)
            events.extend(page.events)
            token = page.next_page_token
            if not token:
                return events

    def repository(self) -> AuditRepository:
        """A second, independent view of the same database file (what is really stored)."""
        return AuditRepository(make_engine(sqlite_url(self.db_path)))

    async def close(self) -> None:
        await self.channel.close()
        await self.running.stop(0)


async def start(db_path: Path) -> AuditClient:
    running = await start_auditlog(AuditLogConfig(port=0, database_url=sqlite_url(db_path)))
    return AuditClient(running, db_path)


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditClient]:
    client = await start(tmp_path / "audit.db")
    yield client
    await client.close()


def without_sequence(event: audit_pb2.AuditEvent) -> audit_pb2.AuditEvent:
    """The event as sent: without the positions the store assigns (sequence, chain)."""
    copy = audit_pb2.AuditEvent()
    copy.CopyFrom(event)
    for name in ("sequence", "chain_index", "prev_chain_hash", "chain_hash"):
        copy.ClearField(name)  # type: ignore[arg-type]
    return copy


async def test_append_then_timeline_round_trips_every_field_in_store_order(
    audit: AuditClient,
) -> None:
    started = make_event("ev-1", event_type=STARTED, execution_id="exec-7")
    started.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    started.inputs["reason"] = "customer asked"
    started.inputs["priority"] = "2"
    started.policy_ids.extend(["retry-permit", "tenant-guard"])
    started.idempotency_key = "idem-1"
    finished = make_event("ev-2", execution_id="exec-7")
    finished.outcome = common_pb2.OUTCOME_SUCCEEDED
    finished.trace_id = started.trace_id
    finished.span_id = "00f067aa0ba902b7"
    finished.external_ref = "TICKET-42"
    finished.changes.add(field="status", before="failed", after="queued")
    finished.changes.add(field="attempts", before="1", after="2")
    finished.warnings.append("downstream slow")
    finished.started_at.FromDatetime(datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
    finished.finished_at.FromDatetime(datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC))
    # The sender cannot pick its position in the store.
    finished.sequence = 999_999
    other_record = make_event("ev-3", record=("workitem", "wi-2000"))

    reply = await audit.append([started, finished, other_record])
    assert (reply.stored, reply.duplicates) == (3, 0)

    page = await audit.timeline()
    assert page.next_page_token == ""
    assert [e.event_id for e in page.events] == ["ev-1", "ev-2"]
    first, second = page.events
    assert 0 < first.sequence < second.sequence < 999_999
    assert without_sequence(first) == started
    assert without_sequence(second) == without_sequence(finished)
    assert dict(first.inputs) == {"reason": "customer asked", "priority": "2"}
    assert [(c.field, c.before, c.after) for c in second.changes] == [
        ("status", "failed", "queued"),
        ("attempts", "1", "2"),
    ]
    assert second.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert second.outcome == common_pb2.OUTCOME_SUCCEEDED


async def test_duplicates_within_a_batch_and_across_batches_are_counted_not_stored(
    audit: AuditClient,
) -> None:
    first = await audit.append([make_event("a"), make_event("a"), make_event("b")])
    assert (first.stored, first.duplicates) == (2, 1)
    # A retried delivery may differ; the first stored version stays the evidence.
    changed_a = make_event("a")
    changed_a.message = "second delivery"
    second = await audit.append([make_event("b"), changed_a, make_event("c")])
    assert (second.stored, second.duplicates) == (1, 2)
    again = await audit.append([make_event("c")])
    assert (again.stored, again.duplicates) == (0, 1)

    events = await audit.whole_timeline()
    assert [e.event_id for e in events] == ["a", "b", "c"]
    assert events[0].message == ""
    repository = audit.repository()
    try:
        assert repository.count("acme") == 3
        assert repository.count_all() == 3
    finally:
        repository.close()


async def test_empty_batch_is_a_no_op(audit: AuditClient) -> None:
    reply = await audit.append([])
    assert (reply.stored, reply.duplicates) == (0, 0)


async def test_tenants_never_see_each_others_events(audit: AuditClient) -> None:
    trace = "0af7651916cd43dd8448eb211c80319c"
    await audit.append(
        [
            make_event("acme-1", tenant="acme", execution_id="exec-shared", trace_id=trace),
            make_event("globex-1", tenant="globex", execution_id="exec-shared", trace_id=trace),
            make_event("acme-2", tenant="acme", execution_id="exec-shared", trace_id=trace),
        ]
    )

    acme = await audit.whole_timeline(tenant="acme")
    globex = await audit.whole_timeline(tenant="globex")
    assert [e.event_id for e in acme] == ["acme-1", "acme-2"]
    assert [e.event_id for e in globex] == ["globex-1"]
    assert await audit.whole_timeline(tenant="initech") == []

    repository = audit.repository()
    try:
        assert repository.count("acme") == 2
        assert repository.count("globex") == 1
        assert repository.count("acme", record_type="workitem", record_id="wi-1001") == 2
        assert repository.count("acme", execution_id="exec-shared") == 2
        by_execution = repository.list_by_execution("globex", "exec-shared")
        assert [e.event_id for e in by_execution] == ["globex-1"]
        by_trace = repository.list_by_trace("acme", trace)
        assert [e.event_id for e in by_trace] == ["acme-1", "acme-2"]
        assert all(e.sequence > 0 for e in by_trace)
        assert repository.list_by_trace("initech", trace) == []
    finally:
        repository.close()


async def test_pages_are_stable_with_no_gaps_or_duplicates(audit: AuditClient) -> None:
    await audit.append([make_event(f"ev-{i:03d}") for i in range(25)])

    seen: list[str] = []
    sequences: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await audit.timeline(page_size=7, page_token=token)
        pages += 1
        assert len(page.events) <= 7
        seen.extend(e.event_id for e in page.events)
        sequences.extend(e.sequence for e in page.events)
        if pages == 2:
            # Writes between pages land after the reader's position, never inside a read page.
            await audit.append([make_event("late-1"), make_event("late-2")])
        token = page.next_page_token
        if not token:
            break

    assert seen == [f"ev-{i:03d}" for i in range(25)] + ["late-1", "late-2"]
    assert sequences == sorted(set(sequences))
    assert pages == 4

    # The same token read twice gives the same page.
    second_a = await audit.timeline(page_size=7, page_token=encode_page_token(sequences[6]))
    second_b = await audit.timeline(page_size=7, page_token=encode_page_token(sequences[6]))
    assert list(second_a.events) == list(second_b.events)
    assert [e.event_id for e in second_a.events] == seen[7:14]


async def test_page_size_defaults_to_100_and_is_clamped_to_500(audit: AuditClient) -> None:
    await audit.append([make_event(f"ev-{i:04d}") for i in range(600)])

    default_page = await audit.timeline(page_size=0)
    assert len(default_page.events) == 100
    assert default_page.next_page_token

    clamped = await audit.timeline(page_size=10_000)
    assert len(clamped.events) == 500
    rest = await audit.timeline(page_size=10_000, page_token=clamped.next_page_token)
    assert len(rest.events) == 100
    assert rest.next_page_token == ""


async def test_invalid_events_reject_the_whole_batch_with_field_violations(
    audit: AuditClient,
) -> None:
    no_tenant = make_event("e1", tenant="")
    no_record = make_event("e2")
    no_record.ClearField("record")
    no_type = make_event("e3", event_type=audit_pb2.AUDIT_EVENT_TYPE_UNSPECIFIED)
    long_id = make_event("x" * 129, execution_id="exec-long")
    batch = [make_event("valid-0"), no_tenant, make_event(""), no_record, no_type, long_id]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.append(batch)

    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_EVENT"
    assert [v.field for v in details.violations] == [
        "events[1].tenant",
        "events[2].event_id",
        "events[3].record.type",
        "events[3].record.id",
        "events[4].type",
        "events[5].event_id",
    ]
    assert "128" in details.violations[-1].description
    # All or nothing: the valid event of the rejected batch was not stored either.
    assert await audit.whole_timeline() == []


async def test_overlong_action_id_and_actor_are_still_stored_as_evidence(
    audit: AuditClient,
) -> None:
    # The gateway files refused attempts with whatever the caller sent; such evidence
    # must not make its batch unstorable.
    event = make_event("ev-long")
    event.action_id = "a." + "x" * 500
    event.actor = "u" * 1000
    reply = await audit.append([event])
    assert reply.stored == 1
    [stored] = await audit.whole_timeline()
    assert (stored.action_id, stored.actor) == (event.action_id, event.actor)


async def test_a_batch_of_1000_broken_events_still_gives_a_readable_error(
    audit: AuditClient,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.append([make_event(f"e{i}", tenant="") for i in range(1000)])
    details = error_details(caught.value)
    assert details.reason == "INVALID_EVENT"
    assert len(details.violations) == MAX_REPORTED_VIOLATIONS
    assert details.violations[0].field == "events[0].tenant"
    assert "1000 of 1000" in details.message


async def test_more_than_1000_events_are_refused(audit: AuditClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.append([make_event(f"e{i}") for i in range(1001)])
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "TOO_MANY_EVENTS"
    assert [v.field for v in details.violations] == ["events"]
    repository = audit.repository()
    try:
        assert repository.count_all() == 0
    finally:
        repository.close()


async def test_timeline_requires_tenant_and_record(audit: AuditClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.timeline(tenant="", record=("", ""))
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_TIMELINE_REQUEST"
    assert [v.field for v in details.violations] == ["tenant", "record.type", "record.id"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.timeline(tenant="acme", record=("workitem", ""))
    assert [v.field for v in error_details(caught.value).violations] == ["record.id"]


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        base64.urlsafe_b64encode(b"v1:abc").decode(),
        base64.urlsafe_b64encode(b"v1:-5").decode(),
        base64.urlsafe_b64encode(b"v1:0").decode(),
        base64.urlsafe_b64encode(b"v2:10").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "A" * 500,
    ],
)
async def test_malformed_page_token_is_invalid_argument(audit: AuditClient, token: str) -> None:
    await audit.append([make_event("ev-1")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.timeline(page_token=token)
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in details.violations] == ["page_token"]


async def test_events_survive_a_restart_and_dedupe_continues(tmp_path: Path) -> None:
    db_path = tmp_path / "nested" / "audit.db"
    first = await start(db_path)
    try:
        await first.append([make_event("ev-1"), make_event("ev-2")])
        before = await first.whole_timeline()
    finally:
        await first.close()

    second = await start(db_path)
    try:
        assert second.running.port > 0
        after = await second.whole_timeline()
        assert after == before
        reply = await second.append([make_event("ev-2"), make_event("ev-3")])
        assert (reply.stored, reply.duplicates) == (1, 1)
        events = await second.whole_timeline()
        assert [e.event_id for e in events] == ["ev-1", "ev-2", "ev-3"]
        assert events[2].sequence > events[1].sequence
    finally:
        await second.close()


async def test_concurrent_appends_with_overlapping_ids_store_each_id_once(
    audit: AuditClient,
) -> None:
    # Caller k sends ids k..k+9 out of 29: neighbouring callers share nine ids.
    batches = [[make_event(f"ev-{(k + j):02d}") for j in range(10)] for k in range(20)]
    replies = await asyncio.gather(*(audit.append(batch) for batch in batches))

    unique_ids = {e.event_id for batch in batches for e in batch}
    assert sum(r.stored for r in replies) == len(unique_ids) == 29
    assert sum(r.stored + r.duplicates for r in replies) == 200
    events = await audit.whole_timeline()
    assert sorted(e.event_id for e in events) == sorted(unique_ids)
    repository = audit.repository()
    try:
        assert repository.count("acme") == 29
    finally:
        repository.close()


class _RacingRepository(AuditRepository):
    """Lets a rival writer commit the same ids right after this writer checked them."""

    def __init__(
        self, db_path: Path, rival: AuditRepository, rival_events: list[audit_pb2.AuditEvent]
    ) -> None:
        super().__init__(make_engine(sqlite_url(db_path)))
        self._rival = rival
        self._rival_events = rival_events
        self.checks = 0

    def _existing_ids(self, session: Session, ids: Sequence[str]) -> set[str]:  # type: ignore[override]
        found = AuditRepository._existing_ids(session, ids)
        self.checks += 1
        if self.checks == 1:
            self._rival.append(self._rival_events)
        return found


def test_losing_the_unique_id_race_rechecks_and_stores_the_rest(tmp_path: Path) -> None:
    db_path = tmp_path / "audit.db"
    rival = AuditRepository(make_engine(sqlite_url(db_path)))
    rival.create_schema()
    racing = _RacingRepository(db_path, rival, [make_event("b"), make_event("c")])
    try:
        result = racing.append([make_event("a"), make_event("b"), make_event("c")])
        # The first insert hit the rival's rows; the recheck found them and retried.
        assert racing.checks >= 2
        assert (result.stored, result.duplicates) == (1, 2)
        assert sorted(e.event_id for e in rival.timeline("acme", "workitem", "wi-1001")) == [
            "a",
            "b",
            "c",
        ]
        assert rival.count_all() == 3
    finally:
        racing.close()
        rival.close()
