"""The provider SDK: declarations checked when made, and a real provider server over gRPC."""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.rpc.errors import error_details
from actionmesh.rpc.server import RunningServer
from actionmesh.rpc.telemetry import configure_tracing
from actionmesh.sdk import (
    ActionContext,
    Change,
    Facts,
    Input,
    MemoryIdempotencyStore,
    NoInputs,
    Provider,
    ProviderConfig,
    ProviderDefinitionError,
    RecordView,
    Result,
    Risk,
    Unavailable,
    start_provider,
)
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc

pytestmark = pytest.mark.timeout(30)


class Level(enum.Enum):
    MINOR = "minor"
    MAJOR = "major"


@dataclass(frozen=True)
class CloseInputs:
    reason: str = Input(description="Why the ticket can be closed", min_length=3, max_length=50)
    priority: Literal["low", "normal", "high"] = "normal"
    count: int = Input(1, description="How many", minimum=1, maximum=5)
    level: Level = Level.MINOR
    note: str | None = None
    notify: bool = False
    ratio: float = Input(0.5, minimum=0, maximum=1)


def ticket(
    status: str = "open", tenant: str = "acme", **attributes: str
) -> common_pb2.RecordContext:
    return common_pb2.RecordContext(
        tenant=tenant,
        type="ticket",
        id="t-1",
        status=status,
        sensitivity=common_pb2.SENSITIVITY_SENSITIVE,
        attributes=attributes,
    )


OPERATOR = common_pb2.Operator(subject="alice", tenant="acme", roles=["operator", "lead"])


def s(text: str) -> common_pb2.InputValue:
    return common_pb2.InputValue(string_value=text)


def execute(
    action_id: str = "ticket.close",
    *,
    key: str = "key-1",
    record: common_pb2.RecordContext | None = None,
    operator: common_pb2.Operator = OPERATOR,
    inputs: dict[str, common_pb2.InputValue] | None = None,
) -> provider_pb2.ExecuteRequest:
    if inputs is None:
        inputs = {"reason": s("customer confirmed")} if action_id == "ticket.close" else {}
    return provider_pb2.ExecuteRequest(
        action_id=action_id,
        record=record or ticket(),
        operator=operator,
        inputs=inputs,
        idempotency_key=key,
        request_id=f"req-{key}",
    )


@dataclass
class Recorder:
    """What the test provider's handlers saw."""

    contexts: list[ActionContext] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    delay_s: float = 0.0
    fail_next: bool = False
    events: list[str] = field(default_factory=list)


