"""Traces an SRE can follow, and metrics for Prometheus.

A small OTLP/gRPC receiver (the opentelemetry-proto TraceService) listens on
loopback; a mesh of real processes exports to it with the standard
OTEL_EXPORTER_OTLP_* variables. A caller starts its own span, calls the gateway
with the trace context, and the test follows the trace across processes:
caller -> gateway (authn, policy, dispatch) -> provider (server span, handler)
-> audit log (audit.store under the span the event names), plus the shipper's
audit.ship span linking back to the execution. The gateway's /metrics is
scraped over HTTP like Prometheus does.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.proto.trace.v1 import trace_pb2 as otlp_trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from actionmesh.gateway.auth import mint_token
from actionmesh.mesh import Mesh, MeshSettings
from actionmesh.rpc import telemetry
from actionmesh.rpc.telemetry import (
    TracingConfigError,
    build_tracer_provider,
    current_trace_ids,
    exporter_choice,
    shutdown_tracing,
)
from actionmesh.runtime.db import sqlite_url
from actionmesh.v1 import audit_pb2, audit_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import TEST_MESH, bearer, eventually
from tests.otlp import Collected, Receiver, running_receiver

SERVER = otlp_trace.Span.SPAN_KIND_SERVER
CLIENT = otlp_trace.Span.SPAN_KIND_CLIENT
GATEWAY = "actionmesh-gateway"
WORKITEMS = "actionmesh-provider-workitems"
AUDITLOG = "actionmesh-auditlog"
TEST_HEADER = ("x-actionmesh-test", "telemetry")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with running_receiver() as collector:
        yield collector


def otlp_env(receiver: Receiver, schedule_delay_ms: int = 100) -> dict[str, str]:
    """What an SRE sets: the standard OTLP variables, plain text to a loopback collector."""
    return {
        "ACTIONMESH_TRACE_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_EXPORTER_OTLP_HEADERS": "=".join(TEST_HEADER),
        "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms),
    }


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Mesh]:
    extra_env = {
        **TEST_MESH["extra_env"],  # type: ignore[dict-item]
        **otlp_env(receiver),
        "ACTIONMESH_GATEWAY_METRICS_PORT": "0",
        "ACTIONMESH_AUDITLOG_METRICS_PORT": "0",
        "ACTIONMESH_REGISTRY_METRICS_PORT": "0",
    }
    settings = {**TEST_MESH, "extra_env": extra_env}
    mesh = Mesh(MeshSettings(data_dir=tmp_path_factory.mktemp("traced"), **settings))  # type: ignore[arg-type]
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


# -- the caller ----------------------------------------------------------------

# The caller's own SDK, not installed globally: its spans only need ids here.
caller_tracer = TracerProvider().get_tracer("tests.caller")


@dataclass(frozen=True)
class CallerSpan:
    trace_id: str
    span_id: str
    metadata: tuple[tuple[str, str], ...]


def token_for(mesh: Mesh) -> str:
    return mint_token(mesh.signing_key(), subject="alice", tenant="acme", roles=("operator",))


async def call_in_span(mesh: Mesh, method: str, request: Any) -> tuple[Any, CallerSpan]:
    """Call the gateway from inside a caller span, propagating W3C trace context."""
    with caller_tracer.start_as_current_span("caller", kind=trace.SpanKind.CLIENT) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        context = span.get_span_context()
        caller = CallerSpan(
            format(context.trace_id, "032x"),
            format(context.span_id, "016x"),
            (*bearer(token_for(mesh)), *carrier.items()),
        )
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.ActionGatewayServiceStub(channel)
            reply = await getattr(stub, method)(request, metadata=caller.metadata, timeout=10)
    return reply, caller


def execute_request(item_id: str, status: str) -> gateway_pb2.ExecuteActionRequest:
    return gateway_pb2.ExecuteActionRequest(
        action_id="workitem.retry",
        record=common_pb2.RecordContext(tenant="acme", type="workitem", id=item_id, status=status),
        inputs={"reason": common_pb2.InputValue(string_value="parser fixed")},
        idempotency_key=uuid.uuid4().hex,
    )


async def spans_of_trace(
    receiver: Receiver, trace_id: str, required: set[tuple[str, str]]
) -> list[Collected]:
    """The trace's spans once every (service, span name) required has arrived (bounded)."""

    def arrived() -> list[Collected]:
        spans = receiver.where(trace_id=trace_id)
        return spans if required <= {(s.service, s.name) for s in spans} else []

    return cast(list[Collected], await eventually(arrived, timeout_s=20))


