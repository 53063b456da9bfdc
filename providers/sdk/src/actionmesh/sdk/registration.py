"""Keeping a provider registered: register, renew the lease, deregister at stop.

Runs in the background so the provider serves while the registry is still
unreachable. Registration retries with capped exponential backoff; once
registered the lease is renewed every ttl/3; an expired lease (NOT_FOUND) means
register again; an unreachable registry means keep trying.

With a registration token every call carries ``authorization: Bearer <token>``:
the registry binds the provider id to the first credential that registers it,
so the same token (or client certificate) must be used for the id's lifetime.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import grpc
import grpc.aio

from actionmesh.rpc.channels import open_channel
from actionmesh.rpc.supervisor import LoopPolicy, SupervisedLoop, Supervisor
from actionmesh.rpc.tls import TlsConfig
from actionmesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 30.0
MIN_RENEW_S = 0.2
INITIAL_BACKOFF_S = 0.2
CALL_TIMEOUT_S = 5.0


class RegistryLink:
    """One provider's registration with one registry."""

    def __init__(
        self,
        *,
        target: str,
        provider_id: str,
        version: str,
        endpoint: str,
        actions: Sequence[common_pb2.ActionDescriptor],
        record_sources: Sequence[str] = (),
        max_backoff_s: float = 10.0,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self._tls = tls
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.provider_id = provider_id
        self.endpoint = endpoint
        self._request = registry_pb2.RegisterProviderRequest(
            provider_id=provider_id,
            endpoint=endpoint,
            version=version,
            actions=list(actions),
            record_sources=list(record_sources),
        )
        self._max_backoff_s = max_backoff_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_pb2_grpc.RegistryServiceStub | None = None
        self._loop: SupervisedLoop | None = None
        self.lease_id = ""
        self.ttl_s = DEFAULT_TTL_S
        # Set whenever a lease is held; tests and supervisors wait on it.
        self.registered = asyncio.Event()

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Register and renew in the background, as a loop of ``supervisor`` (a private
        one by default): whatever breaks the link, it starts over after a backoff, and
        the provider reports NOT_SERVING while it keeps failing (a provider that silently
        stopped renewing would vanish from the mesh)."""
        self._channel = open_channel(self.target, self._tls)
        self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        supervisor = supervisor or Supervisor(f"provider {self.provider_id}")
        self._loop = supervisor.spawn(
            f"registry-link-{self.provider_id}",
            self._run,
            policy=LoopPolicy(
                initial_backoff_s=INITIAL_BACKOFF_S,
                max_backoff_s=max(INITIAL_BACKOFF_S, self._max_backoff_s),
            ),
        )

    def _backoff(self, attempt: int) -> float:
        delay = min(self._max_backoff_s, INITIAL_BACKOFF_S * 2**attempt)
        # Jitter so a restarted registry is not hit by every provider at once.
        return delay * random.uniform(0.5, 1.0)

    async def _register(self) -> None:
        assert self._stub is not None
        attempt = 0
        while True:
            try:
                reply = await self._stub.RegisterProvider(
                    self._request, timeout=CALL_TIMEOUT_S, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                level = logging.INFO if exc.code() == grpc.StatusCode.UNAVAILABLE else logging.ERROR
                log.log(
                    level,
                    "registering %s with %s failed (%s: %s); retrying",
                    self.provider_id,
                    self.target,
                    exc.code().name,
                    exc.details(),
                )
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
                continue
            self.lease_id = reply.lease_id
            ttl = reply.lease_ttl.seconds + reply.lease_ttl.nanos / 1e9
            self.ttl_s = ttl if ttl > 0 else DEFAULT_TTL_S
            self.registered.set()
            log.info(
                "registered %s at %s with %s (lease ttl %.1fs)",
                self.provider_id,
                self.endpoint,
                self.target,
                self.ttl_s,
            )
            return

    async def _run(self, loop: SupervisedLoop) -> None:
        try:
            while True:
                await self._register()
                loop.progress()
                await self._renew_until_lost(loop)
        except Exception:
            self.registered.clear()
            raise

    async def _renew_until_lost(self, loop: SupervisedLoop) -> None:
        """Renew every ttl/3 until the registry says the lease is gone."""
        assert self._stub is not None
        failures = 0
        while True:
            interval = max(MIN_RENEW_S, self.ttl_s / 3)
            await asyncio.sleep(
                interval if failures == 0 else min(interval, self._backoff(failures))
            )
            try:
                await self._stub.RenewLease(
                    registry_pb2.RenewLeaseRequest(
                        provider_id=self.provider_id, lease_id=self.lease_id
                    ),
                    timeout=min(CALL_TIMEOUT_S, interval),
                    metadata=self._metadata,
                )
                failures = 0
                loop.progress()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning("lease of %s expired; registering again", self.provider_id)
                    self.registered.clear()
                    return
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    # An operator released the id and another credential took it:
                    # renewing cannot succeed again, so surface it through registering.
                    log.error(
                        "the registry refused the lease of %s (%s); registering again",
                        self.provider_id,
                        exc.details(),
                    )
                    self.registered.clear()
                    return
                failures += 1
                log.warning(
                    "renewing the lease of %s failed (%s); retrying",
                    self.provider_id,
                    exc.code().name,
                )

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Stop renewing, deregister (bounded by ``timeout_s``), close the channel."""
        loop, self._loop = self._loop, None
        if loop is not None:
            await loop.stop()
        try:
            if self._stub is not None and self.lease_id:
                await self._stub.DeregisterProvider(
                    registry_pb2.DeregisterProviderRequest(
                        provider_id=self.provider_id, lease_id=self.lease_id
                    ),
                    timeout=timeout_s,
                    metadata=self._metadata,
                )
                log.info("deregistered %s from %s", self.provider_id, self.target)
        except grpc.aio.AioRpcError as exc:
            # The lease expires on its own; shutting down must not wait on the registry.
            log.warning("deregistering %s failed (%s)", self.provider_id, exc.code().name)
        finally:
            self.registered.clear()
            # Stopping twice (a supervisor and a test, say) must not call a closed channel.
            self.lease_id = ""
            self._stub = None
            if self._channel is not None:
                await self._channel.close()
                self._channel = None