def build_provider(dedupe: Any = False) -> tuple[Provider, Recorder]:
    seen = Recorder()
    provider = Provider("tickets", version="2.3.4", dedupe=dedupe)

    @provider.on_start
    async def opened(config: ProviderConfig) -> None:
        seen.events.append(f"start:{config.seed_demo}")

    @provider.on_stop
    async def closed() -> None:
        seen.events.append("stop")

    def closable(record: RecordView) -> bool | Unavailable:
        if record.status == "closed":
            return Unavailable("ALREADY_CLOSED")
        return record.status != "frozen"

    @provider.action(
        "ticket.close",
        label="Close ticket",
        record_types=["ticket", "case"],
        available=closable,
        risk=Risk.HIGH,
        reversible=True,
        requires_approval=True,
        timeout_s=2.5,
    )
    async def close(ctx: ActionContext, inputs: CloseInputs) -> Result:
        """Close a ticket that the customer confirmed."""
        seen.contexts.append(ctx)
        seen.inputs.append(inputs)
        if seen.delay_s:
            await asyncio.sleep(seen.delay_s)
        if seen.fail_next:
            seen.fail_next = False
            raise RuntimeError("secret downstream detail")
        return Result.succeeded(
            external_ref=f"close/{len(seen.inputs)}",
            changes=[Change("status", "open", "closed"), Change("count", None, inputs.count)],
            warnings=["customer not notified"],
            message="closed",
        )

    @provider.action("ticket.boom", record_types=["ticket"], available=lambda r: 1 / 0 > 0)
    async def boom(ctx: ActionContext, inputs: NoInputs) -> Result:
        raise RuntimeError("exploded with a secret stack trace")

    @provider.action("ticket.weird", record_types=["ticket"])
    async def weird(ctx: ActionContext, inputs: NoInputs) -> Result:
        return "not a result"  # type: ignore[return-value]

    @provider.action("ticket.refuse", record_types=["ticket"])
    async def refuse(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.rejected("NOT_ELIGIBLE", "ticket is not eligible")

    @provider.action("ticket.half", record_types=["ticket"])
    async def half(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.partial(
            reason="WRITE_BACK_FAILED",
            message="sent, not recorded",
            external_ref="ext-9",
            changes=[Change("sent", False, True)],
        )

    @provider.action("order.refund", record_types=["order"])
    async def refund(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    return provider, seen


@dataclass
class Served:
    provider: Provider
    seen: Recorder
    server: RunningServer
    stub: provider_pb2_grpc.ActionProviderServiceStub
    channel: grpc.aio.Channel


Starter = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve_provider(tmp_path: Path) -> AsyncIterator[Starter]:
    """Start providers on 127.0.0.1:0 with registry=""; stop them all afterwards."""
    configure_tracing("test-provider-sdk")
    started: list[Served] = []

    async def start(
        provider: Provider | None = None, seen: Recorder | None = None, dedupe: Any = False
    ) -> Served:
        if provider is None:
            provider, seen = build_provider(dedupe)
        config = ProviderConfig(port=0, registry="", data_dir=str(tmp_path / "data"))
        server = await start_provider(provider, config)
        channel = grpc.aio.insecure_channel(server.address)
        served = Served(
            provider,
            seen or Recorder(),
            server,
            provider_pb2_grpc.ActionProviderServiceStub(channel),
            channel,
        )
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        await served.channel.close()
        await served.server.stop(1.0)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# -- declarations ------------------------------------------------------------


@dataclass(frozen=True)
class ListInputs:
    tags: list[str]


@dataclass(frozen=True)
class Nested:
    inner: CloseInputs


@dataclass(frozen=True)
class UnionInputs:
    value: int | str


@dataclass
class MutableInputs:
    reason: str


@dataclass(frozen=True)
class BadNameInputs:
    Reason: str


@dataclass(frozen=True)
class BadLengthInputs:
    reason: str = Input(min_length=5, max_length=2)


@dataclass(frozen=True)
class MisplacedBoundInputs:
    count: int = Input(min_length=1)


@dataclass(frozen=True)
class BadDefaultInputs:
    priority: Literal["low", "high"] = "urgent"  # type: ignore[assignment]


@dataclass(frozen=True)
class OutOfBoundsDefaultInputs:
    count: int = Input(50, maximum=10)


@pytest.mark.parametrize("provider_id", ["", "X", "Tickets", "a", "1abc", "has space"])
def test_bad_provider_ids_are_refused(provider_id: str) -> None:
    with pytest.raises(ProviderDefinitionError, match="provider id"):
        Provider(provider_id)


def declare(inputs_cls: Any, action_id: str = "ticket.close", **options: Any) -> Provider:
    provider = Provider("tickets")
    options.setdefault("record_types", ["ticket"])

    async def handler(ctx: ActionContext, inputs: Any) -> Result:
        return Result.succeeded()

    handler.__annotations__["inputs"] = inputs_cls
    provider.action(action_id, **options)(handler)
    return provider


@pytest.mark.parametrize(
    ("inputs_cls", "message"),
    [
        (ListInputs, "unsupported input type"),
        (Nested, "unsupported input type"),
        (UnionInputs, "unsupported input type"),
        (MutableInputs, "must be declared @dataclass\\(frozen=True\\)"),
        (dict, "must be a frozen dataclass"),
        (BadNameInputs, "name must match"),
        (BadLengthInputs, "min_length 5 > max_length 2"),
        (MisplacedBoundInputs, "min_length applies to str inputs only"),
        (BadDefaultInputs, "default 'urgent' must be one of: low, high"),
        (OutOfBoundsDefaultInputs, "default 50 must be at most 10"),
    ],
)
def test_bad_inputs_are_refused_when_declared(inputs_cls: Any, message: str) -> None:
    with pytest.raises(ProviderDefinitionError, match=message):
        declare(inputs_cls)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"action_id": "close"}, "id must match"),
        ({"action_id": "Ticket.Close"}, "id must match"),
        ({"record_types": []}, "record_types must not be empty"),
        ({"record_types": "ticket"}, "must be a list"),
        ({"record_types": ["Ticket!"]}, "record type 'Ticket!'"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"risk": "low"}, "risk must be a Risk"),
        ({"available": "yes"}, "available must be a plain"),
        ({"available": lambda a, b: True}, "exactly one argument"),
    ],
)
def test_bad_action_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ProviderDefinitionError, match=message):
        declare(NoInputs, **options)