def one(spans: list[Collected], what: str) -> Collected:
    assert len(spans) == 1, f"expected one {what}, got {len(spans)}: {spans}"
    return spans[0]


def assert_rpc(span: Collected, service: str, method: str) -> None:
    """The OpenTelemetry RPC conventions, from the grpc instrumentation."""
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.service"] == service
    assert span.attributes["rpc.method"] == method
    assert span.attributes["rpc.grpc.status_code"] == 0


# -- one trace across the mesh ----------------------------------------------------


async def test_one_trace_from_caller_to_provider_to_audit_write(
    traced_mesh: Mesh, receiver: Receiver
) -> None:
    reply, caller = await call_in_span(
        traced_mesh, "ExecuteAction", execute_request("wi-1001", "failed")
    )
    execution = reply.execution
    assert execution.outcome == common_pb2.OUTCOME_SUCCEEDED
    # The trace id the audit evidence names is the caller's trace.
    assert execution.trace_id == caller.trace_id

    def stored() -> list[Collected]:
        spans = [
            s
            for s in receiver.where(service=AUDITLOG, name="audit.store")
            if s.attributes.get("actionmesh.execution_id") == execution.execution_id
        ]
        return spans if len(spans) >= 2 else []

    store_spans = cast(list[Collected], await eventually(stored, timeout_s=20))
    trace_spans = await spans_of_trace(
        receiver,
        caller.trace_id,
        {
            (GATEWAY, "/actionmesh.v1.ActionGatewayService/ExecuteAction"),
            (GATEWAY, "auth.authenticate"),
            (GATEWAY, "policy.authorize"),
            (GATEWAY, "execute.dispatch"),
            (GATEWAY, "/actionmesh.v1.ActionProviderService/Execute"),
            (WORKITEMS, "/actionmesh.v1.ActionProviderService/Execute"),
            (WORKITEMS, "action.handle"),
        },
    )

    def named(service: str, name: str, **match: Any) -> list[Collected]:
        return [
            s
            for s in trace_spans
            if s.service == service
            and s.name == name
            and all(getattr(s, k) == v for k, v in match.items())
        ]

    # The gateway's server span continues the caller's span and names the execution.
    server = one(
        named(GATEWAY, "/actionmesh.v1.ActionGatewayService/ExecuteAction", kind=SERVER),
        "gateway server span",
    )
    assert server.parent_id == caller.span_id
    assert_rpc(server, "actionmesh.v1.ActionGatewayService", "ExecuteAction")
    assert server.attributes["actionmesh.action_id"] == "workitem.retry"
    assert server.attributes["actionmesh.provider_id"] == "workitems"
    assert server.attributes["actionmesh.tenant"] == "acme"
    assert server.attributes["actionmesh.record.type"] == "workitem"
    assert server.attributes["actionmesh.execution_id"] == execution.execution_id
    assert server.attributes["actionmesh.outcome"] == "SUCCEEDED"

    authn = one(named(GATEWAY, "auth.authenticate"), "authentication span")
    assert authn.parent_id == server.span_id
    assert authn.attributes["actionmesh.tenant"] == "acme"

    policy = one(named(GATEWAY, "policy.authorize"), "policy span")
    assert policy.parent_id == server.span_id
    assert policy.attributes["actionmesh.policy.operation"] == "execute"
    assert policy.attributes["actionmesh.action_id"] == "workitem.retry"
    assert policy.attributes["actionmesh.policy.allowed"] == 1
    assert policy.attributes["actionmesh.policy.ids"]

    dispatch = one(named(GATEWAY, "execute.dispatch"), "dispatch span")
    assert dispatch.parent_id == server.span_id
    assert dispatch.attributes["actionmesh.outcome"] == "SUCCEEDED"
    assert dispatch.attributes["actionmesh.execution_id"] == execution.execution_id
    assert dispatch.attributes["actionmesh.provider_id"] == "workitems"

    # gateway -> provider: a client span whose context the provider's server span continues.
    client = one(
        named(GATEWAY, "/actionmesh.v1.ActionProviderService/Execute", kind=CLIENT),
        "gateway->provider client span",
    )
    assert client.parent_id == dispatch.span_id
    assert_rpc(client, "actionmesh.v1.ActionProviderService", "Execute")
    provider_server = one(
        named(WORKITEMS, "/actionmesh.v1.ActionProviderService/Execute", kind=SERVER),
        "provider server span",
    )
    assert provider_server.parent_id == client.span_id
    assert_rpc(provider_server, "actionmesh.v1.ActionProviderService", "Execute")

    handler = one(named(WORKITEMS, "action.handle"), "provider handler span")
    assert handler.parent_id == provider_server.span_id
    assert handler.attributes == {
        "actionmesh.provider_id": "workitems",
        "actionmesh.action_id": "workitem.retry",
        "actionmesh.tenant": "acme",
        "actionmesh.execution_id": execution.execution_id,
        "actionmesh.record.type": "workitem",
        "actionmesh.outcome": "SUCCEEDED",
    }

    # The audit write joins the execution's trace under the span each event names:
    # STARTED was written in the gateway's server span, FINISHED in the dispatch span.
    by_type = {s.attributes["actionmesh.audit.event_type"]: s for s in store_spans}
    assert by_type["EXECUTION_STARTED"].parent_id == server.span_id
    assert by_type["EXECUTION_FINISHED"].parent_id == dispatch.span_id
    assert by_type["EXECUTION_FINISHED"].attributes["actionmesh.outcome"] == "SUCCEEDED"
    for span in store_spans:
        assert span.trace_id == caller.trace_id
        assert span.attributes["actionmesh.action_id"] == "workitem.retry"
        assert span.attributes["actionmesh.tenant"] == "acme"
        # ... and links to the AppendEvents call that delivered the event; the delivery
        # is a trace of its own: gateway audit.ship -> client span -> audit log server.
        (append_link,) = span.links
        delivery = await spans_of_trace(
            receiver,
            append_link[0],
            {
                (GATEWAY, "audit.ship"),
                (GATEWAY, "/actionmesh.v1.AuditService/AppendEvents"),
                (AUDITLOG, "/actionmesh.v1.AuditService/AppendEvents"),
            },
        )
        append = one(
            [s for s in delivery if s.span_id == append_link[1] and s.kind == SERVER],
            "AppendEvents server span",
        )
        assert append.service == AUDITLOG
        assert_rpc(append, "actionmesh.v1.AuditService", "AppendEvents")
        assert append.trace_id != caller.trace_id
        append_client = one(
            [s for s in delivery if s.span_id == append.parent_id and s.kind == CLIENT],
            "AppendEvents client span",
        )
        assert append_client.service == GATEWAY
        ship = one(
            [s for s in delivery if s.span_id == append_client.parent_id],
            "the client span's parent",
        )
        assert (ship.service, ship.name) == (GATEWAY, "audit.ship")
        assert ship.parent_id == ""  # a root: batches mix executions
        assert (caller.trace_id, span.parent_id) in ship.links

    # Every process exported with the configured OTLP headers.
    with receiver.lock:
        assert all(h.get(TEST_HEADER[0]) == TEST_HEADER[1] for h in receiver.headers)
    services = {s.service for s in trace_spans}
    assert {GATEWAY, WORKITEMS, AUDITLOG} <= services


