"""The directory of providers: leases, owners, allowed endpoints, health and the change stream.

A provider id belongs to the credential identity that first registered it
(:mod:`registry.credentials`); registering, renewing or deregistering it with
another identity is refused without saying whose it is. Endpoints must be on the
operator's allow-list (:mod:`registry.endpoints`).

Every mutation and the change it publishes happen under one lock, so watchers
see changes in the order they were stored, and a watcher that subscribes under
the same lock gets a snapshot that no change can fall between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, Protocol

from actionmesh.registry.endpoints import DEFAULT_ALLOWED_ENDPOINTS, EndpointAllowList
from actionmesh.registry.model import (
    ANONYMOUS,
    Change,
    ChangeType,
    Health,
    Lease,
    Provider,
    Registration,
)
from actionmesh.registry.storage import OwnedByAnother, ProviderRepository
from actionmesh.registry.validation import validate_registration
from actionmesh.registry.watch import DEFAULT_QUEUE_SIZE, ChangeHub, Subscription
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import AlreadyExists, FieldViolation, NotFound, PermissionDenied

log = logging.getLogger(__name__)


class Prober(Protocol):
    """Checks provider health; see registry.health.GrpcHealthProber."""

    async def probe(self, provider_id: str, endpoint: str) -> Health | None: ...

    async def forget(self, provider_id: str) -> None: ...

    async def retain_only(self, provider_ids: set[str]) -> None: ...

    async def close(self) -> None: ...


def _lease_not_found(provider_id: str) -> NotFound:
    return NotFound(
        f"no live lease for provider {provider_id!r}; register again",
        reason="LEASE_NOT_FOUND",
        metadata={"provider_id": provider_id},
    )


def _owned_by_another(provider_id: str) -> PermissionDenied:
    # Neither the owner nor how it authenticated: that would help an impostor.
    return PermissionDenied(
        f"provider {provider_id!r} belongs to the credential that first registered it; "
        "register it with that credential, or have an operator release it "
        "(actionmesh registry release-owner)",
        reason="PROVIDER_OWNED_BY_ANOTHER_CREDENTIAL",
        metadata={"provider_id": provider_id},
    )


class Directory:
    """Registers providers under leases, expires them, tracks their health."""

    def __init__(
        self,
        repository: ProviderRepository,
        prober: Prober,
        *,
        lease_ttl: timedelta,
        allowed_endpoints: EndpointAllowList | None = None,
        watch_queue_size: int = DEFAULT_QUEUE_SIZE,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._repository = repository
        self._allowed = allowed_endpoints or EndpointAllowList(DEFAULT_ALLOWED_ENDPOINTS)
        self._prober = prober
        self._lease_ttl = lease_ttl
        self._clock = clock
        self._hub = ChangeHub(watch_queue_size)
        self._lock = asyncio.Lock()
        self._pending_checks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def watcher_count(self) -> int:
        return self._hub.subscriber_count

    async def open(self) -> None:
        await asyncio.to_thread(self._repository.create_schema)

    async def register(self, registration: Registration, owner: str = ANONYMOUS) -> Lease:
        validate_registration(registration)
        if not self._allowed.allows(registration.endpoint):
            raise PermissionDenied(
                f"endpoint {registration.endpoint!r} is not on this registry's allow-list",
                reason="ENDPOINT_NOT_ALLOWED",
                violations=[
                    FieldViolation(
                        "endpoint",
                        "not an endpoint the operator allows (registry allowed_endpoints)",
                    )
                ],
                metadata={"provider_id": registration.provider_id},
            )
        async with self._lock:
            # A lapsed registration no longer owns its action ids.
            await self._expire_locked()
            now = self._clock()
            provider = Provider(
                provider_id=registration.provider_id,
                endpoint=registration.endpoint,
                version=registration.version,
                actions=registration.actions,
                record_sources=registration.record_sources,
                lease_id=uuid.uuid4().hex,
                lease_expires_at=now + self._lease_ttl,
                registered_at=now,
                health=Health.UNKNOWN,
            )
            try:
                conflicts, previous = await asyncio.to_thread(
                    self._repository.register, provider, owner
                )
            except OwnedByAnother:
                log.warning(
                    "refused registration of provider %s at %s: the id is owned by another "
                    "credential",
                    provider.provider_id,
                    provider.endpoint,
                )
                raise _owned_by_another(provider.provider_id) from None
            sources = [c for c in conflicts if c.record_source]
            if sources:
                # Facts about a record type come from exactly one system of record.
                listed = ", ".join(f"{c.action_id} (held by {c.provider_id})" for c in sources)
                raise AlreadyExists(
                    f"record types another provider already is the source of: {listed}",
                    reason="RECORD_SOURCE_CONFLICT",
                    metadata={
                        "record_type": sources[0].action_id,
                        "provider_id": sources[0].provider_id,
                    },
                )
            if conflicts:
                # The gateway routes an action id to exactly one provider.
                listed = ", ".join(f"{c.action_id} (held by {c.provider_id})" for c in conflicts)
                raise AlreadyExists(
                    f"action ids already registered by another provider: {listed}",
                    reason="ACTION_ID_CONFLICT",
                    metadata={
                        "action_id": conflicts[0].action_id,
                        "provider_id": conflicts[0].provider_id,
                    },
                )
            if previous is not None and previous.endpoint != provider.endpoint:
                await self._prober.forget(provider.provider_id)
            self._hub.publish(Change(ChangeType.UPSERTED, provider))
        log.info(
            "registered provider %s at %s (%d actions)",
            provider.provider_id,
            provider.endpoint,
            len(provider.actions),
        )
        # Check now: waiting a full interval would leave a new provider UNKNOWN,
        # which the gateway treats as not routable.
        self._spawn(self._check_one(provider))
        return Lease(provider.lease_id, self._lease_ttl, provider.lease_expires_at)

    async def renew(self, provider_id: str, lease_id: str, owner: str = ANONYMOUS) -> datetime:
        now = self._clock()
        expires_at = now + self._lease_ttl
        # One conditional UPDATE, so no lock: it cannot revive a lapsed lease.
        try:
            renewed = await asyncio.to_thread(
                self._repository.renew, provider_id, lease_id, now, expires_at, owner
            )
        except OwnedByAnother:
            raise _owned_by_another(provider_id) from None
        if not renewed:
            raise _lease_not_found(provider_id)
        return expires_at

    async def deregister(self, provider_id: str, lease_id: str, owner: str = ANONYMOUS) -> None:
        async with self._lock:
            try:
                removed = await asyncio.to_thread(
                    self._repository.remove, provider_id, lease_id, owner
                )
            except OwnedByAnother:
                log.warning(
                    "refused deregistration of provider %s: the id is owned by another credential",
                    provider_id,
                )
                raise _owned_by_another(provider_id) from None
            if removed is None:
                raise _lease_not_found(provider_id)
            await self._prober.forget(provider_id)
            self._hub.publish(Change(ChangeType.REMOVED, removed))
        log.info("deregistered provider %s", provider_id)

    async def list_providers(self) -> list[Provider]:
        return await asyncio.to_thread(self._repository.list_providers)

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[tuple[list[Provider], Subscription]]:
        """A snapshot and the changes after it; unsubscribes on exit."""
        async with self._lock:
            subscription = self._hub.subscribe()
            try:
                snapshot = await asyncio.to_thread(self._repository.list_providers)
            except BaseException:
                self._hub.unsubscribe(subscription)
                raise
        try:
            yield snapshot, subscription
        finally:
            self._hub.unsubscribe(subscription)

    async def expire_leases(self) -> list[Provider]:
        async with self._lock:
            return await self._expire_locked()

    async def check_health(self) -> None:
        """Probe every registered provider in parallel and record the results."""
        providers = await self.list_providers()
        await self._prober.retain_only({p.provider_id for p in providers})
        results = await asyncio.gather(
            *(self._prober.probe(p.provider_id, p.endpoint) for p in providers)
        )
        for provider, health in zip(providers, results, strict=True):
            await self._apply_health(provider, health)

    async def close(self) -> None:
        """End watch streams and pending checks; the store stays as it is."""
        self._closed = True
        self._hub.close()
        for task in list(self._pending_checks):
            task.cancel()
        await asyncio.gather(*self._pending_checks, return_exceptions=True)
        await self._prober.close()

    async def _expire_locked(self) -> list[Provider]:
        removed = await asyncio.to_thread(self._repository.remove_expired, self._clock())
        for provider in removed:
            await self._prober.forget(provider.provider_id)
            self._hub.publish(Change(ChangeType.REMOVED, provider))
            log.info("lease of provider %s expired; removed it", provider.provider_id)
        return removed

    async def _check_one(self, provider: Provider) -> None:
        health = await self._prober.probe(provider.provider_id, provider.endpoint)
        await self._apply_health(provider, health)

    async def _apply_health(self, provider: Provider, health: Health | None) -> None:
        if health is None:
            return
        async with self._lock:
            updated = await asyncio.to_thread(
                self._repository.set_health, provider.provider_id, provider.lease_id, health
            )
            if updated is None:
                return
            self._hub.publish(Change(ChangeType.UPSERTED, updated))
        log.info("provider %s is now %s", provider.provider_id, health.value)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coroutine.close()
            return
        task = asyncio.create_task(coroutine)
        self._pending_checks.add(task)
        task.add_done_callback(self._check_done)

    def _check_done(self, task: asyncio.Task[None]) -> None:
        self._pending_checks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("health check failed", exc_info=task.exception())
