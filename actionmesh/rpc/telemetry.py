"""OpenTelemetry setup shared by every process.

Each service calls :func:`configure_tracing` once at start. The exporter is
chosen by config: ``none`` (spans are still created, so trace ids exist and
propagate), ``console``, or ``otlp`` (needs opentelemetry-exporter-otlp).
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

EXPORTER_ENV = "ACTIONMESH_TRACE_EXPORTER"
_configured = False


def configure_tracing(service_name: str, exporter: str | None = None) -> None:
    """Install the SDK tracer provider for this process (idempotent)."""
    global _configured
    if _configured:
        return
    choice = (exporter or os.environ.get(EXPORTER_ENV, "none")).lower()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if choice == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif choice != "none":
        raise ValueError(f"unknown trace exporter {choice!r}; use none, console or otlp")
    trace.set_tracer_provider(provider)
    _configured = True


def current_trace_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as hex, or empty strings."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
