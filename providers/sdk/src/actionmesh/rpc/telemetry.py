"""OpenTelemetry tracing shared by every process.

Each service calls :func:`configure_tracing` once at start and
:func:`shutdown_tracing` after its drain (``run_service`` does), so spans still
queued are flushed before the process exits. The exporter is chosen by
``ACTIONMESH_TRACE_EXPORTER`` (or the standard ``OTEL_TRACES_EXPORTER``):

- ``none`` (default): spans are still created, so trace ids exist, propagate
  and land in audit records; nothing is exported.
- ``console``: spans are printed as JSON on stdout (the service's log).
- ``otlp``: OTLP/gRPC to a collector. The endpoint, headers, TLS and timeout come
  from the standard variables SREs already use: ``OTEL_EXPORTER_OTLP_ENDPOINT``
  or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (``http://host:4317`` is plain text,
  ``https://`` is TLS), ``OTEL_EXPORTER_OTLP_HEADERS``,
  ``OTEL_EXPORTER_OTLP_INSECURE``, ``OTEL_EXPORTER_OTLP_TIMEOUT``; batching from
  ``OTEL_BSP_*`` and sampling from ``OTEL_TRACES_SAMPLER``.

Recording and exporting spans needs the OpenTelemetry SDK and the gRPC
instrumentation (the SDK distribution's ``otel`` extra; every platform service has
it). Without them, as in a provider installed from ``actionmesh-sdk`` alone, the
exporter must be ``none``: :func:`server_interceptors` and :func:`client_interceptors`
then carry the W3C trace context through the OpenTelemetry API alone, so trace ids
still reach handlers, logs and audit records.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib.util import find_spec
from typing import IO, TYPE_CHECKING, Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanContext, TraceFlags

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

EXPORTER_ENV = "ACTIONMESH_TRACE_EXPORTER"
# The SDK's own variable, honoured when the actionmesh one is not set.
STANDARD_EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
EXPORTERS = ("none", "console", "otlp")
SERVICE_NAMESPACE = "actionmesh"
# How long a stopping process waits for its last spans to reach the exporter.
DEFAULT_FLUSH_TIMEOUT_S = 5.0

# The SDK's ``otel`` extra: span recording/export and the gRPC instrumentation.
HAVE_OTEL_SDK = (
    find_spec("opentelemetry.sdk") is not None
    and find_spec("opentelemetry.instrumentation.grpc") is not None
)
OTEL_EXTRA_HINT = "install actionmesh-sdk[otel] (OpenTelemetry SDK and gRPC instrumentation)"

_installed: TracerProvider | None = None


class TracingConfigError(ValueError):
    """The trace exporter configuration cannot be used."""


def exporter_choice(exporter: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The exporter to use: the argument, else the environment, else ``none``."""
    env = os.environ if env is None else env
    raw = exporter or env.get(EXPORTER_ENV) or env.get(STANDARD_EXPORTER_ENV) or "none"
    choice = raw.strip().lower()
    if choice not in EXPORTERS:
        source = (
            "the argument"
            if exporter
            else (EXPORTER_ENV if env.get(EXPORTER_ENV) else STANDARD_EXPORTER_ENV)
        )
        raise TracingConfigError(
            f"unknown trace exporter {raw!r} (from {source}); use one of: {', '.join(EXPORTERS)}"
        )
    return choice


