"""Bad input: every size and shape limit is a clear refusal, never INTERNAL or UNKNOWN.

Against real servers: the session mesh's gateway (started by the binary, so with its
default 1 MiB request limit), and an audit log and a registry started in-process
with the same start-up code their binaries use. Each limit is one case asserting
the status code, the reason and the field violation that names it; property tests
(hypothesis) then throw generated ExecuteAction and DiscoverActions requests, and
raw bytes, at the gateway and check that nothing makes it answer INTERNAL/UNKNOWN
or stop serving.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.server import start_auditlog
from actionmesh.gateway.config import GatewayConfig
from actionmesh.gateway.requests import (
    MAX_ACTION_ID,
    MAX_ATTRIBUTE_VALUE,
    MAX_ATTRIBUTES,
    MAX_LISTED_VIOLATIONS,
    MAX_STATUS,
    MAX_TENANT,
    MAX_VERSION,
)
from actionmesh.mesh import Mesh
from actionmesh.providers.workitems.store import WorkItem
from actionmesh.registry.config import RegistryConfig
from actionmesh.registry.server import start_registry
from actionmesh.registry.servicer import MAX_ACTIONS, MAX_DESCRIPTION_CHARS, MAX_LABEL_CHARS
from actionmesh.rpc.errors import ErrorDetails, error_details
from actionmesh.rpc.schema import MAX_INPUTS, MAX_STRING_CHARS
from actionmesh.rpc.server import RunningServer
from actionmesh.runtime.db import sqlite_url
from actionmesh.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import TokenFactory, bearer, eventually
from tests.provider_state import put_item

Stub = gateway_pb2_grpc.ActionGatewayServiceStub
MiB = 1024 * 1024
# What a well-behaved gateway may answer; INTERNAL and UNKNOWN mean a bug.
ALLOWED_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CALL_TIMEOUT_S = 10.0


def fresh_id() -> str:
    # Never a demo record: whatever runs, runs against an item the provider does not know.
    return f"wi-bad-{uuid.uuid4().hex[:12]}"


def record(**fields: Any) -> common_pb2.RecordContext:
    values: dict[str, Any] = dict(tenant="acme", type="workitem", id=fresh_id(), status="failed")
    values.update(fields)
    return common_pb2.RecordContext(**values)


def text(value: str) -> common_pb2.InputValue:
    return common_pb2.InputValue(string_value=value)


def execute_request(**fields: Any) -> gateway_pb2.ExecuteActionRequest:
    values: dict[str, Any] = dict(
        action_id="workitem.retry",
        record=record(),
        inputs={"reason": text("parser fixed")},
        idempotency_key=uuid.uuid4().hex,
    )
    values.update(fields)
    return gateway_pb2.ExecuteActionRequest(**values)


def violations_text(details: ErrorDetails) -> str:
    return details.message + "".join(v.field + v.description for v in details.violations)


async def refused(call: Any, request: Any, token: str) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(request, metadata=bearer(token), timeout=CALL_TIMEOUT_S)
    return error_details(raised.value)


LONG = "z" * 5000
# (case id, a change to a valid record, the field violation that must name it)
RECORD_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("tenant-too-long", {"tenant": "t" * (MAX_TENANT + 1)}, "record.tenant"),
    ("tenant-control-char", {"tenant": "ac\x00me"}, "record.tenant"),
    ("type-pattern", {"type": "Work Item"}, "record.type"),
    ("type-trailing-newline", {"type": "workitem\n"}, "record.type"),
    ("id-pattern", {"id": "wi 1001"}, "record.id"),
    ("id-too-long", {"id": "w" * 257}, "record.id"),
    ("id-trailing-newline", {"id": "wi-1001\n"}, "record.id"),
    ("status-too-long", {"status": "s" * (MAX_STATUS + 1)}, "record.status"),
    ("status-control-char", {"status": "fail\x00ed"}, "record.status"),
    ("sensitivity-unknown", {"sensitivity": 99}, "record.sensitivity"),
    ("version-too-long", {"version": "v" * (MAX_VERSION + 1)}, "record.version"),
    ("version-control-char", {"version": "7\n"}, "record.version"),
    (
        "too-many-attributes",
        {"attributes": {f"a{k}": "x" for k in range(MAX_ATTRIBUTES + 1)}},
        "record.attributes",
    ),
    ("attribute-key-pattern", {"attributes": {"bad key!": "x"}}, "record.attributes"),
    ("attribute-key-empty", {"attributes": {"": "x"}}, "record.attributes"),
    (
        "attribute-value-too-long",
        {"attributes": {"queue": "q" * (MAX_ATTRIBUTE_VALUE + 1)}},
        "record.attributes[queue]",
    ),
    (
        "attribute-value-control",
        {"attributes": {"queue": "bil\x00ling"}},
        "record.attributes[queue]",
    ),
]
# (case id, fields of the ExecuteActionRequest replaced, the field violation expected)
EXECUTE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("action-id-pattern", {"action_id": "Workitem.Retry"}, "action_id"),
    ("action-id-undotted", {"action_id": "retry"}, "action_id"),
    ("action-id-too-long", {"action_id": "workitem." + "r" * MAX_ACTION_ID}, "action_id"),
    ("action-id-trailing-newline", {"action_id": "workitem.retry\n"}, "action_id"),
    ("idempotency-key-missing", {"idempotency_key": ""}, "idempotency_key"),
    ("idempotency-key-too-long", {"idempotency_key": "k" * 129}, "idempotency_key"),
    ("idempotency-key-pattern", {"idempotency_key": "key with spaces"}, "idempotency_key"),
    (
        "too-many-inputs",
        {"inputs": {f"in_{k}": text("x") for k in range(MAX_INPUTS + 1)}},
        "inputs",
    ),
    ("input-name-pattern", {"inputs": {"Reason": text("parser fixed")}}, "inputs"),
    ("input-name-too-long", {"inputs": {"r" * 65: text("parser fixed")}}, "inputs"),
    ("input-name-newline", {"inputs": {"reason\n": text("parser fixed")}}, "inputs"),
    (
        "input-string-too-long",
        {"inputs": {"reason": text("x" * (MAX_STRING_CHARS + 1))}},
        "inputs.reason",
    ),
    ("input-string-nul", {"inputs": {"reason": text("parser\x00fixed")}}, "inputs.reason"),
    ("input-string-escape", {"inputs": {"reason": text("parser \x1b[2J fixed")}}, "inputs.reason"),
]


@pytest.mark.parametrize(
    ("change", "field"), [c[1:] for c in EXECUTE_CASES], ids=[c[0] for c in EXECUTE_CASES]
)
async def test_execute_limit_is_invalid_argument_naming_the_field(
    gateway: Stub, token: TokenFactory, change: dict[str, Any], field: str
) -> None:
    details = await refused(gateway.ExecuteAction, execute_request(**change), token())
    assert (details.code, details.reason, field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        next((v.field for v in details.violations if v.field == field), None),
    )


@pytest.mark.parametrize(
    ("change", "field"), [c[1:] for c in RECORD_CASES], ids=[c[0] for c in RECORD_CASES]
)
async def test_execute_record_limit_is_invalid_argument_naming_the_field(
    gateway: Stub, token: TokenFactory, change: dict[str, Any], field: str
) -> None:
    details = await refused(
        gateway.ExecuteAction, execute_request(record=record(**change)), token()
    )
    assert (details.code, details.reason, field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        next((v.field for v in details.violations if v.field == field), None),
    )


@pytest.mark.parametrize(
    ("change", "field"), [c[1:] for c in RECORD_CASES], ids=[c[0] for c in RECORD_CASES]
)
async def test_discover_record_limit_is_invalid_argument_naming_the_field(
    gateway: Stub, token: TokenFactory, change: dict[str, Any], field: str
) -> None:
    request = gateway_pb2.DiscoverActionsRequest(record=record(**change))
    details = await refused(gateway.DiscoverActions, request, token())
    assert (details.code, details.reason, field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_RECORD",
        next((v.field for v in details.violations if v.field == field), None),
    )


async def test_discover_without_a_record_names_the_record(
    gateway: Stub, token: TokenFactory
) -> None:
    details = await refused(gateway.DiscoverActions, gateway_pb2.DiscoverActionsRequest(), token())
    assert [v.field for v in details.violations] == ["record"]


async def test_refusals_never_echo_the_values_sent(gateway: Stub, token: TokenFactory) -> None:
    secret = "SECRET-" + "q" * 5000
    request = execute_request(
        action_id="x" * 200,
        record=record(status=secret, attributes={"queue": secret, "bad key " + secret: "v"}),
        inputs={"reason": text(secret), "Bad " + secret: text("x")},
        idempotency_key=secret,
    )
    details = await refused(gateway.ExecuteAction, request, token())
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "SECRET" not in violations_text(details)
    assert len(violations_text(details)) < 2000


async def test_a_request_breaking_every_limit_still_gets_a_deliverable_refusal(
    gateway: Stub, token: TokenFactory
) -> None:
    # 32 inputs and 16 attributes with the longest names allowed, every value broken:
    # listing each problem would not fit the 8 KiB trailer the details travel in.
    request = execute_request(
        action_id="X",
        record=record(
            status="\x00",
            sensitivity=9,
            version="\x00",
            attributes={f"k{k:02d}" + "b" * 61: "\x00" for k in range(MAX_ATTRIBUTES)},
        ),
        inputs={f"n{k:02d}" + "a" * 61: text("\x00") for k in range(MAX_INPUTS)},
        idempotency_key="",
    )
    details = await refused(gateway.ExecuteAction, request, token())
    # action_id, status, sensitivity, version, idempotency_key, each attribute and input.
    problems = 5 + MAX_ATTRIBUTES + MAX_INPUTS
    hidden = problems - (MAX_LISTED_VIOLATIONS - 1)
    assert (details.code, len(details.violations), details.violations[-1].description) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        MAX_LISTED_VIOLATIONS,
        f"has {hidden} more problems not listed",
    )


async def test_an_input_the_action_declares_shorter_is_refused_by_its_schema(
    gateway: Stub, token: TokenFactory
) -> None:
    # workitem.retry declares reason max_length=200: below the 4096 platform cap.
    request = execute_request(inputs={"reason": text("x" * 201)})
    details = await refused(gateway.ExecuteAction, request, token())
    assert (details.reason, [v.field for v in details.violations]) == (
        "INVALID_INPUT",
        ["inputs.reason"],
    )


async def test_an_attempt_with_oversized_inputs_is_audited_without_them(
    gateway: Stub, token: TokenFactory
) -> None:
    request = execute_request(inputs={"reason": text("y" * (MAX_STRING_CHARS + 1))})
    details = await refused(gateway.ExecuteAction, request, token())
    assert details.reason == "INVALID_REQUEST"

    async def refusal_recorded() -> list[audit_pb2.AuditEvent]:
        reply = await gateway.GetRecordHistory(
            gateway_pb2.GetRecordHistoryRequest(
                record=common_pb2.RecordRef(type="workitem", id=request.record.id)
            ),
            metadata=bearer(token()),
        )
        return list(reply.events)

    events = await eventually(refusal_recorded)
    assert isinstance(events, list) and len(events) == 1
    event = events[0]
    assert (event.outcome, event.reason, dict(event.inputs)) == (
        common_pb2.OUTCOME_DENIED,
        "INVALID_REQUEST",
        {},
    )


# --- the whole message: grpc itself refuses what is over the limit -------------------


def test_the_gateway_accepts_at_most_one_mebibyte_by_default() -> None:
    # The largest valid ExecuteAction (32 inputs x 4096 four-byte characters) fits.
    largest_valid = MAX_INPUTS * MAX_STRING_CHARS * 4 + 64 * 1024
    assert largest_valid < GatewayConfig.max_request_bytes == MiB


async def test_a_request_over_the_gateway_limit_is_resource_exhausted(
    gateway: Stub, token: TokenFactory
) -> None:
    request = execute_request(inputs={"reason": text("x" * (MiB + 1))})
    details = await refused(gateway.ExecuteAction, request, token())
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_request_just_under_the_gateway_limit_reaches_the_validator(
    gateway: Stub, token: TokenFactory
) -> None:
    request = execute_request(inputs={"reason": text("x" * (MiB - 4096))})
    details = await refused(gateway.ExecuteAction, request, token())
    assert [v.field for v in details.violations] == ["inputs.reason"]


# --- bytes that are not the method's message -----------------------------------------

UNDECODABLE = {
    "corrupt-wire-format": b"\xff\xff\xff\xff",
    # Field 1 (a string in every request tested here) holding invalid UTF-8.
    "invalid-utf8": b"\x0a\x03\xff\xfe\xfd",
}


async def raw_call(
    address: str, method: str, payload: bytes, metadata: Any = None, stream: bool = False
) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            if stream:
                async for _ in channel.unary_stream(method)(
                    payload, metadata=metadata, timeout=CALL_TIMEOUT_S
                ):
                    pass
            else:
                await channel.unary_unary(method)(
                    payload, metadata=metadata, timeout=CALL_TIMEOUT_S
                )
    return raised.value


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
@pytest.mark.parametrize("method", ["DiscoverActions", "ExecuteAction"])
async def test_undecodable_gateway_request_is_invalid_argument(
    mesh: Mesh, token: TokenFactory, method: str, payload: bytes
) -> None:
    error = await raw_call(
        mesh.address("gateway"),
        f"/actionmesh.v1.ActionGatewayService/{method}",
        payload,
        bearer(token()),
    )
    details = error_details(error)
    assert (details.code, details.reason, [v.field for v in details.violations]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        ["request"],
    )


# --- the audit log and the registry ---------------------------------------------------


@pytest.fixture
async def auditlog(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_auditlog(
        AuditLogConfig(port=0, database_url=sqlite_url(tmp_path / "audit.db"))
    )
    yield running
    await running.stop(0)


@pytest.fixture
async def small_auditlog(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_auditlog(
        AuditLogConfig(
            port=0, database_url=sqlite_url(tmp_path / "small.db"), max_request_bytes=64 * 1024
        )
    )
    yield running
    await running.stop(0)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_registry(
        RegistryConfig(
            port=0, database_url=sqlite_url(tmp_path / "registry.db"), max_request_bytes=MiB
        )
    )
    yield running
    await running.stop(0)


def audit_event(event_id: str, **fields: Any) -> audit_pb2.AuditEvent:
    values: dict[str, Any] = dict(
        event_id=event_id,
        type=audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
        tenant="acme",
        record=common_pb2.RecordRef(type="workitem", id="wi-1"),
        actor="alice",
        action_id="workitem.retry",
        execution_id=f"exec-{event_id}",
    )
    values.update(fields)
    return audit_pb2.AuditEvent(**values)


async def append(server: RunningServer, events: list[audit_pb2.AuditEvent]) -> ErrorDetails:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.AppendEvents(
                audit_pb2.AppendEventsRequest(events=events), timeout=CALL_TIMEOUT_S
            )
    return error_details(raised.value)


AUDIT_CASES: list[tuple[str, Callable[[], list[audit_pb2.AuditEvent]], str]] = [
    ("unknown-type", lambda: [audit_event("e1", type=99)], "events[0].type"),
    ("unknown-outcome", lambda: [audit_event("e1", outcome=42)], "events[0].outcome"),
    ("tenant-too-long", lambda: [audit_event("e1", tenant="t" * 129)], "events[0].tenant"),
    ("no-event-id", lambda: [audit_event("")], "events[0].event_id"),
    ("too-many-events", lambda: [audit_event(f"e{k}") for k in range(1001)], "events"),
]


@pytest.mark.parametrize(
    ("events", "field"), [c[1:] for c in AUDIT_CASES], ids=[c[0] for c in AUDIT_CASES]
)
async def test_append_events_refuses_malformed_events(
    auditlog: RunningServer, events: Callable[[], list[audit_pb2.AuditEvent]], field: str
) -> None:
    details = await append(auditlog, events())
    assert (details.code, field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        next((v.field for v in details.violations if v.field == field), None),
    )


async def test_append_events_over_the_size_limit_is_resource_exhausted(
    small_auditlog: RunningServer,
) -> None:
    event = audit_event("e1", inputs={"reason": "x" * (64 * 1024)})
    details = await append(small_auditlog, [event])
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_audit_log_takes_batches_beyond_the_grpc_default(
    auditlog: RunningServer,
) -> None:
    # Five events with ~1 MiB of inputs each: more than the 4 MiB gRPC default.
    events = [audit_event(f"big-{k}", inputs={"reason": "x" * MiB}) for k in range(5)]
    async with grpc.aio.insecure_channel(auditlog.address) as channel:
        reply = await audit_pb2_grpc.AuditServiceStub(channel).AppendEvents(
            audit_pb2.AppendEventsRequest(events=events), timeout=CALL_TIMEOUT_S
        )
    assert reply.stored == 5


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_undecodable_append_events_is_invalid_argument(
    auditlog: RunningServer, payload: bytes
) -> None:
    # AppendEventsRequest field 1 is a message: invalid UTF-8 inside is still undecodable.
    error = await raw_call(auditlog.address, "/actionmesh.v1.AuditService/AppendEvents", payload)
    assert (error.code(), error_details(error).reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    )


def action(index: int, **fields: Any) -> common_pb2.ActionDescriptor:
    values: dict[str, Any] = dict(
        action_id=f"bad.action_{index}", label="Do it", record_types=["workitem"]
    )
    values.update(fields)
    return common_pb2.ActionDescriptor(**values)


async def register(server: RunningServer, actions: list[common_pb2.ActionDescriptor]) -> Any:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.RegisterProvider(
                registry_pb2.RegisterProviderRequest(
                    provider_id="badprovider",
                    endpoint="127.0.0.1:1",
                    version="1",
                    actions=actions,
                ),
                timeout=CALL_TIMEOUT_S,
            )
    return raised.value


STRING = common_pb2.INPUT_TYPE_STRING
ENUM = common_pb2.INPUT_TYPE_ENUM
REGISTRY_CASES: list[tuple[str, Callable[[], list[common_pb2.ActionDescriptor]], str]] = [
    ("too-many-actions", lambda: [action(k) for k in range(MAX_ACTIONS + 1)], "actions"),
    (
        "action-id-too-long",
        lambda: [action(0, action_id="bad." + "a" * 200)],
        "actions[0].action_id",
    ),
    ("label-too-long", lambda: [action(0, label="L" * (MAX_LABEL_CHARS + 1))], "actions[0].label"),
    (
        "description-too-long",
        lambda: [action(0, description="d" * (MAX_DESCRIPTION_CHARS + 1))],
        "actions[0].description",
    ),
    (
        "huge-description",
        lambda: [action(0, description="d" * (MiB // 2))],
        "actions[0].description",
    ),
    (
        "too-many-record-types",
        lambda: [action(0, record_types=[f"t{k}" for k in range(17)])],
        "actions[0].record_types",
    ),
    (
        "input-description-too-long",
        lambda: [
            action(
                0,
                inputs=[
                    common_pb2.InputField(
                        name="why", type=STRING, description="d" * (MAX_DESCRIPTION_CHARS + 1)
                    )
                ],
            )
        ],
        "actions[0].inputs[0].description",
    ),
    (
        "too-many-allowed-values",
        lambda: [
            action(
                0,
                inputs=[
                    common_pb2.InputField(
                        name="level", type=ENUM, allowed_values=[f"v{k}" for k in range(33)]
                    )
                ],
            )
        ],
        "actions[0].inputs[0].allowed_values",
    ),
    (
        "allowed-value-too-long",
        lambda: [
            action(
                0,
                inputs=[common_pb2.InputField(name="level", type=ENUM, allowed_values=["v" * 65])],
            )
        ],
        "actions[0].inputs[0].allowed_values",
    ),
    ("action-id-pattern", lambda: [action(0, action_id="Bad")], "actions[0].action_id"),
]


@pytest.mark.parametrize(
    ("actions", "field"), [c[1:] for c in REGISTRY_CASES], ids=[c[0] for c in REGISTRY_CASES]
)
async def test_register_provider_refuses_oversize_declarations(
    registry: RunningServer, actions: Callable[[], list[common_pb2.ActionDescriptor]], field: str
) -> None:
    details = error_details(await register(registry, actions()))
    assert (details.code, details.reason, field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REGISTRATION",
        next((v.field for v in details.violations if v.field == field), None),
    )


async def test_a_registration_with_hundreds_of_problems_still_gets_its_details(
    registry: RunningServer,
) -> None:
    # Each action breaks several rules; all of them would not fit an 8 KiB trailer.
    broken = [
        action(
            k,
            action_id=f"BAD{k}",
            label="",
            record_types=["Bad Type"],
            inputs=[common_pb2.InputField(name="X" * 60, type=ENUM)],
        )
        for k in range(MAX_ACTIONS)
    ]
    details = error_details(await register(registry, broken))
    assert (details.code, details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REGISTRATION",
    )
    assert details.violations[0].field == "actions[0].action_id"
    assert details.violations[-1].description.endswith("more problems not listed")


async def test_register_provider_over_the_size_limit_is_resource_exhausted(
    registry: RunningServer,
) -> None:
    error = await register(registry, [action(0, description="d" * (MiB + 1))])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_undecodable_register_provider_is_invalid_argument(
    registry: RunningServer, payload: bytes
) -> None:
    error = await raw_call(
        registry.address, "/actionmesh.v1.RegistryService/RegisterProvider", payload
    )
    assert (error.code(), error_details(error).reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    )


async def test_undecodable_watch_providers_is_invalid_argument(registry: RunningServer) -> None:
    # A server-streaming method: the refusal comes instead of the first message.
    error = await raw_call(
        registry.address,
        "/actionmesh.v1.RegistryService/WatchProviders",
        UNDECODABLE["corrupt-wire-format"],
        stream=True,
    )
    assert (error.code(), error_details(error).reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    )


# --- property tests: generated requests never make the gateway fail --------------------

# Any character protobuf can carry (no lone surrogates), control characters included.
CHARACTERS = st.characters(exclude_categories=["Cs"])
ANY_TEXT = st.one_of(
    st.text(CHARACTERS, max_size=40),
    st.sampled_from(["", "\x00", "\n", "\x7f", "\u202e", "é", "😀", "a\x00b", " "]),
    st.tuples(st.sampled_from("xé😀\x00"), st.integers(0, 6000)).map(lambda p: p[0] * p[1]),
)


def maybe(good: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly plausible values (so requests get deep), sometimes anything."""
    return st.one_of(good, good, ANY_TEXT)