def test_async_predicates_are_refused() -> None:
    async def predicate(record: RecordView) -> bool:
        return True

    with pytest.raises(ProviderDefinitionError, match="not async"):
        declare(NoInputs, available=predicate)


def test_duplicate_action_ids_are_refused() -> None:
    provider = declare(NoInputs)

    async def again(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    with pytest.raises(ProviderDefinitionError, match="declared twice"):
        provider.action("ticket.close", record_types=["ticket"])(again)


def test_handlers_must_be_async_with_ctx_and_inputs() -> None:
    provider = Provider("tickets")

    def sync_handler(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    async def one_arg(ctx: ActionContext) -> Result:
        return Result.succeeded()

    async def unannotated(ctx, inputs):
        return Result.succeeded()

    with pytest.raises(ProviderDefinitionError, match="must be an async def"):
        provider.action("a.sync", record_types=["t"])(sync_handler)  # type: ignore[type-var]
    with pytest.raises(ProviderDefinitionError, match=r"exactly \(ctx, inputs\)"):
        provider.action("a.one", record_types=["t"])(one_arg)
    with pytest.raises(ProviderDefinitionError, match="annotate the handler's inputs"):
        provider.action("a.bare", record_types=["t"])(unannotated)
    assert provider.actions == {}


def test_hooks_are_checked_and_decorators_return_the_function() -> None:
    provider = Provider("tickets")

    def not_async(config: ProviderConfig) -> None:
        pass

    async def no_config() -> None:
        pass

    with pytest.raises(ProviderDefinitionError, match="async def"):
        provider.on_start(not_async)  # type: ignore[type-var]
    with pytest.raises(ProviderDefinitionError, match="exactly 1 positional"):
        provider.on_start(no_config)
    assert provider.on_stop(no_config) is no_config

    async def handler(ctx: ActionContext, inputs: NoInputs) -> Result:
        return Result.succeeded()

    assert provider.action("a.ok", record_types=["t"])(handler) is handler


def test_results_and_unavailable_check_their_reasons() -> None:
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        Result.rejected("not failed")
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        Result.partial(reason="")
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        Unavailable("nope")
    assert not Unavailable("STATUS_NOT_FAILED")


async def test_a_provider_without_actions_is_not_served() -> None:
    with pytest.raises(ProviderDefinitionError, match="declares no actions"):
        await start_provider(Provider("empty"), ProviderConfig())


async def until(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it is true (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.02)


# -- describe / discover ------------------------------------------------------


async def test_describe_lists_the_declared_actions(serve_provider: Starter) -> None:
    served = await serve_provider()
    reply = await served.stub.Describe(provider_pb2.DescribeRequest(), timeout=5)
    assert (reply.provider_id, reply.version) == ("tickets", "2.3.4")
    actions = {a.action_id: a for a in reply.actions}
    assert set(actions) == {
        "ticket.close",
        "ticket.boom",
        "ticket.weird",
        "ticket.refuse",
        "ticket.half",
        "order.refund",
    }
    close = actions["ticket.close"]
    assert close.label == "Close ticket"
    assert close.description == "Close a ticket that the customer confirmed."
    assert list(close.record_types) == ["ticket", "case"]
    assert (close.risk, close.reversible, close.requires_approval) == (
        common_pb2.RISK_HIGH,
        True,
        True,
    )
    assert close.timeout_ms == 2500
    assert actions["ticket.boom"].timeout_ms == 0
    assert actions["ticket.boom"].risk == common_pb2.RISK_MEDIUM
    fields = {f.name: f for f in close.inputs}
    assert [f.name for f in close.inputs] == [
        "reason",
        "priority",
        "count",
        "level",
        "note",
        "notify",
        "ratio",
    ]
    reason = fields["reason"]
    assert (reason.type, reason.required, reason.min_length, reason.max_length) == (
        common_pb2.INPUT_TYPE_STRING,
        True,
        3,
        50,
    )
    assert reason.description == "Why the ticket can be closed"
    assert fields["priority"].type == common_pb2.INPUT_TYPE_ENUM
    assert list(fields["priority"].allowed_values) == ["low", "normal", "high"]
    assert not fields["priority"].required
    assert list(fields["level"].allowed_values) == ["minor", "major"]
    assert (fields["count"].type, fields["count"].minimum, fields["count"].maximum) == (
        common_pb2.INPUT_TYPE_INTEGER,
        1.0,
        5.0,
    )
    assert fields["note"].type == common_pb2.INPUT_TYPE_STRING and not fields["note"].required
    assert fields["notify"].type == common_pb2.INPUT_TYPE_BOOLEAN
    assert fields["ratio"].type == common_pb2.INPUT_TYPE_NUMBER
    assert list(actions["ticket.boom"].inputs) == []


async def test_discover_reports_availability_per_record(serve_provider: Starter) -> None:
    served = await serve_provider()

    async def discover(record: common_pb2.RecordContext) -> dict[str, tuple[bool, str]]:
        reply = await served.stub.Discover(
            provider_pb2.DiscoverRequest(record=record, operator=OPERATOR), timeout=5
        )
        return {a.action_id: (a.available, a.unavailable_reason) for a in reply.actions}

    open_ticket = await discover(ticket("open"))
    assert open_ticket == {
        "ticket.close": (True, ""),
        # The predicate raised: unavailable, never a failed Discover.
        "ticket.boom": (False, "PREDICATE_FAILED"),
        "ticket.weird": (True, ""),
        "ticket.refuse": (True, ""),
        "ticket.half": (True, ""),
    }
    assert (await discover(ticket("closed")))["ticket.close"] == (False, "ALREADY_CLOSED")
    assert (await discover(ticket("frozen")))["ticket.close"] == (False, "NOT_AVAILABLE")
    order = common_pb2.RecordContext(tenant="acme", type="order", id="o-1", status="paid")
    assert await discover(order) == {"order.refund": (True, "")}
    invoice = common_pb2.RecordContext(tenant="acme", type="invoice", id="i-1")
    assert await discover(invoice) == {}
    # Discover is side-effect free: no handler ran.
    assert served.seen.contexts == []


async def test_discover_refuses_a_record_of_another_tenant(serve_provider: Starter) -> None:
    served = await serve_provider()
    error = await rpc_error(
        served.stub.Discover(
            provider_pb2.DiscoverRequest(record=ticket(tenant="globex"), operator=OPERATOR),
            timeout=5,
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(error).reason == "TENANT_MISMATCH"


# -- execute ------------------------------------------------------------------


async def test_execute_runs_the_handler_with_a_full_context(serve_provider: Starter) -> None:
    served = await serve_provider()
    record = ticket("open", queue="billing")
    started = time.monotonic()
    reply = await served.stub.Execute(
        execute(
            record=record,
            inputs={
                "reason": s("customer confirmed"),
                "count": common_pb2.InputValue(integer_value=3),
                "level": s("major"),
                "ratio": common_pb2.InputValue(integer_value=1),
            },
        ),
        timeout=5,
    )
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert (reply.external_ref, reply.message) == ("close/1", "closed")
    assert [(c.field, c.before, c.after) for c in reply.changes] == [
        ("status", "open", "closed"),
        ("count", "", "3"),
    ]
    assert list(reply.warnings) == ["customer not notified"]

    (inputs,) = served.seen.inputs
    assert inputs == CloseInputs(
        reason="customer confirmed",
        priority="normal",
        count=3,
        level=Level.MAJOR,
        note=None,
        notify=False,
        ratio=1.0,
    )
    (ctx,) = served.seen.contexts
    assert ctx.action_id == "ticket.close"
    assert (ctx.operator.subject, ctx.operator.tenant, ctx.operator.roles) == (
        "alice",
        "acme",
        ("operator", "lead"),
    )
    assert ctx.tenant == "acme"
    assert ctx.record == RecordView(
        tenant="acme",
        type="ticket",
        id="t-1",
        status="open",
        sensitivity="sensitive",
        attributes={"queue": "billing"},
    )
    assert (ctx.idempotency_key, ctx.request_id) == ("key-1", "req-key-1")
    assert ctx.deadline is not None and started < ctx.deadline <= started + 5.5
    assert ctx.logger.extra == {"action_id": "ticket.close", "request_id": "req-key-1"}
    assert len(ctx.trace_id) == 32 and int(ctx.trace_id, 16) != 0
    assert format(ctx.span.get_span_context().trace_id, "032x") == ctx.trace_id


async def test_rejected_and_partial_results_map_onto_the_protocol(
    serve_provider: Starter,
) -> None:
    served = await serve_provider()
    rejected = await served.stub.Execute(execute("ticket.refuse", key="r"), timeout=5)
    assert (rejected.outcome, rejected.reason, rejected.message) == (
        common_pb2.OUTCOME_REJECTED,
        "NOT_ELIGIBLE",
        "ticket is not eligible",
    )
    partial = await served.stub.Execute(execute("ticket.half", key="p"), timeout=5)
    assert (partial.outcome, partial.reason, partial.external_ref) == (
        common_pb2.OUTCOME_PARTIAL,
        "WRITE_BACK_FAILED",
        "ext-9",
    )
    assert [(c.field, c.before, c.after) for c in partial.changes] == [("sent", "false", "true")]


async def test_invalid_inputs_are_refused_with_field_violations(serve_provider: Starter) -> None:
    served = await serve_provider()
    error = await rpc_error(
        served.stub.Execute(
            execute(inputs={"priority": s("urgent"), "count": s("three"), "colour": s("red")}),
            timeout=5,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(error)
    assert details.reason == "INVALID_INPUT"
    assert {v.field: v.description for v in details.violations} == {
        "inputs.reason": "is required",
        "inputs.priority": "must be one of: low, normal, high",
        "inputs.count": "must be an integer",
        "inputs.colour": "is not an input of this action",
    }
    assert "urgent" not in error.details() and "three" not in error.details()
    assert served.seen.contexts == []


async def test_the_largest_violation_list_still_reaches_the_client(
    serve_provider: Starter,
) -> None:
    served = await serve_provider()
    many = {f"unknown_input_{k:03d}_" + "x" * 40: s("v") for k in range(200)}
    error = await rpc_error(served.stub.Execute(execute(inputs=many), timeout=5))
    details = error_details(error)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_INPUT"
    assert details.violations[0].description == "must have at most 32 inputs"


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (execute("ticket.nope"), grpc.StatusCode.NOT_FOUND, "UNKNOWN_ACTION"),
        (execute("order.refund"), grpc.StatusCode.INVALID_ARGUMENT, "RECORD_TYPE_NOT_SUPPORTED"),
        (execute(key=""), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_IDEMPOTENCY_KEY"),
        (
            execute(record=ticket(tenant="globex")),
            grpc.StatusCode.PERMISSION_DENIED,
            "TENANT_MISMATCH",
        ),
        (
            execute(operator=common_pb2.Operator(subject="alice")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
        ),
    ],
)
async def test_bad_execute_requests_are_refused_before_the_handler(
    serve_provider: Starter,
    request_: provider_pb2.ExecuteRequest,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    served = await serve_provider()
    error = await rpc_error(served.stub.Execute(request_, timeout=5))
    assert error.code() == code
    assert error_details(error).reason == reason
    assert served.seen.contexts == []


async def test_a_failing_handler_is_internal_and_the_server_keeps_serving(
    serve_provider: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve_provider()
    error = await rpc_error(served.stub.Execute(execute("ticket.boom"), timeout=5))
    assert error.code() == grpc.StatusCode.INTERNAL
    details = error_details(error)
    assert details.reason == "HANDLER_FAILED"
    assert "secret" not in details.message and "Traceback" not in details.message
    assert "exploded with a secret stack trace" in caplog.text  # logged, not sent

    odd = await rpc_error(served.stub.Execute(execute("ticket.weird"), timeout=5))
    assert error_details(odd).reason == "HANDLER_FAILED"

    reply = await served.stub.Execute(execute(key="after-failure"), timeout=5)
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED
    health = health_pb2_grpc.HealthStub(served.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


# -- idempotency --------------------------------------------------------------


async def test_without_dedupe_a_repeated_key_runs_again(serve_provider: Starter) -> None:
    served = await serve_provider(dedupe=False)
    await served.stub.Execute(execute(), timeout=5)
    await served.stub.Execute(execute(), timeout=5)
    assert len(served.seen.contexts) == 2


async def test_dedupe_returns_the_stored_result_for_a_repeated_key(
    serve_provider: Starter,
) -> None:
    served = await serve_provider(dedupe=True)
    first = await served.stub.Execute(execute(key="k"), timeout=5)
    second = await served.stub.Execute(execute(key="k"), timeout=5)
    assert first == second and first.external_ref == "close/1"
    assert len(served.seen.contexts) == 1
    other = await served.stub.Execute(execute(key="k2"), timeout=5)
    assert other.external_ref == "close/2"
    # Same key, same action, other tenant: a different execution.
    globex = common_pb2.Operator(subject="bob", tenant="globex")
    await served.stub.Execute(execute(key="k", record=ticket(tenant="globex"), operator=globex))
    assert len(served.seen.contexts) == 3


async def test_dedupe_lets_ten_concurrent_duplicates_run_once(serve_provider: Starter) -> None:
    served = await serve_provider(dedupe=True)
    served.seen.delay_s = 0.2
    replies = await asyncio.gather(
        *(served.stub.Execute(execute(key="same"), timeout=10) for _ in range(10))
    )
    assert len(served.seen.contexts) == 1
    assert {r.external_ref for r in replies} == {"close/1"}
    assert all(r.outcome == common_pb2.OUTCOME_SUCCEEDED for r in replies)


async def test_dedupe_refuses_a_key_reused_for_another_request(serve_provider: Starter) -> None:
    served = await serve_provider(dedupe=True)
    await served.stub.Execute(execute(key="k", inputs={"reason": s("first reason")}), timeout=5)
    error = await rpc_error(
        served.stub.Execute(execute(key="k", inputs={"reason": s("another reason")}), timeout=5)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(error).reason == "IDEMPOTENCY_KEY_REUSED"
    # An omitted default and the same value sent explicitly are the same request.
    explicit = {"reason": s("first reason"), "priority": s("normal"), "level": s("minor")}
    await served.stub.Execute(execute(key="k", inputs=explicit), timeout=5)
    assert len(served.seen.contexts) == 1


async def test_dedupe_releases_the_key_when_the_handler_fails(serve_provider: Starter) -> None:
    served = await serve_provider(dedupe=True)
    served.seen.fail_next = True
    error = await rpc_error(served.stub.Execute(execute(key="k"), timeout=5))
    assert error_details(error).reason == "HANDLER_FAILED"
    reply = await served.stub.Execute(execute(key="k"), timeout=5)
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert len(served.seen.contexts) == 2


async def test_a_caller_that_gives_up_gets_the_result_on_retry(serve_provider: Starter) -> None:
    served = await serve_provider(dedupe=True)
    served.seen.delay_s = 0.5
    error = await rpc_error(served.stub.Execute(execute(key="slow"), timeout=0.1))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The handler was not cancelled: the retry waits for it and gets its result.
    reply = await served.stub.Execute(execute(key="slow"), timeout=5)
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert len(served.seen.contexts) == 1


async def test_dedupe_survives_a_restart(serve_provider: Starter) -> None:
    provider, seen = build_provider(dedupe=True)
    served = await serve_provider(provider, seen)
    first = await served.stub.Execute(execute(key="k"), timeout=5)
    await served.server.stop(1.0)
    again = await serve_provider(provider, seen)
    second = await again.stub.Execute(execute(key="k"), timeout=5)
    assert first == second
    assert len(seen.contexts) == 1


async def test_a_provider_supplied_store_is_used(serve_provider: Starter) -> None:
    store = MemoryIdempotencyStore()
    served = await serve_provider(dedupe=store)
    await asyncio.gather(*(served.stub.Execute(execute(key="m"), timeout=5) for _ in range(5)))
    assert len(served.seen.contexts) == 1


# -- lifecycle -----------------------------------------------------------------


async def test_lifecycle_hooks_run_around_serving(serve_provider: Starter) -> None:
    served = await serve_provider()
    assert served.seen.events == ["start:False"]
    assert served.provider.running
    with pytest.raises(ProviderDefinitionError, match="already running"):
        await start_provider(served.provider, ProviderConfig())
    with pytest.raises(ProviderDefinitionError, match="is running"):
        served.provider.action("ticket.late", record_types=["ticket"])
    await served.server.stop(1.0)
    assert served.seen.events == ["start:False", "stop"]
    assert not served.provider.running


async def test_a_failing_start_hook_cleans_up(tmp_path: Path) -> None:
    provider, seen = build_provider()

    @provider.on_start
    async def broken(config: ProviderConfig) -> None:
        raise OSError("cannot open the store")

    with pytest.raises(OSError, match="cannot open"):
        await start_provider(provider, ProviderConfig(data_dir=str(tmp_path)))
    assert seen.events == ["start:False", "stop"]
    assert not provider.running


async def test_executions_in_flight_finish_before_stop_hooks(serve_provider: Starter) -> None:
    served = await serve_provider()
    served.seen.delay_s = 0.3
    call = asyncio.ensure_future(served.stub.Execute(execute(), timeout=5))
    await until(lambda: bool(served.seen.contexts))
    stopping = asyncio.ensure_future(served.server.stop(2.0))
    await asyncio.sleep(0.05)
    # While draining, new executions are refused before anything runs.
    late = await rpc_error(served.stub.Execute(execute(key="late"), timeout=5))
    assert late.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(late).reason == "PROVIDER_STOPPING"
    reply = await call
    await stopping
    assert reply.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert served.seen.events[-1] == "stop"
    assert len(served.seen.contexts) == 1


# -- registration ------------------------------------------------------------

HAS_REGISTRY = importlib.util.find_spec("actionmesh.registry.server") is not None


@pytest.mark.skipif(not HAS_REGISTRY, reason="actionmesh.registry.server is not available")
async def test_registers_renews_and_deregisters(tmp_path: Path) -> None:
    from actionmesh.registry.config import RegistryConfig
    from actionmesh.registry.server import start_registry
    from actionmesh.runtime.db import sqlite_url
    from actionmesh.v1 import registry_pb2, registry_pb2_grpc

    def registry_config(port: int = 0) -> RegistryConfig:
        return RegistryConfig(
            port=port,
            database_url=sqlite_url(tmp_path / "registry.db"),
            lease_ttl_s=1.0,
            health_check_interval_s=0.3,
        )

    # Learn a free port, then leave it closed: the provider starts before the registry.
    probe = await start_registry(registry_config())
    port = probe.port
    await probe.stop(0.5)

    provider, _ = build_provider()
    server = await start_provider(
        provider,
        ProviderConfig(
            registry=f"127.0.0.1:{port}",
            data_dir=str(tmp_path / "data"),
            registry_retry_max_s=0.3,
        ),
    )
    registry = None
    try:
        assert provider.registration is not None
        await asyncio.sleep(0.5)
        assert not provider.registration.registered.is_set()  # unreachable, still retrying

        registry = await start_registry(registry_config(port))
        async with grpc.aio.insecure_channel(registry.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)

            async def listed() -> dict[str, Any]:
                reply = await stub.ListProviders(registry_pb2.ListProvidersRequest(), timeout=5)
                return {p.provider_id: p for p in reply.providers}

            async def is_listed() -> bool:
                return "tickets" in await listed()

            await until(is_listed)
            entry = (await listed())["tickets"]
            assert entry.endpoint == f"127.0.0.1:{server.port}"
            assert entry.version == "2.3.4"
            assert {a.action_id for a in entry.actions} >= {"ticket.close", "order.refund"}

            # Outlive several lease TTLs: renewal keeps the registration alive.
            await asyncio.sleep(2.5 * registry_config().lease_ttl_s)
            assert await is_listed()

            await server.stop(1.0)
            # Removed by deregistration right away, well before the lease could expire.
            assert not await is_listed()
    finally:
        if provider.running:
            await server.stop(0.5)
        if registry is not None:
            await registry.stop(0.5)


def test_resource_holds_what_a_running_provider_opened() -> None:
    from actionmesh.sdk import Resource

    store: Resource[list[str]] = Resource("the test store")
    with pytest.raises(RuntimeError, match="the test store is not open"):
        store.get()
    opened = ["row"]
    store.set(opened)
    assert store.get() is opened
    assert store.take() is opened and store.take() is None
    with pytest.raises(RuntimeError):
        store.get()


@pytest.mark.parametrize(
    ("facts", "named"),
    [
        ({"status": "open", "version": ""}, "version is required"),
        ({"status": "open\x07", "version": "1"}, "status must be at most"),
        ({"status": "open", "version": "1", "sensitivity": "secret"}, "sensitivity"),
        (
            {"status": "open", "version": "1", "attributes": {f"a{i}": "x" for i in range(40)}},
            "attributes at most",
        ),
        ({"status": "open", "version": "1", "attributes": {"queue": "x" * 5000}}, "attributes"),
    ],
    ids=["no-version", "control-characters", "unknown-sensitivity", "too-many", "too-long"],
)
def test_facts_beyond_the_record_limits_are_refused_at_the_source(
    facts: dict[str, Any], named: str
) -> None:
    # The gateway would refuse such an answer as malformed; the source's author hears it
    # where the mistake is.
    with pytest.raises(ValueError, match=named):
        Facts(**facts)
    assert Facts(status="open", version="1", attributes={"queue": "billing"}).version == "1"