async def test_discover_fans_out_one_child_span_per_provider(
    traced_mesh: Mesh, receiver: Receiver
) -> None:
    request = gateway_pb2.DiscoverActionsRequest(
        record=common_pb2.RecordContext(
            tenant="acme", type="workitem", id="wi-1002", status="stuck"
        ),
        skip_cache=True,
    )
    reply, caller = await call_in_span(traced_mesh, "DiscoverActions", request)
    assert not reply.degraded_providers
    answered = {a.provider_id for a in reply.actions}
    assert "workitems" in answered

    def fan_out() -> list[Collected]:
        return receiver.where(trace_id=caller.trace_id, name="discover.fan_out")

    fan = one(cast(list[Collected], await eventually(fan_out, timeout_s=10)), "fan-out span")
    asked = fan.attributes["actionmesh.discover.providers"]
    assert answered <= set(asked)

    def provider_servers() -> list[Collected]:
        spans = [
            s
            for s in receiver.where(trace_id=caller.trace_id, kind=SERVER)
            if s.name == "/actionmesh.v1.ActionProviderService/Discover"
        ]
        return spans if len(spans) == len(asked) else []

    servers = cast(list[Collected], await eventually(provider_servers, timeout_s=10))
    children = receiver.where(trace_id=caller.trace_id, parent_id=fan.span_id)
    assert sorted(c.attributes["actionmesh.provider_id"] for c in children) == sorted(asked)
    assert {c.name for c in children} == {"discover.provider"}
    for child in children:
        provider_id = child.attributes["actionmesh.provider_id"]
        client = one(
            receiver.where(trace_id=caller.trace_id, parent_id=child.span_id, kind=CLIENT),
            f"Discover client span for {provider_id}",
        )
        assert_rpc(client, "actionmesh.v1.ActionProviderService", "Discover")
        server = one(
            [s for s in servers if s.parent_id == client.span_id],
            f"{provider_id}'s Discover server span",
        )
        assert server.service == f"actionmesh-provider-{provider_id}"


