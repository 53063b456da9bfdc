"""Long-running actions in the SDK: ACCEPTED, progress, the stored end, StopExecution,
shutdown, and the declaration checks.

Providers are served with the binaries' start-up code on 127.0.0.1, port 0, and called
over gRPC; handlers are held and released with events, never with sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from actionmesh.conformance import PASS, SampleRecord, failed, run_checks
from actionmesh.rpc.errors import InvalidArgument, error_details
from actionmesh.rpc.server import RunningServer
from actionmesh.sdk import (
    ActionContext,
    Change,
    ExecutionStatus,
    LongRunning,
    NoInputs,
    Provider,
    ProviderConfig,
    ProviderDefinitionError,
    Result,
    start_provider,
)
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(60)

NEVER = provider_pb2.EXECUTION_STATE_NEVER_RECEIVED
RUNNING = provider_pb2.EXECUTION_STATE_RUNNING
FINISHED = provider_pb2.EXECUTION_STATE_FINISHED
LONG = LongRunning(max_duration_s=3600, poll_interval_s=1.0, cancellable=True)


@dataclass
class Gates:
    """What the test handlers wait for and tell."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0
    cleaned_up: list[str] = field(default_factory=list)


def long_provider(dedupe: Any = True) -> tuple[Provider, Gates]:
    gates = Gates()
    provider = Provider("longthings", version="1.0.0", dedupe=dedupe)

    @provider.action("thing.long", record_types=["thing"], long_running=LONG)
    async def long(ctx: ActionContext, inputs: NoInputs) -> Result:
        gates.calls += 1
        ctx.set_external_ref("job-1")
        ctx.report_progress(10, "started the job")
        gates.started.set()
        try:
            await gates.release.wait()
        except asyncio.CancelledError:
            stop = ctx.stop_request
            if stop is None:  # shutdown: do not undo
                raise
            gates.cleaned_up.append(stop.requested_by)
            return Result.cancelled(
                message=f"job withdrawn ({stop.reason})",
                external_ref="job-1",
                changes=[Change("job", None, "withdrawn")],
            )
        return Result.succeeded(external_ref="job-1", changes=[Change("job", None, "done")])

    @provider.action("thing.plain_cancel", record_types=["thing"], long_running=LONG)
    async def plain_cancel(ctx: ActionContext, inputs: NoInputs) -> Result:
        gates.started.set()
        await gates.release.wait()
        return Result.succeeded()

    @provider.action(
        "thing.not_cancellable",
        record_types=["thing"],
        long_running=LongRunning(max_duration_s=60, poll_interval_s=1.0),
    )
    async def not_cancellable(ctx: ActionContext, inputs: NoInputs) -> Result:
        await gates.release.wait()
        return Result.succeeded()

    @provider.action("thing.broken", record_types=["thing"], long_running=LONG)
    async def broken(ctx: ActionContext, inputs: NoInputs) -> Result:
        await gates.release.wait()
        raise RuntimeError("boom")

    @provider.action("thing.refusing", record_types=["thing"], long_running=LONG)
    async def refusing(ctx: ActionContext, inputs: NoInputs) -> Result:
        await gates.release.wait()
        raise InvalidArgument("the job spec is wrong", reason="BAD_JOB")

    @provider.action("thing.short", record_types=["thing"])
    async def short(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded(external_ref="short-1")

    return provider, gates


@dataclass
class Served:
    server: RunningServer
    stub: provider_pb2_grpc.ActionProviderServiceStub
    channel: grpc.aio.Channel


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    started: list[Served] = []

    async def start(provider: Provider, **settings: Any) -> Served:
        config = ProviderConfig(
            port=0, registry="", data_dir=str(tmp_path / provider.id), **settings
        )
        server = await start_provider(provider, config)
        channel = grpc.aio.insecure_channel(server.address)
        served = Served(server, provider_pb2_grpc.ActionProviderServiceStub(channel), channel)
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        await served.channel.close()
        await served.server.stop(1.0)


def execute(action_id: str = "thing.long", key: str = "key-1") -> provider_pb2.ExecuteRequest:
    return provider_pb2.ExecuteRequest(
        action_id=action_id,
        record=common_pb2.RecordContext(tenant="acme", type="thing", id="t-1", status="new"),
        operator=common_pb2.Operator(subject="alice", tenant="acme", roles=["operator"]),
        idempotency_key=key,
        request_id=f"exec-{key}",
    )


def ask(
    action_id: str = "thing.long", key: str = "key-1"
) -> provider_pb2.GetExecutionStatusRequest:
    return provider_pb2.GetExecutionStatusRequest(
        tenant="acme", action_id=action_id, idempotency_key=key, request_id=f"exec-{key}"
    )


def stop(
    action_id: str = "thing.long", key: str = "key-1", tenant: str = "acme"
) -> provider_pb2.StopExecutionRequest:
    return provider_pb2.StopExecutionRequest(
        tenant=tenant,
        action_id=action_id,
        idempotency_key=key,
        request_id=f"exec-{key}",
        requested_by="bob",
        reason="customer withdrew",
    )


async def finished(
    stub: provider_pb2_grpc.ActionProviderServiceStub,
    request: provider_pb2.GetExecutionStatusRequest,
) -> provider_pb2.GetExecutionStatusResponse:
    async def check() -> provider_pb2.GetExecutionStatusResponse | None:
        reply = await stub.GetExecutionStatus(request, timeout=5)
        return reply if reply.state == FINISHED else None

    reply = await eventually(check)
    assert isinstance(reply, provider_pb2.GetExecutionStatusResponse)
    return reply


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# -- declarations ---------------------------------------------------------------------


def test_describe_carries_long_running_and_declarations_are_checked() -> None:
    provider, _ = long_provider()
    descriptor = provider.actions["thing.long"].descriptor()
    assert descriptor.HasField("long_running")
    assert descriptor.long_running == common_pb2.LongRunning(
        max_duration_s=3600, poll_interval_ms=1000, cancellable=True
    )
    assert not provider.actions["thing.short"].descriptor().HasField("long_running")

    async def handler(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    for wrong in (
        LongRunning(max_duration_s=0),
        LongRunning(max_duration_s=-5),
        LongRunning(max_duration_s=30 * 24 * 3600),
        LongRunning(max_duration_s=60, poll_interval_s=0),
        LongRunning(max_duration_s=60, poll_interval_s=120),
    ):
        with pytest.raises(ProviderDefinitionError, match="long_running"):
            provider.action("thing.wrong", record_types=["thing"], long_running=wrong)(handler)
    with pytest.raises(ProviderDefinitionError, match="LongRunning"):
        provider.action("thing.wrong", record_types=["thing"], long_running=60)  # type: ignore[arg-type]

    # Without dedupe and without a status function nobody could tell what became of it.
    stateless = Provider("stateless", dedupe=False)
    with pytest.raises(ProviderDefinitionError, match="dedupe"):
        stateless.action("thing.long", record_types=["thing"], long_running=LONG)(handler)

    @stateless.execution_status
    async def status(tenant: str, action_id: str, key: str) -> ExecutionStatus | None:
        return None

    stateless.action("thing.long", record_types=["thing"], long_running=LONG)(handler)
    assert "thing.long" in stateless.actions


def test_cancelled_results_and_long_running_settings() -> None:
    cancelled = Result.cancelled(message="stopped", changes=[Change("a", "1", "2")])
    assert cancelled.outcome == common_pb2.OUTCOME_CANCELLED
    assert Result.from_proto(cancelled.to_proto()) == cancelled
    with pytest.raises(AttributeError):
        LONG.cancellable = False  # type: ignore[misc]
    assert LongRunning(max_duration_s=60).problems() == []


# -- ACCEPTED, progress, the stored end ------------------------------------------------


async def test_accepted_then_progress_then_finished(serve: Serve) -> None:
    provider, gates = long_provider()
    served = await serve(provider)
    stub = served.stub

    accepted = await stub.Execute(execute(), timeout=5)
    assert accepted.outcome == common_pb2.OUTCOME_ACCEPTED
    assert accepted.message == "accepted; running"
    await asyncio.wait_for(gates.started.wait(), 5)

    running = await stub.GetExecutionStatus(ask(), timeout=5)
    assert running.state == RUNNING
    assert running.progress.message == "started the job"
    assert running.progress.percent == 10

    # A same-key Execute while it runs: ACCEPTED again (with the ref named so far), not
    # run twice and not EXECUTION_IN_PROGRESS.
    again = await stub.Execute(execute(), timeout=5)
    assert (again.outcome, again.external_ref) == (common_pb2.OUTCOME_ACCEPTED, "job-1")
    assert gates.calls == 1

    gates.release.set()
    done = await finished(stub, ask())
    assert done.result.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert done.result.external_ref == "job-1"
    assert [(c.field, c.after) for c in done.result.changes] == [("job", "done")]
    assert done.HasField("finished_at")
    # Once finished, the same key answers the stored final result.
    replay = await stub.Execute(execute(), timeout=5)
    assert replay == done.result
    assert gates.calls == 1
    # Stopping a finished execution is too late.
    assert (await stub.StopExecution(stop(), timeout=5)).state == FINISHED


async def test_a_finished_result_survives_a_restart(serve: Serve) -> None:
    provider, gates = long_provider()
    first = await serve(provider)
    await first.stub.Execute(execute(), timeout=5)
    gates.release.set()
    done = await finished(first.stub, ask())
    await first.channel.close()
    await first.server.stop(1.0)

    second = await serve(provider)
    assert await second.stub.GetExecutionStatus(ask(), timeout=5) == done
    assert await second.stub.Execute(execute(), timeout=5) == done.result
    assert gates.calls == 1


async def test_handler_failures_are_stored_as_final_answers(serve: Serve) -> None:
    provider, gates = long_provider()
    stub = (await serve(provider)).stub
    gates.release.set()

    assert (await stub.Execute(execute("thing.broken"), timeout=5)).outcome == (
        common_pb2.OUTCOME_ACCEPTED
    )
    broken = await finished(stub, ask("thing.broken"))
    assert (broken.result.outcome, broken.result.reason) == (
        common_pb2.OUTCOME_PARTIAL,
        "HANDLER_FAILED",
    )
    assert "boom" not in broken.result.message  # details stay in the provider's logs

    await stub.Execute(execute("thing.refusing"), timeout=5)
    refusing = await finished(stub, ask("thing.refusing"))
    assert (refusing.result.outcome, refusing.result.reason) == (
        common_pb2.OUTCOME_REJECTED,
        "BAD_JOB",
    )
    # Stored: the same key answers it again without running the handler.
    assert await stub.Execute(execute("thing.refusing"), timeout=5) == refusing.result


async def test_a_reused_key_for_another_request_is_refused(serve: Serve) -> None:
    provider, _ = long_provider()
    stub = (await serve(provider)).stub
    await stub.Execute(execute(), timeout=5)
    other = execute()
    other.record.id = "t-2"
    error = await refused(stub.Execute(other, timeout=5))
    assert error_details(error).reason == "IDEMPOTENCY_KEY_REUSED"


# -- StopExecution ------------------------------------------------------------------------


async def test_stop_cancels_and_the_handler_returns_cancelled(serve: Serve) -> None:
    provider, gates = long_provider()
    stub = (await serve(provider)).stub
    await stub.Execute(execute(), timeout=5)
    await asyncio.wait_for(gates.started.wait(), 5)

    assert (await stub.StopExecution(stop(), timeout=5)).state in (RUNNING, FINISHED)
    done = await finished(stub, ask())
    assert done.result.outcome == common_pb2.OUTCOME_CANCELLED
    assert done.result.message == "job withdrawn (customer withdrew)"
    assert [(c.field, c.after) for c in done.result.changes] == [("job", "withdrawn")]
    assert gates.cleaned_up == ["bob"]
    # Idempotent: asking again is asking once (too late now), the answer stays.
    assert (await stub.StopExecution(stop(), timeout=5)).state == FINISHED
    assert gates.cleaned_up == ["bob"]
    assert await stub.GetExecutionStatus(ask(), timeout=5) == done


async def test_a_handler_letting_the_cancel_propagate_is_stored_cancelled(serve: Serve) -> None:
    provider, gates = long_provider()
    stub = (await serve(provider)).stub
    await stub.Execute(execute("thing.plain_cancel"), timeout=5)
    await asyncio.wait_for(gates.started.wait(), 5)
    first = await stub.StopExecution(stop("thing.plain_cancel"), timeout=5)
    second = await stub.StopExecution(stop("thing.plain_cancel"), timeout=5)
    assert first.state in (RUNNING, FINISHED) and second.state in (RUNNING, FINISHED)
    done = await finished(stub, ask("thing.plain_cancel"))
    assert done.result.outcome == common_pb2.OUTCOME_CANCELLED
    assert done.result.message == "cancelled at bob's request: customer withdrew"


async def test_stop_refusals(serve: Serve) -> None:
    provider, _ = long_provider()
    stub = (await serve(provider)).stub
    # Unknown key: nothing to stop.
    assert (await stub.StopExecution(stop(key="never"), timeout=5)).state == NEVER
    for action_id in ("thing.not_cancellable", "thing.short"):
        error = await refused(stub.StopExecution(stop(action_id), timeout=5))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(error).reason == "NOT_CANCELLABLE"
    error = await refused(stub.StopExecution(stop("thing.nope"), timeout=5))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await refused(stub.StopExecution(stop(key=""), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_provider_without_cancellable_actions_does_not_implement_stop(
    serve: Serve,
) -> None:
    provider = Provider("plain", dedupe=True)

    @provider.action("thing.short", record_types=["thing"])
    async def short(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    stub = (await serve(provider)).stub
    error = await refused(stub.StopExecution(stop("thing.short"), timeout=5))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# -- bounds and shutdown ----------------------------------------------------------------


async def test_at_most_n_long_running_executions_at_once(serve: Serve) -> None:
    provider, gates = long_provider()
    stub = (await serve(provider, max_long_running_executions=1)).stub
    await stub.Execute(execute(key="a"), timeout=5)
    error = await refused(stub.Execute(execute(key="b"), timeout=5))
    # Nothing ran: UNAVAILABLE with a retry delay (RESOURCE_EXHAUSTED reads as PARTIAL).
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(error).reason == "TOO_MANY_LONG_RUNNING"
    assert error_details(error).retry_after_s
    # Nothing ran under "b": its key is free once there is room.
    assert (await stub.GetExecutionStatus(ask(key="b"), timeout=5)).state == NEVER
    gates.release.set()
    await finished(stub, ask(key="a"))
    accepted = await stub.Execute(execute(key="b"), timeout=5)
    assert accepted.outcome in (common_pb2.OUTCOME_ACCEPTED, common_pb2.OUTCOME_SUCCEEDED)


async def test_a_task_running_at_shutdown_is_stored_provider_stopped(serve: Serve) -> None:
    provider, gates = long_provider()
    first = await serve(provider, drain_timeout_s=0.2)
    await first.stub.Execute(execute(), timeout=5)
    await asyncio.wait_for(gates.started.wait(), 5)
    await first.channel.close()
    await first.server.stop(1.0)
    # Not a caller's cancel: the handler did not undo its work.
    assert gates.cleaned_up == []

    second = await serve(provider)
    status = await second.stub.GetExecutionStatus(ask(), timeout=5)
    assert status.state == FINISHED
    assert (status.result.outcome, status.result.reason) == (
        common_pb2.OUTCOME_PARTIAL,
        "PROVIDER_STOPPED",
    )
    assert status.result.external_ref == "job-1"


async def test_short_actions_are_unchanged(serve: Serve) -> None:
    provider, _ = long_provider()
    stub = (await serve(provider)).stub
    reply = await stub.Execute(execute("thing.short"), timeout=5)
    assert (reply.outcome, reply.external_ref) == (common_pb2.OUTCOME_SUCCEEDED, "short-1")


# -- the conformance kit --------------------------------------------------------------


async def test_a_long_running_provider_passes_the_kit(serve: Serve) -> None:
    provider, gates = long_provider()
    served = await serve(provider)
    results = await run_checks(
        served.server.address,
        records=[SampleRecord("acme", "thing", "t-1", "new")],
        action="thing.long",
        require_all=True,
    )
    found = {r.name: r for r in results}
    assert not failed(results), [(r.name, r.status, r.detail) for r in results]
    for name in ("long_running.accepted", "long_running.progress", "long_running.stop"):
        assert found[name].status == PASS, found[name]
    assert "ACCEPTED" in found["execute.idempotent"].detail
    assert "CANCELLED" in found["long_running.stop"].detail
    # The kit's stop ended the real execution it started: the handler cleaned up.
    assert gates.cleaned_up == ["actionmesh-conformance"]