INPUT_VALUES = st.one_of(
    ANY_TEXT.map(lambda s: common_pb2.InputValue(string_value=s)),
    st.sampled_from(["parser fixed", "queue drained", "ok"]).map(
        lambda s: common_pb2.InputValue(string_value=s)
    ),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: common_pb2.InputValue(integer_value=i)),
    st.floats().map(lambda f: common_pb2.InputValue(number_value=f)),
    st.booleans().map(lambda b: common_pb2.InputValue(bool_value=b)),
    st.just(common_pb2.InputValue()),
)


# Work items the property tests put into the workitems provider's store (its system of
# record, which the gateway asks for their facts): generated requests may act on these
# and on nothing else a provider knows. Other generated ids are unknown (NOT_FOUND).
PROPERTY_ITEMS = tuple(f"wi-prop-item-{n:02d}" for n in range(12))


@pytest.fixture(scope="module")
def property_items(mesh: Mesh) -> tuple[str, ...]:
    for item_id in PROPERTY_ITEMS:
        put_item(mesh, WorkItem("acme", item_id, "customer_update", "failed"))
    return PROPERTY_ITEMS


def records(field: Callable[[st.SearchStrategy[str]], st.SearchStrategy[str]]) -> Any:
    return st.builds(
        common_pb2.RecordContext,
        tenant=field(st.just("acme")),
        type=field(st.sampled_from(["workitem", "ticket"])),
        # The test's own items or random ids, so nothing else a provider knows is touched.
        id=field(
            st.one_of(
                st.sampled_from(PROPERTY_ITEMS),
                st.uuids().map(lambda u: f"wi-prop-{u.hex[:12]}"),
            )
        ),
        status=field(st.sampled_from(["failed", "stuck", "processed", "open"])),
        sensitivity=st.integers(0, 3) if field is plausible else st.integers(-3, 8),
        attributes=st.dictionaries(
            field(st.sampled_from(["queue", "region"])), field(st.just("billing")), max_size=20
        ),
        version=field(st.sampled_from(["", "7", "etag-1"])),
    )


