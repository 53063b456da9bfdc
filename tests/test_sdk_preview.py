"""Previews (dry runs) in the SDK: ``@provider.preview``'s declaration checks, the Preview
RPC, and Execute approved on a preview (``preview_digest``) checked under the key's claim.

Providers are served with the binaries' start-up code on 127.0.0.1, port 0, and called
over gRPC; a long-running handler is held with an event, never with sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio
import pytest

from actionmesh.rpc.errors import error_details
from actionmesh.rpc.server import RunningServer
from actionmesh.sdk import (
    ActionContext,
    Change,
    LongRunning,
    NoInputs,
    Preview,
    PreviewContext,
    Provider,
    ProviderConfig,
    ProviderDefinitionError,
    Result,
    start_provider,
)
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(60)

STALE = "STATE_CHANGED_SINCE_PREVIEW"
LONG = LongRunning(max_duration_s=600, poll_interval_s=1.0, cancellable=True)


@dataclass(frozen=True)
class LevelInputs:
    level: Literal["low", "high", "critical"]


@dataclass(frozen=True)
class OtherInputs:
    level: str


@dataclass
class Thing:
    """The provider's own state, and what its handlers and previews saw."""

    level: str = "low"
    version: int = 1
    digests: list[str] = field(default_factory=list)
    runs: int = 0
    previews: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def set(self, level: str) -> Change:
        change = Change("level", self.level, level)
        self.level, self.version = level, self.version + 1
        return change

    def preview(self, inputs: LevelInputs) -> Preview:
        self.previews += 1
        if inputs.level == self.level:
            return Preview.rejected("NO_CHANGE", f"the level is {self.level} already")
        warnings = ["critical pages the on-call team"] if inputs.level == "critical" else []
        return Preview.of(
            digest=f"v{self.version}",
            changes=[Change("level", self.level, inputs.level)],
            effect=f"sets the level from {self.level} to {inputs.level}",
            warnings=warnings,
        )


def build(dedupe: Any = True, *, long_running: bool = True) -> tuple[Provider, Thing]:
    thing = Thing()
    provider = Provider("previewing", version="1.0.0", dedupe=dedupe)

    @provider.action("thing.set_level", record_types=["thing"])
    async def set_level(ctx: ActionContext, inputs: LevelInputs) -> Result:
        thing.runs += 1
        thing.digests.append(ctx.preview_digest)
        if inputs.level == thing.level:
            return Result.rejected("NO_CHANGE", "already")
        return Result.succeeded(changes=[thing.set(inputs.level)])

    @provider.preview("thing.set_level")
    async def preview_level(ctx: PreviewContext, inputs: LevelInputs) -> Preview:
        assert ctx.action_id == "thing.set_level" and ctx.tenant == ctx.record.tenant
        return thing.preview(inputs)

    @provider.action("thing.plain", record_types=["thing"])
    async def plain(ctx: ActionContext, inputs: NoInputs) -> Result:
        thing.runs += 1
        return Result.succeeded()

    @provider.action("thing.boom", record_types=["thing"])
    async def boom(ctx: ActionContext, inputs: NoInputs) -> Result:
        thing.runs += 1
        return Result.succeeded()

    @provider.preview("thing.boom")
    async def preview_boom(ctx: PreviewContext, inputs: NoInputs) -> Preview:
        raise RuntimeError("the preview broke")

    @provider.action("thing.odd", record_types=["thing"])
    async def odd(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    @provider.preview("thing.odd")
    async def preview_odd(ctx: PreviewContext, inputs: NoInputs) -> Any:
        return Result.succeeded()  # not a Preview

    if not long_running:
        return provider, thing

    @provider.action("thing.long_level", record_types=["thing"], long_running=LONG)
    async def long_level(ctx: ActionContext, inputs: LevelInputs) -> Result:
        thing.runs += 1
        thing.digests.append(ctx.preview_digest)
        await thing.release.wait()
        return Result.succeeded(changes=[thing.set(inputs.level)])

    @provider.preview("thing.long_level")
    async def preview_long(ctx: PreviewContext, inputs: LevelInputs) -> Preview:
        return thing.preview(inputs)

    return provider, thing


@dataclass
class Served:
    server: RunningServer
    stub: provider_pb2_grpc.ActionProviderServiceStub
    channel: grpc.aio.Channel


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    started: list[Served] = []

    async def start(provider: Provider) -> Served:
        config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path / provider.id))
        server = await start_provider(provider, config)
        channel = grpc.aio.insecure_channel(server.address)
        served = Served(server, provider_pb2_grpc.ActionProviderServiceStub(channel), channel)
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        await served.channel.close()
        await served.server.stop(1.0)


