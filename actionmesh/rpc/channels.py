"""Client channels with OpenTelemetry propagation, shared by services and the CLI."""

from __future__ import annotations

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel to a loopback/mesh peer, carrying trace context."""
    return grpc.aio.insecure_channel(
        target,
        interceptors=aio_client_interceptors(),
        options=[("grpc.enable_retries", 0)],
    )


async def check_health(target: str, timeout_s: float = 1.0, service: str = "") -> bool:
    """True when the peer answers grpc.health.v1 Check with SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