def build_tracer_provider(
    service_name: str,
    exporter: str | None = None,
    *,
    console_out: IO[str] | None = None,
) -> TracerProvider:
    """A tracer provider for ``service_name`` exporting as configured (not installed)."""
    choice = exporter_choice(exporter)
    if not HAVE_OTEL_SDK:
        raise TracingConfigError(
            f"trace exporter {choice!r} needs the OpenTelemetry SDK: " + OTEL_EXTRA_HINT
        )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    # Spans nobody exports are not worth recording (the audit log made one per stored
    # event), but their ids are: executions and audit events carry the trace id, and
    # the context still propagates. ALWAYS_OFF keeps the ids and records nothing,
    # unless OTEL_TRACES_SAMPLER asks for something else.
    unexported = choice == "none" and not os.environ.get("OTEL_TRACES_SAMPLER")
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": service_name, "service.namespace": SERVICE_NAMESPACE}
        ),
        sampler=ALWAYS_OFF if unexported else None,
    )
    if choice == "console":
        provider.add_span_processor(
            BatchSpanProcessor(ConsoleSpanExporter(service_name=service_name, out=console_out))
            if console_out is not None
            else BatchSpanProcessor(ConsoleSpanExporter(service_name=service_name))
        )
    elif choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Endpoint, headers, TLS and timeout are read by the exporter from OTEL_EXPORTER_OTLP_*.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def configure_tracing(service_name: str, exporter: str | None = None) -> None:
    """Install the SDK tracer provider for this process (idempotent)."""
    global _installed
    if _installed is not None:
        return
    if not HAVE_OTEL_SDK and exporter_choice(exporter) == "none":
        # Nothing to record or export: the API alone propagates the context.
        log.debug("tracing for %s: OpenTelemetry API only (no SDK installed)", service_name)
        return
    provider = build_tracer_provider(service_name, exporter)
    trace.set_tracer_provider(provider)
    _installed = provider
    log.debug("tracing for %s exports to %s", service_name, exporter_choice(exporter))


def configure_process_tracing(service_name: str) -> None:
    """:func:`configure_tracing` for a binary: a bad setting exits with its message."""
    try:
        configure_tracing(service_name)
    except TracingConfigError as exc:
        raise SystemExit(f"{service_name}: {exc}") from None


def shutdown_tracing(timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S) -> bool:
    """Flush queued spans and stop exporting; bounded, so an absent collector cannot
    hold up a stopping process. True when the flush finished in time."""
    global _installed
    provider, _installed = _installed, None
    if provider is None:
        return True
    # The SDK's shutdown does not honour a timeout (an unreachable collector means
    # retries); a daemon thread lets the process leave regardless.
    worker = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("spans not flushed within %.1fs; the rest are dropped", timeout_s)
        return False
    return True


def untraced_rpcs() -> Callable[[Any], bool]:
    """The gRPC filter that keeps health checks and reflection out of traces (pure noise:
    the registry probes every provider every few seconds). Needs the ``otel`` extra."""
    from opentelemetry.instrumentation.grpc import filters

    keep: Callable[[Any], bool] = filters.negate(
        filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
    )
    return keep


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What a server adds for tracing: the gRPC instrumentation (spans per call) when
    installed, else the API-only context propagation."""
    if HAVE_OTEL_SDK:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(filter_=untraced_rpcs())]
    return [ContextServerInterceptor()]


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    """What a client channel adds for tracing (see :func:`server_interceptors`)."""
    if HAVE_OTEL_SDK:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors: Sequence[grpc.aio.ClientInterceptor] = aio_client_interceptors(
            filter_=untraced_rpcs()
        )
        return interceptors
    return [ContextClientInterceptor()]


class ContextServerInterceptor(grpc.aio.ServerInterceptor):
    """Unary calls run in the trace context the caller sent (``traceparent``), through
    the OpenTelemetry API alone: no span is recorded, the caller's ids are current."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        carrier = {
            key: value
            for key, value in (handler_call_details.invocation_metadata or ())
            if isinstance(value, str)
        }
        parent = propagate.extract(carrier)
        behaviour = handler.unary_unary

        async def in_context(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = otel_context.attach(parent)
            try:
                return await behaviour(request, context)
            finally:
                otel_context.detach(token)

        return handler._replace(unary_unary=in_context)


class ContextClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Unary calls carry the current trace context (``traceparent``) as metadata."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if carrier:
            metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
            for key, value in carrier.items():
                metadata.add(key, value)
            client_call_details = client_call_details._replace(metadata=metadata)
        return await continuation(client_call_details, request)


def current_trace_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as hex, or empty strings."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def span_context_from_ids(trace_id: str, span_id: str) -> SpanContext | None:
    """The remote span context that hex ids (as audit events carry them) name, if valid."""
    try:
        context = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    except ValueError:
        return None
    return context if context.is_valid else None


def link_to(trace_id: str, span_id: str) -> Link | None:
    """A span link to the span that hex ids name, or None when they name none."""
    context = span_context_from_ids(trace_id, span_id)
    return Link(context) if context is not None else None