def record(tenant: str = "acme", record_type: str = "thing") -> common_pb2.RecordContext:
    return common_pb2.RecordContext(tenant=tenant, type=record_type, id="t-1", status="open")


OPERATOR = common_pb2.Operator(subject="alice", tenant="acme", roles=["operator"])


def level(value: str) -> dict[str, common_pb2.InputValue]:
    return {"level": common_pb2.InputValue(string_value=value)}


def preview(
    action_id: str = "thing.set_level",
    inputs: dict[str, common_pb2.InputValue] | None = None,
    *,
    rec: common_pb2.RecordContext | None = None,
) -> provider_pb2.PreviewRequest:
    if inputs is None:
        inputs = level("high") if "level" in action_id else {}
    return provider_pb2.PreviewRequest(
        action_id=action_id, record=rec or record(), operator=OPERATOR, inputs=inputs
    )


def execute(
    action_id: str = "thing.set_level",
    *,
    key: str = "key-1",
    digest: str = "",
    inputs: dict[str, common_pb2.InputValue] | None = None,
) -> provider_pb2.ExecuteRequest:
    if inputs is None:
        inputs = level("high") if "level" in action_id else {}
    return provider_pb2.ExecuteRequest(
        action_id=action_id,
        record=record(),
        operator=OPERATOR,
        inputs=inputs,
        idempotency_key=key,
        request_id=f"exec-{key}",
        preview_digest=digest,
    )


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    return details.code, details.reason


def changes_of(
    reply: provider_pb2.PreviewResponse | provider_pb2.ExecuteResponse,
) -> list[tuple[str, str, str]]:
    return [(c.field, c.before, c.after) for c in reply.changes]


# -- declarations -------------------------------------------------------------------


def test_a_preview_is_checked_when_declared() -> None:
    provider, _ = build()

    async def fine(ctx: PreviewContext, inputs: NoInputs) -> Preview:
        return Preview.of(digest="d")

    with pytest.raises(ProviderDefinitionError, match="declare the action first"):
        provider.preview("thing.undeclared")
    with pytest.raises(ProviderDefinitionError, match="declared twice"):
        provider.preview("thing.set_level")(fine)

    @provider.action("thing.fresh", record_types=["thing"])
    async def fresh(ctx: ActionContext, inputs: LevelInputs) -> Result:
        return Result.succeeded()

    def not_async(ctx: PreviewContext, inputs: LevelInputs) -> Preview:
        return Preview.of(digest="d")

    async def one_arg(ctx: PreviewContext) -> Preview:
        return Preview.of(digest="d")

    async def three_args(ctx: PreviewContext, inputs: LevelInputs, extra: int) -> Preview:
        return Preview.of(digest="d")

    async def other_inputs(ctx: PreviewContext, inputs: OtherInputs) -> Preview:
        return Preview.of(digest="d")

    with pytest.raises(ProviderDefinitionError, match="async def"):
        provider.preview("thing.fresh")(not_async)  # type: ignore[type-var]
    for wrong in (one_arg, three_args):
        with pytest.raises(ProviderDefinitionError, match=r"exactly \(ctx, inputs\)"):
            provider.preview("thing.fresh")(wrong)
    with pytest.raises(ProviderDefinitionError, match=r"OtherInputs.*LevelInputs"):
        provider.preview("thing.fresh")(other_inputs)
    assert provider.actions["thing.fresh"].preview is None

    async def right(ctx: PreviewContext, inputs: LevelInputs) -> Preview:
        return Preview.of(digest="d")

    # Returned untouched, still callable directly.
    assert provider.preview("thing.fresh")(right) is right
    assert provider.actions["thing.fresh"].preview is right
    with pytest.raises(ProviderDefinitionError, match="declared twice"):
        provider.preview("thing.fresh")(right)


