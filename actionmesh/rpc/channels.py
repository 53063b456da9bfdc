"""Client channels with OpenTelemetry propagation, shared by services and the CLI."""

from __future__ import annotations

import grpc.aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from actionmesh.rpc.telemetry import untraced_rpcs


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel to a loopback/mesh peer, carrying trace context."""
    return grpc.aio.insecure_channel(
        target,
        interceptors=aio_client_interceptors(filter_=untraced_rpcs()),
        options=[("grpc.enable_retries", 0)],
    )