# -- metrics -----------------------------------------------------------------------


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name from a Prometheus text exposition, as a scraper reads it."""
    response = httpx.get(url, timeout=5.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        v for found, v in samples.get(name, []) if all(found.get(k) == x for k, x in labels.items())
    )


def ready_info(mesh: Mesh, name: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((mesh.data_dir / "run" / f"{name}.json").read_text())
    return info


async def test_gateway_metrics_are_scraped_over_http(traced_mesh: Mesh) -> None:
    info = ready_info(traced_mesh, "gateway")
    url = info["metrics_url"]
    assert url == f"http://127.0.0.1:{info['metrics_port']}/metrics"
    assert traced_mesh.services["gateway"].metrics_url == url

    labels = {"action_id": "workitem.retry", "provider_id": "workitems", "outcome": "REJECTED"}
    before = scrape(url)
    # wi-1003 is processed: the provider rejects a retry every time (NOT_FAILED).
    for _ in range(2):
        reply, _ = await call_in_span(
            traced_mesh, "ExecuteAction", execute_request("wi-1003", "processed")
        )
        assert reply.execution.outcome == common_pb2.OUTCOME_REJECTED
    after = scrape(url)

    assert value(after, "actionmesh_executions_total", **labels) - value(
        before, "actionmesh_executions_total", **labels
    ) == pytest.approx(2)
    duration = {"action_id": "workitem.retry", "outcome": "REJECTED"}
    assert value(after, "actionmesh_execution_duration_seconds_count", **duration) - value(
        before, "actionmesh_execution_duration_seconds_count", **duration
    ) == pytest.approx(2)
    buckets = {
        s[0]["le"]: s[1]
        for s in after["actionmesh_execution_duration_seconds_bucket"]
        if all(s[0].get(k) == v for k, v in duration.items())
    }
    assert {"0.005", "0.1", "1.0", "60.0", "+Inf"} <= set(buckets)
    assert buckets["+Inf"] == value(
        after, "actionmesh_execution_duration_seconds_count", **duration
    )
    # Two loopback round trips: well under the 10 s bucket.
    assert buckets["10.0"] == buckets["+Inf"]
    assert value(after, "actionmesh_execution_duration_seconds_sum", **duration) > 0

    # The provider view and the outbox, as gauges (the outbox drains to 0).
    assert value(after, "actionmesh_provider_healthy", provider_id="workitems") == 1

    def outbox_empty() -> bool:
        samples = scrape(url)
        return "actionmesh_audit_outbox_depth" in samples and (
            value(samples, "actionmesh_audit_outbox_depth") == 0
        )

    await eventually(outbox_empty, timeout_s=10)

    # Discovery latency.
    await call_in_span(
        traced_mesh,
        "DiscoverActions",
        gateway_pb2.DiscoverActionsRequest(
            record=common_pb2.RecordContext(
                tenant="acme", type="workitem", id="wi-1003", status="processed"
            )
        ),
    )
    assert (
        value(scrape(url), "actionmesh_discover_duration_seconds_count", record_type="workitem")
        >= 1
    )


async def test_auditlog_and_registry_metrics(traced_mesh: Mesh) -> None:
    await call_in_span(traced_mesh, "ExecuteAction", execute_request("wi-1003", "processed"))
    audit_url = ready_info(traced_mesh, "auditlog")["metrics_url"]

    def audit_stored() -> float:
        return value(scrape(audit_url), "actionmesh_audit_events_stored_total")

    assert await eventually(audit_stored, timeout_s=10)
    assert "actionmesh_audit_events_duplicates_total" in scrape(audit_url)

    registry_url = ready_info(traced_mesh, "registry")["metrics_url"]

    def all_serving() -> bool:
        samples = scrape(registry_url)
        return (
            value(samples, "actionmesh_registry_providers", health="serving") == 3
            and value(samples, "actionmesh_registry_providers", health="not_serving") == 0
        )

    await eventually(all_serving, timeout_s=10)


# -- graceful shutdown flushes -----------------------------------------------------


def test_sigterm_flushes_spans_still_queued(tmp_path: Path, receiver: Receiver) -> None:
    """A batch delay of 10 minutes: the spans can only arrive through the shutdown flush."""
    ready = tmp_path / "auditlog.json"
    env = {**os.environ, **otlp_env(receiver, schedule_delay_ms=600_000)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "actionmesh.auditlog",
            "--port",
            "0",
            "--database-url",
            sqlite_url(tmp_path / "audit.db"),
            "--ready-file",
            str(ready),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert process.poll() is None, "auditlog exited early"
            assert time.monotonic() < deadline, "auditlog did not start"
            time.sleep(0.05)
        address = json.loads(ready.read_text())["address"]
        trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        event = audit_pb2.AuditEvent(
            event_id=uuid.uuid4().hex,
            type=audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
            tenant="acme",
            record=common_pb2.RecordRef(type="workitem", id="wi-9"),
            actor="alice",
            execution_id="exec-flush",
            trace_id=trace_id,
            span_id=span_id,
        )
        event.occurred_at.GetCurrentTime()
        with grpc.insecure_channel(address) as channel:
            reply = audit_pb2_grpc.AuditServiceStub(channel).AppendEvents(
                audit_pb2.AppendEventsRequest(events=[event]), timeout=10
            )
        assert reply.stored == 1
        time.sleep(0.5)
        assert receiver.where(trace_id=trace_id) == []  # still queued in the process
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    (stored,) = receiver.where(trace_id=trace_id, name="audit.store")
    assert stored.parent_id == span_id
    assert stored.attributes["actionmesh.execution_id"] == "exec-flush"


# -- exporter configuration (unit) ---------------------------------------------------


def test_exporter_choice_defaults_and_standard_variable() -> None:
    assert exporter_choice(env={}) == "none"
    assert exporter_choice(env={"OTEL_TRACES_EXPORTER": "console"}) == "console"
    # The actionmesh variable wins over the SDK's own.
    assert (
        exporter_choice(
            env={"ACTIONMESH_TRACE_EXPORTER": "OTLP", "OTEL_TRACES_EXPORTER": "console"}
        )
        == "otlp"
    )
    assert exporter_choice("none", env={"ACTIONMESH_TRACE_EXPORTER": "otlp"}) == "none"


def test_unknown_exporter_is_a_clear_error() -> None:
    with pytest.raises(TracingConfigError) as raised:
        exporter_choice(env={"ACTIONMESH_TRACE_EXPORTER": "jaeger"})
    message = str(raised.value)
    assert "'jaeger'" in message and "ACTIONMESH_TRACE_EXPORTER" in message
    assert "none, console, otlp" in message
    with pytest.raises(ValueError, match="unknown trace exporter 'zipkin'"):
        build_tracer_provider("svc", "zipkin")


def test_console_exporter_prints_spans() -> None:
    out = io.StringIO()
    provider = build_tracer_provider("actionmesh-test", "console", console_out=out)
    with provider.get_tracer("tests").start_as_current_span(
        "console.check", attributes={"actionmesh.action_id": "workitem.retry"}
    ):
        pass
    provider.shutdown()
    printed = json.loads(out.getvalue())
    assert printed["name"] == "console.check"
    assert printed["attributes"] == {"actionmesh.action_id": "workitem.retry"}
    assert printed["resource"]["attributes"]["service.name"] == "actionmesh-test"


def test_otlp_exporter_reads_the_standard_variables(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, val in otlp_env(receiver).items():
        monkeypatch.setenv(key, val)
    provider = build_tracer_provider("actionmesh-unit")
    with provider.get_tracer("tests").start_as_current_span("otlp.check") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
    assert provider.force_flush()
    provider.shutdown()
    (received,) = receiver.where(trace_id=trace_id)
    assert (received.service, received.name) == ("actionmesh-unit", "otlp.check")


def test_shutdown_is_bounded_when_the_collector_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")
    provider = build_tracer_provider("actionmesh-unit", "otlp")
    with provider.get_tracer("tests").start_as_current_span("lost"):
        pass
    monkeypatch.setattr(telemetry, "_installed", provider)
    started = time.monotonic()
    shutdown_tracing(timeout_s=1.0)
    assert time.monotonic() - started < 3.0
    assert telemetry._installed is None


def test_without_an_exporter_spans_keep_their_ids_but_record_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    provider = build_tracer_provider("actionmesh-unit", "none")
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("outer") as outer:
        with tracer.start_as_current_span("inner") as inner:
            ids = current_trace_ids()
    assert not outer.is_recording() and not inner.is_recording()
    assert ids[0] == format(outer.get_span_context().trace_id, "032x") != "0" * 32
    assert inner.get_span_context().trace_id == outer.get_span_context().trace_id
    # An operator who wants spans anyway (say, for an in-process processor) can sample.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    sampled = build_tracer_provider("actionmesh-unit", "none").get_tracer("tests")
    with sampled.start_as_current_span("kept") as kept:
        assert kept.is_recording()