def test_preview_values_check_themselves() -> None:
    with pytest.raises(ValueError, match="digest is required"):
        Preview.of(digest="")
    with pytest.raises(ValueError, match="digest is required"):
        Preview.of(digest="   ")
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        Preview.rejected("not a reason")
    with pytest.raises(ValueError, match="digest must be at most"):
        Preview.of(digest="x" * 10_000)
    rejected = Preview.rejected("NO_CHANGE", "already")
    assert rejected.refused and not Preview.of(digest="v1").refused
    answer = Preview.of(
        digest="v1", changes=[Change("level", "low", "high")], effect="e", warnings=["w"]
    ).to_proto()
    assert (answer.state_digest, answer.effect, list(answer.warnings)) == ("v1", "e", ["w"])
    assert changes_of(answer) == [("level", "low", "high")]


def test_the_descriptor_says_which_actions_are_previewable() -> None:
    provider, _ = build()
    flags = {a.action_id: a.descriptor().previewable for a in provider.actions.values()}
    assert flags == {
        "thing.set_level": True,
        "thing.plain": False,
        "thing.boom": True,
        "thing.odd": True,
        "thing.long_level": True,
    }


# -- the Preview RPC ------------------------------------------------------------------


async def test_preview_answers_what_execute_would_change(serve: Serve) -> None:
    provider, thing = build()
    served = await serve(provider)
    described = await served.stub.Describe(provider_pb2.DescribeRequest(), timeout=5)
    assert {a.action_id for a in described.actions if a.previewable} == {
        "thing.set_level",
        "thing.boom",
        "thing.odd",
        "thing.long_level",
    }

    reply = await served.stub.Preview(preview(inputs=level("critical")), timeout=5)
    assert changes_of(reply) == [("level", "low", "critical")]
    assert reply.effect == "sets the level from low to critical"
    assert list(reply.warnings) == ["critical pages the on-call team"]
    assert reply.state_digest == "v1"
    assert (thing.runs, thing.level, thing.version) == (0, "low", 1)  # nothing ran

    assert await refused(served.stub.Preview(preview("thing.plain"), timeout=5)) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "PREVIEW_NOT_SUPPORTED",
    )
    assert await refused(served.stub.Preview(preview("thing.nope"), timeout=5)) == (
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_ACTION",
    )


async def test_a_refusing_preview_is_failed_precondition_with_its_reason(serve: Serve) -> None:
    provider, _ = build()
    served = await serve(provider)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Preview(preview(inputs=level("low")), timeout=5)
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_CHANGE")
    assert details.message == "the level is low already"


async def test_a_preview_request_is_checked_like_execute(serve: Serve) -> None:
    provider, thing = build()
    served = await serve(provider)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Preview(preview(inputs=level("medium")), timeout=5)
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert [v.field for v in details.violations] == ["inputs.level"]
    assert await refused(
        served.stub.Preview(preview(rec=record(record_type="gadget")), timeout=5)
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "RECORD_TYPE_NOT_SUPPORTED")
    assert await refused(served.stub.Preview(preview(rec=record(tenant="globex")), timeout=5)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "TENANT_MISMATCH",
    )
    assert thing.previews == 0  # refused before the preview function


async def test_a_failing_preview_is_internal(serve: Serve) -> None:
    provider, _ = build()
    served = await serve(provider)
    for action_id in ("thing.boom", "thing.odd"):
        code, reason = await refused(served.stub.Preview(preview(action_id), timeout=5))
        assert (code, reason) == (grpc.StatusCode.INTERNAL, "PREVIEW_FAILED"), action_id
    # The server keeps serving.
    assert (await served.stub.Preview(preview(), timeout=5)).state_digest == "v1"


# -- Execute approved on a preview --------------------------------------------------


async def test_an_execute_on_a_current_preview_runs_the_handler(serve: Serve) -> None:
    provider, thing = build()
    served = await serve(provider)
    shown = await served.stub.Preview(preview(), timeout=5)
    reply = await served.stub.Execute(execute(digest=shown.state_digest), timeout=5)
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert changes_of(reply) == changes_of(shown)
    assert thing.digests == ["v1"]  # the handler saw the digest it was approved on

    # A repeated key answers the stored result: no new check (the state moved because
    # the execution itself ran), no second run.
    again = await served.stub.Execute(execute(digest=shown.state_digest), timeout=5)
    assert again == reply
    assert thing.runs == 1

    # Without a digest the handler runs as ever, with ctx.preview_digest empty.
    plain = await served.stub.Execute(execute(key="key-2", inputs=level("low")), timeout=5)
    assert plain.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert thing.digests == ["v1", ""]


