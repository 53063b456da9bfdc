"""GetExecutionStatus in the SDK: the stores' lookup, the servicer's answers, the decorator.

Stores are exercised directly (memory, SQLite, the SQLAlchemy store on SQLite and on
PostgreSQL); the RPC against real providers started with the binaries' start-up code
on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from actionmesh.rpc.errors import Unavailable as UnavailableError
from actionmesh.rpc.errors import error_details
from actionmesh.rpc.server import RunningServer
from actionmesh.sdk import (
    ActionContext,
    Change,
    Claim,
    ExecutionState,
    ExecutionStatus,
    IdempotencyKey,
    MemoryIdempotencyStore,
    NoInputs,
    Progress,
    Provider,
    ProviderConfig,
    ProviderDefinitionError,
    RecordView,
    Result,
    SqliteIdempotencyStore,
    start_provider,
)
from actionmesh.sdk.servicer import _fingerprint
from actionmesh.sdk.sqlstore import SqlIdempotencyStore
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc

pytestmark = pytest.mark.timeout(60)

KEY = IdempotencyKey("acme", "thing.do", "key-1")
STALE_S = 300.0
NEVER = provider_pb2.EXECUTION_STATE_NEVER_RECEIVED
RUNNING = provider_pb2.EXECUTION_STATE_RUNNING
FINISHED = provider_pb2.EXECUTION_STATE_FINISHED


# -- the stores ------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "sql-sqlite", "sql-postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Each IdempotencyStore of the SDK (PostgreSQL skips with the reason without one)."""
    kind = request.param
    if kind == "memory":
        yield MemoryIdempotencyStore(stale_claim_s=STALE_S)
        return
    if kind == "sqlite":
        opened: Any = SqliteIdempotencyStore(str(tmp_path / "keys.db"), stale_claim_s=STALE_S)
    elif kind == "sql-sqlite":
        opened = SqlIdempotencyStore.open(
            f"sqlite:///{tmp_path / 'keys.db'}", stale_claim_s=STALE_S
        )
    else:
        url = request.getfixturevalue("postgres_url")
        opened = SqlIdempotencyStore.open(url, stale_claim_s=STALE_S)
    try:
        yield opened
    finally:
        opened.close()


async def test_lookup_follows_a_key_through_claim_and_result(store: Any) -> None:
    assert (await store.lookup(KEY)).status == "absent"
    before = time.time()
    assert await store.claim(KEY, "fp", "owner-1") == Claim("claimed")
    running = await store.lookup(KEY)
    assert running.status == "running" and running.response is None
    assert running.claimed_at is not None and running.claimed_at >= before - 1

    await store.complete(KEY, "owner-1", b"answer")
    done = await store.lookup(KEY)
    assert (done.status, done.response) == ("done", b"answer")
    assert done.completed_at is not None and done.completed_at >= running.claimed_at
    # Read-only and stable: asking again changes nothing, and the key still dedupes.
    assert await store.lookup(KEY) == done
    assert await store.claim(KEY, "fp", "owner-2") == Claim("done", b"answer")

    # The key is (tenant, action, key): another tenant or action holds nothing.
    assert (await store.lookup(IdempotencyKey("globex", KEY.action_id, KEY.key))).status == (
        "absent"
    )
    assert (await store.lookup(IdempotencyKey(KEY.tenant, "thing.other", KEY.key))).status == (
        "absent"
    )


async def test_a_released_claim_is_absent(store: Any) -> None:
    await store.claim(KEY, "fp", "owner-1")
    await store.release(KEY, "owner-1")
    assert (await store.lookup(KEY)).status == "absent"


