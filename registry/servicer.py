"""RegistryService over gRPC: translates between the contract and the directory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import duration_pb2

from actionmesh.rpc.convert import to_timestamp
from actionmesh.v1 import registry_pb2, registry_pb2_grpc
from registry.directory import Directory
from registry.model import Change, ChangeType, Health, Provider, Registration

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name

_HEALTH = {
    Health.UNKNOWN: registry_pb2.PROVIDER_HEALTH_UNKNOWN,
    Health.SERVING: registry_pb2.PROVIDER_HEALTH_SERVING,
    Health.NOT_SERVING: registry_pb2.PROVIDER_HEALTH_NOT_SERVING,
}
_CHANGE = {
    ChangeType.UPSERTED: registry_pb2.PROVIDER_CHANGE_TYPE_UPSERTED,
    ChangeType.REMOVED: registry_pb2.PROVIDER_CHANGE_TYPE_REMOVED,
}


def provider_to_proto(provider: Provider) -> registry_pb2.ProviderRegistration:
    return registry_pb2.ProviderRegistration(
        provider_id=provider.provider_id,
        endpoint=provider.endpoint,
        version=provider.version,
        actions=provider.actions,
        health=_HEALTH[provider.health],
        registered_at=to_timestamp(provider.registered_at),
        lease_expires_at=to_timestamp(provider.lease_expires_at),
    )


def change_to_proto(change: Change) -> registry_pb2.WatchProvidersResponse:
    return registry_pb2.WatchProvidersResponse(
        change=registry_pb2.ProviderChange(
            type=_CHANGE[change.type], provider=provider_to_proto(change.provider)
        )
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    async def RegisterProvider(
        self, request: registry_pb2.RegisterProviderRequest, context: object
    ) -> registry_pb2.RegisterProviderResponse:
        lease = await self._directory.register(
            Registration(
                provider_id=request.provider_id,
                endpoint=request.endpoint,
                version=request.version,
                actions=tuple(request.actions),
            )
        )
        ttl = duration_pb2.Duration()
        ttl.FromTimedelta(lease.ttl)
        return registry_pb2.RegisterProviderResponse(lease_id=lease.lease_id, lease_ttl=ttl)

    async def RenewLease(
        self, request: registry_pb2.RenewLeaseRequest, context: object
    ) -> registry_pb2.RenewLeaseResponse:
        expires_at = await self._directory.renew(request.provider_id, request.lease_id)
        return registry_pb2.RenewLeaseResponse(lease_expires_at=to_timestamp(expires_at))

    async def DeregisterProvider(
        self, request: registry_pb2.DeregisterProviderRequest, context: object
    ) -> registry_pb2.DeregisterProviderResponse:
        await self._directory.deregister(request.provider_id, request.lease_id)
        return registry_pb2.DeregisterProviderResponse()

    async def ListProviders(
        self, request: registry_pb2.ListProvidersRequest, context: object
    ) -> registry_pb2.ListProvidersResponse:
        providers = await self._directory.list_providers()
        return registry_pb2.ListProvidersResponse(
            providers=[provider_to_proto(p) for p in providers]
        )

    async def WatchProviders(
        self, request: registry_pb2.WatchProvidersRequest, context: object
    ) -> AsyncIterator[registry_pb2.WatchProvidersResponse]:
        async with self._directory.watch() as (snapshot, changes):
            yield registry_pb2.WatchProvidersResponse(
                snapshot=registry_pb2.ProviderSnapshot(
                    providers=[provider_to_proto(p) for p in snapshot]
                )
            )
            async for change in changes:
                yield change_to_proto(change)