async def test_an_execute_on_a_stale_preview_is_rejected_and_nothing_runs(serve: Serve) -> None:
    provider, thing = build()
    served = await serve(provider)
    shown = await served.stub.Preview(preview(), timeout=5)
    thing.set("critical")  # the state moves on after the approval (v2)

    reply = await served.stub.Execute(execute(digest=shown.state_digest), timeout=5)
    assert (reply.outcome, reply.reason) == (common_pb2.OUTCOME_REJECTED, STALE)
    assert thing.runs == 0
    # Stored under the key like any result.
    assert await served.stub.Execute(execute(digest=shown.state_digest), timeout=5) == reply
    status = await served.stub.GetExecutionStatus(
        provider_pb2.GetExecutionStatusRequest(
            tenant="acme", action_id="thing.set_level", idempotency_key="key-1"
        ),
        timeout=5,
    )
    assert status.state == provider_pb2.EXECUTION_STATE_FINISHED
    assert status.result == reply

    # The preview now refuses (the level is what was asked for): the state changed too.
    thing.set("high")
    now = await served.stub.Execute(execute(key="key-2", digest="v3"), timeout=5)
    assert (now.outcome, now.reason) == (common_pb2.OUTCOME_REJECTED, STALE)
    assert "NO_CHANGE" in now.message or "already" in now.message
    assert thing.runs == 0

    # An action without a preview cannot be checked: refused, not run blind.
    blind = await served.stub.Execute(execute("thing.plain", key="key-3", digest="v1"), timeout=5)
    assert (blind.outcome, blind.reason) == (common_pb2.OUTCOME_REJECTED, "PREVIEW_NOT_VERIFIABLE")
    assert thing.runs == 0

    # A preview that fails cannot be checked either: UNAVAILABLE (nothing ran; not
    # INTERNAL, which a caller reads as "may have acted"), and the key is released.
    failing = execute("thing.boom", key="key-4", digest="v1")
    for _ in range(2):
        assert await refused(served.stub.Execute(failing, timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE,
            "PREVIEW_FAILED",
        )
    assert thing.runs == 0


async def test_without_a_store_a_stale_preview_is_rejected_too(serve: Serve) -> None:
    provider, thing = build(dedupe=False, long_running=False)
    served = await serve(provider)
    thing.set("critical")
    reply = await served.stub.Execute(execute(digest="v1"), timeout=5)
    assert (reply.outcome, reply.reason) == (common_pb2.OUTCOME_REJECTED, STALE)
    current = await served.stub.Execute(execute(key="key-2", digest="v2"), timeout=5)
    assert current.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert thing.runs == 1


async def test_a_long_running_action_on_a_stale_preview_is_rejected_at_once(
    serve: Serve,
) -> None:
    provider, thing = build()
    served = await serve(provider)
    shown = await served.stub.Preview(preview("thing.long_level"), timeout=5)
    thing.set("critical")

    stale = execute("thing.long_level", key="long-1", digest=shown.state_digest)
    reply = await served.stub.Execute(stale, timeout=5)
    assert (reply.outcome, reply.reason) == (common_pb2.OUTCOME_REJECTED, STALE)
    assert thing.runs == 0
    assert await served.stub.Execute(stale, timeout=5) == reply

    current = await served.stub.Preview(preview("thing.long_level"), timeout=5)
    approved = execute("thing.long_level", key="long-2", digest=current.state_digest)
    accepted = await served.stub.Execute(approved, timeout=5)
    assert accepted.outcome == common_pb2.OUTCOME_ACCEPTED
    thing.release.set()

    async def done() -> provider_pb2.ExecuteResponse | None:
        answer = await served.stub.Execute(approved, timeout=5)
        return None if answer.outcome == common_pb2.OUTCOME_ACCEPTED else answer

    final = await eventually(done)
    assert isinstance(final, provider_pb2.ExecuteResponse)
    assert final.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert changes_of(final) == changes_of(current)
    assert thing.digests == [current.state_digest]
