"""grpc.health.v1 probes of provider endpoints, one reused channel per provider."""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.registry.model import Health
from actionmesh.rpc.tls import TlsConfig

log = logging.getLogger(__name__)


class GrpcHealthProber:
    """Asks each provider's Health/Check (service "") whether it is SERVING.

    Channels are plain (not OpenTelemetry-instrumented) on purpose: a probe every
    few seconds per provider would otherwise flood the trace store with noise.
    """

    def __init__(
        self, *, timeout_s: float, max_reconnect_backoff_s: float, tls: TlsConfig | None = None
    ) -> None:
        self._timeout_s = timeout_s
        # Read once: a probe every few seconds must not re-read the key files.
        self._credentials = tls.channel_credentials() if tls is not None and tls.enabled else None
        # gRPC's default reconnect backoff grows to 120 s, so a provider that came
        # back would look down for minutes; cap it near the check interval.
        backoff_ms = max(100, int(max_reconnect_backoff_s * 1000))
        self._options = [
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    async def probe(self, provider_id: str, endpoint: str) -> Health | None:
        """The provider's health, or None when the probe was abandoned locally.

        A probe is abandoned when its channel was closed under it (the provider
        was removed or moved); its failure says nothing about the provider.
        """
        channel = await self._channel(provider_id, endpoint)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._timeout_s
            )
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
            if self._current(provider_id) is not channel:
                return None
            log.debug("health check of %s at %s failed: %s", provider_id, endpoint, exc)
            return Health.NOT_SERVING
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return Health.SERVING
        return Health.NOT_SERVING

    async def forget(self, provider_id: str) -> None:
        """Close the provider's channel (removed, or about to move)."""
        entry = self._channels.pop(provider_id, None)
        if entry is not None:
            await entry[1].close()

    async def retain_only(self, provider_ids: set[str]) -> None:
        """Close channels of providers that are no longer registered."""
        for provider_id in [p for p in self._channels if p not in provider_ids]:
            await self.forget(provider_id)

    async def close(self) -> None:
        entries = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(*(channel.close() for _, channel in entries))

    def _current(self, provider_id: str) -> grpc.aio.Channel | None:
        entry = self._channels.get(provider_id)
        return entry[1] if entry else None

    async def _channel(self, provider_id: str, endpoint: str) -> grpc.aio.Channel:
        entry = self._channels.get(provider_id)
        if entry is not None and entry[0] == endpoint:
            return entry[1]
        # Install the new channel before awaiting the old one's close, so a
        # concurrent probe never sees (and duplicates) a missing entry.
        channel = (
            grpc.aio.secure_channel(endpoint, self._credentials, options=self._options)
            if self._credentials is not None
            else grpc.aio.insecure_channel(endpoint, options=self._options)
        )
        self._channels[provider_id] = (endpoint, channel)
        if entry is not None:
            await entry[1].close()
        return channel