async def test_a_stale_claim_is_abandoned_and_the_next_claim_takes_it(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.claim(KEY, "fp", "crashed-owner")
    real_time = time.time
    # Later than the stale-claim window: the owner never completed nor released.
    monkeypatch.setattr(time, "time", lambda: real_time() + STALE_S + 60)
    abandoned = await store.lookup(KEY)
    assert abandoned.status == "abandoned" and abandoned.response is None
    assert await store.lookup(KEY) == abandoned  # the lookup took nothing over
    # What the status promises (NEVER_RECEIVED: an Execute would run now) is what the
    # next claim does.
    assert await store.claim(KEY, "fp", "owner-2") == Claim("claimed")
    assert (await store.lookup(KEY)).status == "running"


# -- the RPC ---------------------------------------------------------------------------


@dataclass
class Things:
    """What the test provider's handlers do and saw."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    fail_next: bool = False
    runs: int = 0


def things_provider(dedupe: Any = True) -> tuple[Provider, Things]:
    seen = Things()
    provider = Provider("things", version="1.0.0", dedupe=dedupe)

    @provider.action("thing.do", record_types=["thing"])
    async def do(ctx: ActionContext, inputs: NoInputs) -> Result:
        seen.runs += 1
        if seen.fail_next:
            seen.fail_next = False
            raise RuntimeError("downstream broke")
        return Result.succeeded(
            external_ref=f"done-{seen.runs}",
            changes=[Change("state", "new", "done"), Change("note", None, "x")],
            warnings=["slow"],
            message="did it",
        )

    @provider.action("thing.slow", record_types=["thing"])
    async def slow(ctx: ActionContext, inputs: NoInputs) -> Result:
        ctx.report_progress(40, "halfway")
        seen.started.set()
        await seen.gate.wait()
        return Result.succeeded(external_ref="slow-1")

    @provider.action("thing.quiet", record_types=["thing"])
    async def quiet(ctx: ActionContext, inputs: NoInputs) -> Result:
        seen.started.set()
        await seen.gate.wait()
        return Result.succeeded(external_ref="quiet-1")

    @provider.action("thing.refuse", record_types=["thing"])
    async def refuse(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.rejected("NOT_ELIGIBLE", "no")

    @provider.action("thing.half", record_types=["thing"])
    async def half(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.partial(reason="WRITE_BACK_FAILED", external_ref="ext-1")

    return provider, seen


@dataclass
class Served:
    server: RunningServer
    stub: provider_pb2_grpc.ActionProviderServiceStub
    config: ProviderConfig


Serve = Callable[[Provider], Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    started: list[tuple[RunningServer, grpc.aio.Channel]] = []

    async def start(provider: Provider) -> Served:
        config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path / provider.id))
        server = await start_provider(provider, config)
        channel = grpc.aio.insecure_channel(server.address)
        started.append((server, channel))
        return Served(server, provider_pb2_grpc.ActionProviderServiceStub(channel), config)

    yield start
    for server, channel in reversed(started):
        await channel.close()
        await server.stop(1.0)


def execute(action_id: str = "thing.do", key: str = "key-1", tenant: str = "acme") -> Any:
    return provider_pb2.ExecuteRequest(
        action_id=action_id,
        record=common_pb2.RecordContext(tenant=tenant, type="thing", id="t-1", status="new"),
        operator=common_pb2.Operator(subject="alice", tenant=tenant, roles=["operator"]),
        idempotency_key=key,
        request_id=f"exec-{key}",
    )


def ask(
    action_id: str = "thing.do", key: str = "key-1", tenant: str = "acme"
) -> provider_pb2.GetExecutionStatusRequest:
    return provider_pb2.GetExecutionStatusRequest(
        tenant=tenant, action_id=action_id, idempotency_key=key, request_id=f"exec-{key}"
    )


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_dedupe_provider_answers_never_received_then_finished(serve: Serve) -> None:
    provider, _ = things_provider()
    served = await serve(provider)
    stub = served.stub
    unknown = await stub.GetExecutionStatus(ask(), timeout=5)
    assert unknown.state == NEVER
    assert not unknown.HasField("result") and not unknown.HasField("progress")

    before = datetime.now(UTC)
    answer = await stub.Execute(execute(), timeout=5)
    status = await stub.GetExecutionStatus(ask(), timeout=5)
    assert status.state == FINISHED
    # The very answer Execute gave: outcome, reason, ref, changes, message, warnings.
    assert status.result == answer
    assert status.finished_at.ToDatetime(tzinfo=UTC) >= before.replace(microsecond=0)
    assert not status.HasField("progress")
    assert await stub.GetExecutionStatus(ask(), timeout=5) == status  # stable
    # Asking changed nothing: the key still returns the stored answer and acts once.
    assert await stub.Execute(execute(), timeout=5) == answer

    # Another tenant's key, and the key under another action, were never received.
    for other in (ask(tenant="globex"), ask(action_id="thing.refuse")):
        assert (await stub.GetExecutionStatus(other, timeout=5)).state == NEVER

    for action_id, outcome, reason in (
        ("thing.refuse", common_pb2.OUTCOME_REJECTED, "NOT_ELIGIBLE"),
        ("thing.half", common_pb2.OUTCOME_PARTIAL, "WRITE_BACK_FAILED"),
    ):
        reply = await stub.Execute(execute(action_id, key="key-2"), timeout=5)
        found = await stub.GetExecutionStatus(ask(action_id, key="key-2"), timeout=5)
        assert (found.state, found.result) == (FINISHED, reply)
        assert (found.result.outcome, found.result.reason) == (outcome, reason)


async def test_a_running_execution_is_running_with_its_progress(serve: Serve) -> None:
    provider, seen = things_provider()
    served = await serve(provider)
    stub = served.stub
    call = asyncio.ensure_future(stub.Execute(execute("thing.slow"), timeout=10))
    await asyncio.wait_for(seen.started.wait(), 5)
    running = await stub.GetExecutionStatus(ask("thing.slow"), timeout=5)
    assert running.state == RUNNING and not running.HasField("result")
    assert running.progress.HasField("percent") and running.progress.percent == 40
    assert running.progress.message == "halfway"
    assert running.progress.HasField("updated_at")
    seen.gate.set()
    answer = await call
    finished = await stub.GetExecutionStatus(ask("thing.slow"), timeout=5)
    assert (finished.state, finished.result) == (FINISHED, answer)


async def test_without_progress_reports_running_says_since_when(serve: Serve) -> None:
    provider, seen = things_provider()
    served = await serve(provider)
    call = asyncio.ensure_future(served.stub.Execute(execute("thing.quiet"), timeout=10))
    await asyncio.wait_for(seen.started.wait(), 5)
    running = await served.stub.GetExecutionStatus(ask("thing.quiet"), timeout=5)
    assert running.state == RUNNING
    assert not running.progress.HasField("percent")
    assert running.progress.HasField("updated_at")
    seen.gate.set()
    await call


async def test_a_failed_execution_kept_nothing_and_is_never_received(serve: Serve) -> None:
    provider, seen = things_provider()
    served = await serve(provider)
    seen.fail_next = True
    error = await refused(served.stub.Execute(execute(), timeout=5))
    assert error_details(error).reason == "HANDLER_FAILED"
    # The claim was released: the status says what the next Execute does (run again).
    assert (await served.stub.GetExecutionStatus(ask(), timeout=5)).state == NEVER
    await served.stub.Execute(execute(), timeout=5)
    assert seen.runs == 2
    assert (await served.stub.GetExecutionStatus(ask(), timeout=5)).state == FINISHED


def leave_claim(config: ProviderConfig, key: str, claimed_at: float) -> None:
    """A claim another process left in the provider's store (it is running, or crashed)
    for the same request as ``execute(key=key)``."""
    fingerprint = _fingerprint(RecordView.from_proto(execute(key=key).record), {})
    path = config.database_url_for("things").removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO actionmesh_idempotency (tenant, action_id, idempotency_key,"
            " fingerprint, owner, claimed_at) VALUES (?, ?, ?, ?, ?, ?)",
            ("acme", "thing.do", key, fingerprint, "another-process", claimed_at),
        )


async def test_claims_of_other_processes_running_or_crashed(serve: Serve) -> None:
    provider, seen = things_provider()
    served = await serve(provider)
    leave_claim(served.config, "live", time.time())
    leave_claim(served.config, "crashed", time.time() - 3600)

    live = await served.stub.GetExecutionStatus(ask(key="live"), timeout=5)
    assert live.state == RUNNING and live.progress.HasField("updated_at")
    # The crashed process's claim is stale: the next Execute takes it over and runs the
    # handler (which re-checks its own state), so it was never received as far as the
    # provider can answer for.
    crashed = await served.stub.GetExecutionStatus(ask(key="crashed"), timeout=5)
    assert crashed.state == NEVER
    answer = await served.stub.Execute(execute(key="crashed"), timeout=5)
    assert seen.runs == 1 and answer.outcome == common_pb2.OUTCOME_SUCCEEDED
    again = await served.stub.GetExecutionStatus(ask(key="crashed"), timeout=5)
    assert (again.state, again.result) == (FINISHED, answer)


async def test_without_dedupe_it_is_unimplemented(serve: Serve) -> None:
    provider, _ = things_provider(dedupe=False)
    served = await serve(provider)
    await served.stub.Execute(execute(), timeout=5)
    error = await refused(served.stub.GetExecutionStatus(ask(), timeout=5))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    details = error_details(error)
    assert details.reason == "EXECUTION_STATUS_NOT_KEPT"
    assert "keeps no record of its executions" in details.message


class OldStore:
    """A provider's own store written before lookup existed: it still dedupes."""

    def __init__(self) -> None:
        self.inner = MemoryIdempotencyStore()

    async def claim(self, key: IdempotencyKey, fingerprint: str, owner: str) -> Claim:
        return await self.inner.claim(key, fingerprint, owner)

    async def complete(self, key: IdempotencyKey, owner: str, response: bytes) -> None:
        await self.inner.complete(key, owner, response)

    async def release(self, key: IdempotencyKey, owner: str) -> None:
        await self.inner.release(key, owner)


async def test_a_store_without_lookup_is_unimplemented_and_a_memory_store_answers(
    serve: Serve,
) -> None:
    old, _ = things_provider(dedupe=OldStore())
    served = await serve(old)
    error = await refused(served.stub.GetExecutionStatus(ask(), timeout=5))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED

    memory, _ = things_provider(dedupe=MemoryIdempotencyStore())
    memory.id = "memthings"
    served = await serve(memory)
    answer = await served.stub.Execute(execute(), timeout=5)
    status = await served.stub.GetExecutionStatus(ask(), timeout=5)
    assert (status.state, status.result) == (FINISHED, answer)


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (ask(key=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        (ask(key="k" * 257), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        (ask(tenant=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        (ask(tenant="a c"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
        (ask(action_id="thing.nope"), grpc.StatusCode.NOT_FOUND, "UNKNOWN_ACTION"),
    ],
    ids=["no-key", "long-key", "no-tenant", "bad-tenant", "unknown-action"],
)
async def test_bad_status_requests_are_refused(
    serve: Serve, request_: Any, code: grpc.StatusCode, reason: str
) -> None:
    provider, _ = things_provider()
    served = await serve(provider)
    error = await refused(served.stub.GetExecutionStatus(request_, timeout=5))
    assert (error.code(), error_details(error).reason) == (code, reason)


# -- @provider.execution_status ----------------------------------------------------------


async def test_a_status_function_answers_for_a_provider_without_dedupe(serve: Serve) -> None:
    provider, _ = things_provider(dedupe=False)
    # What an external system knows, by (tenant, action, key).
    known = {
        ("acme", "thing.do", "ext-done"): ExecutionStatus.finished(
            Result.succeeded(external_ref="EXT-1", changes=[Change("state", "a", "b")]),
            finished_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        ),
        ("acme", "thing.do", "ext-busy"): ExecutionStatus.running(percent=10, message="queued"),
    }
    asked: list[tuple[str, str, str]] = []

    @provider.execution_status
    async def status(tenant: str, action_id: str, key: str) -> ExecutionStatus | None:
        asked.append((tenant, action_id, key))
        return known.get((tenant, action_id, key))

    served = await serve(provider)
    done = await served.stub.GetExecutionStatus(ask(key="ext-done"), timeout=5)
    assert done.state == FINISHED
    assert (done.result.outcome, done.result.external_ref) == (
        common_pb2.OUTCOME_SUCCEEDED,
        "EXT-1",
    )
    assert [(c.field, c.before, c.after) for c in done.result.changes] == [("state", "a", "b")]
    assert done.finished_at.ToDatetime(tzinfo=UTC) == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    busy = await served.stub.GetExecutionStatus(ask(key="ext-busy"), timeout=5)
    assert (busy.state, busy.progress.percent, busy.progress.message) == (RUNNING, 10, "queued")
    # None: nothing to add, and without a store that is NEVER_RECEIVED.
    unknown = await served.stub.GetExecutionStatus(ask(key="other"), timeout=5)
    assert unknown.state == NEVER
    assert asked == [
        ("acme", "thing.do", "ext-done"),
        ("acme", "thing.do", "ext-busy"),
        ("acme", "thing.do", "other"),
    ]


async def test_a_status_function_gets_the_stored_status_to_improve_on(serve: Serve) -> None:
    provider, _ = things_provider(dedupe=True)
    seen: list[ExecutionStatus] = []

    @provider.execution_status
    async def status(
        tenant: str, action_id: str, key: str, stored: ExecutionStatus
    ) -> ExecutionStatus | None:
        seen.append(stored)
        if stored.result is not None and stored.result.reason == "WRITE_BACK_FAILED":
            return ExecutionStatus.finished(Result.succeeded(external_ref="ext-1"))
        return None

    served = await serve(provider)
    answer = await served.stub.Execute(execute(), timeout=5)
    kept = await served.stub.GetExecutionStatus(ask(), timeout=5)
    assert (kept.state, kept.result) == (FINISHED, answer)
    await served.stub.Execute(execute("thing.half"), timeout=5)
    resolved = await served.stub.GetExecutionStatus(ask("thing.half"), timeout=5)
    assert (resolved.result.outcome, resolved.result.reason) == (common_pb2.OUTCOME_SUCCEEDED, "")
    assert [s.state for s in seen] == [ExecutionState.FINISHED, ExecutionState.FINISHED]
    assert seen[0].result == Result.from_proto(answer)
    assert seen[0].finished_at is not None and seen[0].finished_at.tzinfo is not None


async def test_a_failing_status_function_is_refused_with_its_status(serve: Serve) -> None:
    provider, _ = things_provider(dedupe=False)

    @provider.execution_status
    async def status(tenant: str, action_id: str, key: str) -> ExecutionStatus | None:
        if key == "down":
            raise UnavailableError(
                "the system of record is down", reason="DOWNSTREAM_UNAVAILABLE", retry_after_s=2
            )
        if key == "weird":
            return "finished"  # type: ignore[return-value]
        raise RuntimeError("secret detail")

    served = await serve(provider)
    down = await refused(served.stub.GetExecutionStatus(ask(key="down"), timeout=5))
    assert down.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(down).reason == "DOWNSTREAM_UNAVAILABLE"
    for key in ("weird", "boom"):
        error = await refused(served.stub.GetExecutionStatus(ask(key=key), timeout=5))
        assert error.code() == grpc.StatusCode.INTERNAL
        details = error_details(error)
        assert details.reason == "STATUS_FUNCTION_FAILED" and "secret" not in details.message


def test_status_functions_are_checked_when_declared() -> None:
    provider = Provider("checked", dedupe=True)

    def sync(tenant: str, action_id: str, key: str) -> ExecutionStatus | None:
        return None

    async def two(tenant: str, action_id: str) -> ExecutionStatus | None:
        return None

    async def five(a: str, b: str, c: str, d: ExecutionStatus, e: str) -> ExecutionStatus | None:
        return None

    async def defaulted(a: str, b: str, c: str = "") -> ExecutionStatus | None:
        return None

    with pytest.raises(ProviderDefinitionError, match="must be an async def"):
        provider.execution_status(sync)  # type: ignore[type-var]
    for bad in (two, five, defaulted):
        with pytest.raises(ProviderDefinitionError, match="must take"):
            provider.execution_status(bad)

    async def fine(tenant: str, action_id: str, key: str) -> ExecutionStatus | None:
        return None

    assert provider.execution_status(fine) is fine
    assert provider.status_function is fine and not provider.status_takes_stored
    with pytest.raises(ProviderDefinitionError, match="declared twice"):
        provider.execution_status(fine)


def test_execution_status_values_are_checked() -> None:
    done = Result.succeeded(external_ref="x")
    with pytest.raises(ValueError, match="FINISHED status carries its Result"):
        ExecutionStatus(ExecutionState.FINISHED)
    with pytest.raises(ValueError, match="FINISHED status carries its Result"):
        ExecutionStatus(ExecutionState.RUNNING, result=done)
    with pytest.raises(ValueError, match="only a RUNNING status carries Progress"):
        ExecutionStatus(ExecutionState.NEVER_RECEIVED, progress=Progress())
    with pytest.raises(ValueError, match="percent"):
        ExecutionStatus.running(percent=101)
    with pytest.raises(ValueError, match="percent"):
        ExecutionStatus.running(percent=True)
    with pytest.raises(ValueError, match="timezone-aware"):
        ExecutionStatus.finished(done, finished_at=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="only a FINISHED status has finished_at"):
        ExecutionStatus(ExecutionState.NEVER_RECEIVED, finished_at=datetime.now(UTC))
    reply = ExecutionStatus.running(percent=0, message="queued").to_proto()
    assert reply.progress.HasField("percent") and reply.progress.percent == 0
    assert not ExecutionStatus.running().to_proto().progress.HasField("percent")
    partial = Result.partial(
        reason="X_FAILED", external_ref="r", changes=[Change("a", None, 3)], warnings=["w"]
    )
    assert Result.from_proto(partial.to_proto()).to_proto() == partial.to_proto()
