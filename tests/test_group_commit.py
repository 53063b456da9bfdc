"""The gateway store's single writer: groups commit together, failures stay their own."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from actionmesh.gateway.model import RUNNING, ExecutionRecord
from actionmesh.gateway.storage import (
    GatewayStore,
    InsertExecution,
    KeyConflict,
    finish_execution_op,
    record_attempt_op,
)
from actionmesh.gateway.writer import GroupCommitWriter, WriterClosed
from actionmesh.rpc.outcomes import Outcome
from actionmesh.runtime.db import sqlite_url
from actionmesh.v1 import audit_pb2


def execution(key: str) -> ExecutionRecord:
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
        outcome=RUNNING,
        started_at=datetime.now(UTC),
    )


def marker(name: str) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(event_id=uuid.uuid4().hex, message=name)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    store = GatewayStore(sqlite_url(tmp_path / "gateway.db"))
    yield store
    store.close()


def count_commits(store: GatewayStore) -> list[int]:
    commits = [0]

    @event.listens_for(store.engine, "commit")
    def _count(_conn: Any) -> None:
        commits[0] += 1

    return commits


async def test_concurrent_writes_share_transactions_and_all_land(store: GatewayStore) -> None:
    writer = GroupCommitWriter(store)
    writer.start()
    commits = count_commits(store)
    records = [execution(f"k-{i}") for i in range(200)]
    try:
        await asyncio.gather(
            *(writer.write(InsertExecution(r, (marker("started"),))) for r in records)
        )
        records = [r.finished_with(Outcome.SUCCEEDED, at=datetime.now(UTC)) for r in records]
        await asyncio.gather(
            *(writer.write(finish_execution_op(r, [marker("finished")])) for r in records)
        )
    finally:
        await writer.close()
    # 400 writes queued together: far fewer commits than writes.
    assert 0 < commits[0] < 100
    assert store.outbox_depth() == 400
    for record in records[:5] + records[-5:]:
        stored = store.get("acme", record.execution_id)
        assert stored is not None and stored.outcome == "SUCCEEDED"


async def test_a_taken_key_fails_alone_and_its_neighbours_commit(store: GatewayStore) -> None:
    first = execution("taken")
    store.insert_execution(first, [marker("first")])
    writer = GroupCommitWriter(store)
    writer.start()
    duplicate = execution("taken")
    others = [execution(f"free-{i}") for i in range(10)]
    try:
        results = await asyncio.gather(
            *(writer.write(InsertExecution(r, (marker("x"),))) for r in others[:5]),
            writer.write(InsertExecution(duplicate, (marker("dup"),))),
            *(writer.write(InsertExecution(r, (marker("x"),))) for r in others[5:]),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    conflict = results[5]
    assert isinstance(conflict, KeyConflict)
    assert conflict.existing.execution_id == first.execution_id
    assert [r for i, r in enumerate(results) if i != 5] == [None] * 10
    assert all(store.get("acme", r.execution_id) is not None for r in others)
    assert store.get("acme", duplicate.execution_id) is None
    # first + the ten others; the duplicate's event went with its refused row.
    assert store.outbox_depth() == 11


async def test_finishing_an_unknown_execution_is_an_error_for_that_caller(
    store: GatewayStore,
) -> None:
    writer = GroupCommitWriter(store)
    writer.start()
    ghost = execution("ghost")
    try:
        outcome = await asyncio.gather(
            writer.write(finish_execution_op(ghost, [marker("finished")])),
            writer.write(record_attempt_op([marker("refused")])),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert isinstance(outcome[0], LookupError)
    assert outcome[1] is None
    assert store.outbox_depth() == 1


async def test_close_writes_what_is_queued_then_refuses(store: GatewayStore) -> None:
    writer = GroupCommitWriter(store)
    writer.start()
    pending = [
        asyncio.ensure_future(writer.write(record_attempt_op([marker("e")]))) for _ in range(50)
    ]
    await asyncio.sleep(0)
    await writer.close()
    assert all(task.done() and task.exception() is None for task in pending)
    assert store.outbox_depth() == 50
    with pytest.raises(WriterClosed):
        await writer.write(record_attempt_op([marker("late")]))