def plausible(good: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return good


def execute_requests(field: Callable[[st.SearchStrategy[str]], st.SearchStrategy[str]]) -> Any:
    return st.builds(
        lambda action_id, rec, has_record, inputs, key: gateway_pb2.ExecuteActionRequest(
            action_id=action_id,
            record=rec if has_record else None,
            inputs=inputs,
            idempotency_key=key,
        ),
        field(st.sampled_from(["workitem.retry", "workitem.reprocess_email", "nope.nothing"])),
        records(field),
        st.booleans(),
        st.dictionaries(field(st.sampled_from(["reason", "priority"])), INPUT_VALUES, max_size=40),
        # Unique keys: a repeat would only be an idempotent replay (or ALREADY_EXISTS).
        field(st.uuids().map(lambda u: u.hex)),
    )


# Valid requests for one of the test's own work items: they run (and succeed, or are
# REJECTED by the provider once an item is no longer failed).
VALID_EXECUTE_REQUESTS = st.builds(
    lambda rec, reason, key: gateway_pb2.ExecuteActionRequest(
        action_id="workitem.retry",
        record=rec,
        inputs={"reason": common_pb2.InputValue(string_value=reason)},
        idempotency_key=key,
    ),
    st.builds(
        common_pb2.RecordContext,
        tenant=st.just("acme"),
        type=st.just("workitem"),
        id=st.sampled_from(PROPERTY_ITEMS),
        status=st.just("failed"),
        attributes=st.dictionaries(st.sampled_from(["queue", "region"]), st.just("billing")),
    ),
    st.text(
        st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=3, max_size=200
    ),
    st.uuids().map(lambda u: u.hex),
)


# Requests that pass the limits (and run, or are refused by policy or the provider),
# requests with some fields anything at all, and requests with every field anything.
EXECUTE_REQUESTS = st.one_of(
    VALID_EXECUTE_REQUESTS,
    execute_requests(plausible),
    execute_requests(maybe),
    execute_requests(lambda _: ANY_TEXT),
)
DISCOVER_REQUESTS = st.builds(
    lambda rec, has_record, skip: gateway_pb2.DiscoverActionsRequest(
        record=rec if has_record else None, skip_cache=skip
    ),
    st.one_of(records(plausible), records(maybe), records(lambda _: ANY_TEXT)),
    st.one_of(st.just(True), st.booleans()),
    st.booleans(),
)
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def sync_channel(mesh: Mesh) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        yield channel


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def assert_gateway_still_serving(mesh: Mesh, channel: grpc.Channel) -> None:
    assert "gateway" not in mesh.dead_services()
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_generated_execute_requests_never_fail_the_gateway(
    mesh: Mesh, sync_channel: grpc.Channel, token: TokenFactory, property_items: object
) -> None:
    stub = gateway_pb2_grpc.ActionGatewayServiceStub(sync_channel)
    metadata = bearer(token())
    seen: set[grpc.StatusCode] = set()

    @PROPERTY_SETTINGS
    @given(request=EXECUTE_REQUESTS)
    def execute(request: gateway_pb2.ExecuteActionRequest) -> None:
        code = code_of(
            lambda: stub.ExecuteAction(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        )
        seen.add(code)
        assert code in ALLOWED_CODES

    execute()
    # The generator reached past the validator (executions ran), not only into refusals.
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen
    assert_gateway_still_serving(mesh, sync_channel)


def test_generated_discover_requests_never_fail_the_gateway(
    mesh: Mesh, sync_channel: grpc.Channel, token: TokenFactory, property_items: object
) -> None:
    stub = gateway_pb2_grpc.ActionGatewayServiceStub(sync_channel)
    metadata = bearer(token())
    seen: set[grpc.StatusCode] = set()

    @PROPERTY_SETTINGS
    @given(request=DISCOVER_REQUESTS)
    def discover(request: gateway_pb2.DiscoverActionsRequest) -> None:
        code = code_of(
            lambda: stub.DiscoverActions(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        )
        seen.add(code)
        assert code in ALLOWED_CODES

    discover()
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen
    assert_gateway_still_serving(mesh, sync_channel)


def test_generated_bytes_never_fail_the_gateway(
    mesh: Mesh, sync_channel: grpc.Channel, token: TokenFactory
) -> None:
    metadata = bearer(token())
    calls = [
        sync_channel.unary_unary(f"/actionmesh.v1.ActionGatewayService/{method}")
        for method in ("ExecuteAction", "DiscoverActions")
    ]

    @settings(PROPERTY_SETTINGS, max_examples=60)
    @given(payload=st.binary(max_size=512), which=st.integers(0, 1))
    def send(payload: bytes, which: int) -> None:
        code = code_of(lambda: calls[which](payload, metadata=metadata, timeout=CALL_TIMEOUT_S))
        assert code in ALLOWED_CODES

    send()
    assert_gateway_still_serving(mesh, sync_channel)
