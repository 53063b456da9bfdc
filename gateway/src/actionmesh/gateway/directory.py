"""The gateway's live view of the providers, fed by RegistryService.WatchProviders.

The view survives registry outages: when the stream breaks, the gateway keeps
serving from the last view and resubscribes with capped backoff; the snapshot
that starts each subscription replaces the view wholesale.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
import grpc.aio

from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.supervisor import SupervisedLoop, Supervisor
from actionmesh.rpc.tls import TlsConfig
from actionmesh.v1 import (
    common_pb2,
    provider_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProviderEntry:
    """One provider as the gateway knows it."""

    registration: registry_pb2.ProviderRegistration

    @property
    def provider_id(self) -> str:
        return self.registration.provider_id

    @property
    def not_serving(self) -> bool:
        return self.registration.health == registry_pb2.PROVIDER_HEALTH_NOT_SERVING

    def handles(self, record_type: str) -> bool:
        return any(record_type in a.record_types for a in self.registration.actions)

    def action(self, action_id: str) -> common_pb2.ActionDescriptor | None:
        for descriptor in self.registration.actions:
            if descriptor.action_id == action_id:
                return descriptor
        return None


class ProviderDirectory:
    """Providers by id and by action id, plus one reusable channel per endpoint."""

    def __init__(
        self,
        registry_address: str,
        *,
        tls: TlsConfig | None = None,
        retire_grace_s: float = 0.0,
    ) -> None:
        """``retire_grace_s``: how long the calls in flight on a provider that left (or
        moved) may still run before its channel is closed under them: the longest
        dispatch, so a provider that shuts down gracefully can answer what it started."""
        self._registry_address = registry_address
        self._retire_grace_s = retire_grace_s
        # Registry and provider channels alike: the gateway's certificate and CA.
        self._tls = tls
        self._providers: dict[str, ProviderEntry] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._synced = asyncio.Event()
        self._loop: SupervisedLoop | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._retired: set[grpc.aio.Channel] = set()
        # Record type -> the provider that is its system of record (registered now), and
        # every source this gateway has seen: a type whose source left is not left to
        # its callers' word (see departed_source).
        self._sources: dict[str, str] = {}
        self._known_sources: dict[str, str] = {}

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Watch the registry, as a loop of ``supervisor`` (a private one by default)."""
        supervisor = supervisor or Supervisor("provider directory")
        self._loop = supervisor.spawn("provider-watch", self._watch_forever)

    async def wait_synced(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            await loop.stop()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        # Retired channels still waiting out their grace: the executor has drained by now.
        retired = list(self._retired)
        for closing in list(self._closing):
            closing.cancel()
        for channel in retired:
            await channel.close()
        self._retired.clear()

    def entries(self) -> list[ProviderEntry]:
        """Every provider the directory knows, healthy or not."""
        return list(self._providers.values())

    def provider(self, provider_id: str) -> ProviderEntry | None:
        """The registered provider ``provider_id``, if any."""
        return self._providers.get(provider_id)

    def providers_for(self, record_type: str) -> list[ProviderEntry]:
        return [p for p in self._providers.values() if p.handles(record_type)]

    def record_source(self, record_type: str) -> ProviderEntry | None:
        """The provider that is the system of record of ``record_type``, if one is registered."""
        provider_id = self._sources.get(record_type)
        return self._providers.get(provider_id) if provider_id is not None else None

    def departed_source(self, record_type: str) -> str:
        """The provider that was the system of record of ``record_type`` and is no longer
        registered ('' if the type has a source now or never had one while this gateway
        ran): its records' facts are unavailable, not the caller's to state."""
        if record_type in self._sources:
            return ""
        return self._known_sources.get(record_type, "")

    def find_action(
        self, action_id: str
    ) -> tuple[ProviderEntry, common_pb2.ActionDescriptor] | None:
        for entry in self._providers.values():
            descriptor = entry.action(action_id)
            if descriptor is not None:
                return entry, descriptor
        return None

    def stub(self, entry: ProviderEntry) -> provider_pb2_grpc.ActionProviderServiceStub:
        endpoint = entry.registration.endpoint
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = open_channel(endpoint, self._tls)
            self._channels[endpoint] = channel
        return provider_pb2_grpc.ActionProviderServiceStub(channel)

    async def _watch_forever(self, loop: SupervisedLoop) -> None:
        """Follow the registry; its outages are expected (serve the last view, resubscribe),
        anything else fails the loop for its supervisor to restart."""
        backoff = 0.1
        while True:
            try:
                async with open_channel(self._registry_address, self._tls) as channel:
                    stub = registry_pb2_grpc.RegistryServiceStub(channel)
                    async for message in stub.WatchProviders(registry_pb2.WatchProvidersRequest()):
                        self._apply(message)
                        loop.progress()
                        backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "registry watch interrupted (%s); serving from the last view", exc.code().name
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _apply(self, message: registry_pb2.WatchProvidersResponse) -> None:
        kind = message.WhichOneof("event")
        if kind == "snapshot":
            fresh = {p.provider_id: ProviderEntry(p) for p in message.snapshot.providers}
            for gone in set(self._providers) - set(fresh):
                self._forget_channel(self._providers[gone])
            self._providers = fresh
            self._synced.set()
        elif kind == "change":
            change = message.change
            provider_id = change.provider.provider_id
            previous = self._providers.get(provider_id)
            if change.type == registry_pb2.PROVIDER_CHANGE_TYPE_REMOVED:
                self._providers.pop(provider_id, None)
                if previous is not None:
                    self._forget_channel(previous)
            else:
                if (
                    previous is not None
                    and previous.registration.endpoint != change.provider.endpoint
                ):
                    self._forget_channel(previous)
                self._providers[provider_id] = ProviderEntry(change.provider)
        self._index_sources()

    def _index_sources(self) -> None:
        self._sources = {
            record_type: entry.provider_id
            for entry in self._providers.values()
            for record_type in entry.registration.record_sources
        }
        self._known_sources.update(self._sources)

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        try:
            await channel.close(grace=self._retire_grace_s)
        finally:
            self._retired.discard(channel)

    def _forget_channel(self, entry: ProviderEntry) -> None:
        endpoint = entry.registration.endpoint
        if any(
            p.registration.endpoint == endpoint for p in self._providers.values() if p is not entry
        ):
            return
        channel = self._channels.pop(endpoint, None)
        if channel is not None:
            # Closing cancels the calls still on the channel: let them finish first.
            self._retired.add(channel)
            closing = asyncio.create_task(self._retire(channel))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
