"""RegistryService over gRPC: translates between the contract and the directory.

Register, renew and deregister act for the caller's credential identity
(:func:`registry.credentials.registrant`), taken from the call, never the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc.aio
from google.protobuf import duration_pb2

from actionmesh.registry.credentials import registrant
from actionmesh.registry.directory import Directory
from actionmesh.registry.model import Change, ChangeType, Health, Provider, Registration
from actionmesh.rpc.convert import to_timestamp
from actionmesh.rpc.errors import ActionMeshError, FieldViolation, InvalidArgument
from actionmesh.rpc.identifiers import ACTION_ID
from actionmesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc

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
        record_sources=provider.record_sources,
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


# Every gateway holds every descriptor and returns them in DiscoverActions answers
# (4 MiB at most), and an ENUM refusal lists the allowed values in its error
# details (an 8 KiB trailer): bound what one registration may declare.
MAX_ACTIONS = 64
MAX_ACTION_ID = ACTION_ID.max_length
MAX_LABEL_CHARS = 200
MAX_DESCRIPTION_CHARS = 2048
MAX_RECORD_TYPES = 16
MAX_ALLOWED_VALUES = 32
MAX_ALLOWED_VALUE_CHARS = 64
# Error details travel in trailing metadata, which gRPC refuses past 8 KiB (soft
# limit; base64 grows the details by a third): keep the listed problems well below.
MAX_VIOLATION_CHARS = 4000
MAX_MESSAGE_CHARS = 500


def size_violations(actions: Sequence[common_pb2.ActionDescriptor]) -> list[FieldViolation]:
    """Problems of size only; the shape rules are :mod:`registry.validation`'s."""
    if len(actions) > MAX_ACTIONS:
        return [FieldViolation("actions", f"at most {MAX_ACTIONS} actions per provider")]
    problems = []
    for index, action in enumerate(actions):
        path = f"actions[{index}]"
        if len(action.action_id) > MAX_ACTION_ID:
            problems.append(
                FieldViolation(f"{path}.action_id", f"must be at most {MAX_ACTION_ID} characters")
            )
        if len(action.label) > MAX_LABEL_CHARS:
            problems.append(
                FieldViolation(f"{path}.label", f"must be at most {MAX_LABEL_CHARS} characters")
            )
        if len(action.description) > MAX_DESCRIPTION_CHARS:
            problems.append(
                FieldViolation(
                    f"{path}.description", f"must be at most {MAX_DESCRIPTION_CHARS} characters"
                )
            )
        if len(action.record_types) > MAX_RECORD_TYPES:
            problems.append(
                FieldViolation(f"{path}.record_types", f"at most {MAX_RECORD_TYPES} record types")
            )
        for field_index, field in enumerate(action.inputs):
            where = f"{path}.inputs[{field_index}]"
            if len(field.description) > MAX_DESCRIPTION_CHARS:
                problems.append(
                    FieldViolation(
                        f"{where}.description",
                        f"must be at most {MAX_DESCRIPTION_CHARS} characters",
                    )
                )
            if len(field.allowed_values) > MAX_ALLOWED_VALUES or any(
                len(value) > MAX_ALLOWED_VALUE_CHARS for value in field.allowed_values
            ):
                problems.append(
                    FieldViolation(
                        f"{where}.allowed_values",
                        f"at most {MAX_ALLOWED_VALUES} values of at most "
                        f"{MAX_ALLOWED_VALUE_CHARS} characters",
                    )
                )
    return problems


def deliverable(error: ActionMeshError) -> ActionMeshError:
    """The same error, cut to what fits in a gRPC trailer (a provider may declare a lot)."""
    kept: list[FieldViolation] = []
    budget = MAX_VIOLATION_CHARS
    for violation in error.violations:
        cost = len(violation.field) + len(violation.description) + 8
        if cost > budget:
            break
        kept.append(violation)
        budget -= cost
    message = error.message
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    if len(kept) == len(error.violations) and message == error.message:
        return error
    if len(kept) < len(error.violations):
        hidden = len(error.violations) - len(kept)
        kept.append(FieldViolation("actions", f"{hidden} more problems not listed"))
    return type(error)(
        message,
        reason=error.reason,
        violations=kept,
        retry_after_s=error.retry_after_s,
        metadata=error.metadata,
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """RegistryService: registrations for the caller's credential, listings for anyone."""

    def __init__(self, directory: Directory, *, require_credential: bool = False) -> None:
        self._directory = directory
        self._require_credential = require_credential

    def _registrant(self, context: grpc.aio.ServicerContext) -> str:
        return registrant(context, required=self._require_credential)

    async def RegisterProvider(
        self,
        request: registry_pb2.RegisterProviderRequest,
        context: grpc.aio.ServicerContext,
    ) -> registry_pb2.RegisterProviderResponse:
        owner = self._registrant(context)
        try:
            oversize = size_violations(request.actions)
            if oversize:
                raise InvalidArgument(
                    f"invalid registration: {len(oversize)} problem(s)",
                    reason="INVALID_REGISTRATION",
                    violations=oversize,
                )
            lease = await self._directory.register(
                Registration(
                    provider_id=request.provider_id,
                    endpoint=request.endpoint,
                    version=request.version,
                    actions=tuple(request.actions),
                    record_sources=tuple(request.record_sources),
                ),
                owner,
            )
        except ActionMeshError as error:
            raise deliverable(error) from None
        ttl = duration_pb2.Duration()
        ttl.FromTimedelta(lease.ttl)
        return registry_pb2.RegisterProviderResponse(lease_id=lease.lease_id, lease_ttl=ttl)

    async def RenewLease(
        self,
        request: registry_pb2.RenewLeaseRequest,
        context: grpc.aio.ServicerContext,
    ) -> registry_pb2.RenewLeaseResponse:
        expires_at = await self._directory.renew(
            request.provider_id, request.lease_id, self._registrant(context)
        )
        return registry_pb2.RenewLeaseResponse(lease_expires_at=to_timestamp(expires_at))

    async def DeregisterProvider(
        self,
        request: registry_pb2.DeregisterProviderRequest,
        context: grpc.aio.ServicerContext,
    ) -> registry_pb2.DeregisterProviderResponse:
        await self._directory.deregister(
            request.provider_id, request.lease_id, self._registrant(context)
        )
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
