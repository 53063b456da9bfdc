"""Admission control: one tenant cannot starve the others, and no provider is flooded.

Three limits, each refused with RESOURCE_EXHAUSTED, an ErrorInfo reason and a
RetryInfo saying when to come back:

- a request rate per tenant (``limits`` moving window), counted separately for
  ExecuteAction and DiscoverActions: TENANT_RATE_LIMITED;
- executions in flight per tenant: TENANT_CONCURRENCY_LIMITED;
- executions in flight per provider, across tenants: PROVIDER_CONCURRENCY_LIMITED.

Limits are checked before anything is written, so a refused call leaves no
execution row and may be retried with the same idempotency key. They hold per
gateway replica: with N replicas a tenant can reach N times the configured figures.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from actionmesh.gateway.config import parse_rate
from actionmesh.gateway.metrics import record_admission_refused
from actionmesh.rpc.errors import ResourceExhausted

# How soon a caller refused for concurrency should try again: in-flight executions
# usually finish within a few hundred milliseconds.
CONCURRENCY_RETRY_S = 0.5


@dataclass
class Slot:
    """One admitted execution: gives its tenant and provider places back exactly once."""

    admission: Admission
    tenant: str
    provider_id: str
    held: bool = True
    handed_over: bool = False
    """Set when the dispatch task owns the slot (it outlives a caller that hangs up)."""
    pinned: bool = False

    def release(self) -> None:
        """Give the places back, unless a provider call still running holds them."""
        if not self.pinned:
            self._free()

    def outlive(self, call: asyncio.Future[Any]) -> None:
        """Stay taken until ``call`` ends: a provider still working past the caller's
        deadline (waiting for a late result) is still load on that provider."""
        self.pinned = True
        call.add_done_callback(lambda _: self._free())

    def _free(self) -> None:
        if self.held:
            self.held = False
            self.admission.leave(self)


@dataclass
class Admission:
    """The gateway's limits; 0 or an empty rate turns one off."""

    tenant_rate: RateLimitItem | None
    tenant_max_concurrent: int
    provider_max_concurrent: int
    _limiter: MovingWindowRateLimiter = field(init=False)
    _per_tenant: Counter[str] = field(default_factory=Counter)
    _per_provider: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    @classmethod
    def from_settings(
        cls, tenant_rate_limit: str, tenant_max_concurrent: int, provider_max_concurrent: int
    ) -> Admission:
        return cls(parse_rate(tenant_rate_limit), tenant_max_concurrent, provider_max_concurrent)

    async def check_rate(self, tenant: str, operation: str) -> None:
        """Count one ``operation`` call of ``tenant``, or refuse it."""
        # The asyncio flavour of the limiter: the threaded one starts a timer thread per
        # call to expire entries, which showed up in the benchmark's profile.
        if self.tenant_rate is None or await self._limiter.hit(self.tenant_rate, operation, tenant):
            return
        stats = await self._limiter.get_window_stats(self.tenant_rate, operation, tenant)
        reset_at = stats.reset_time
        record_admission_refused("TENANT_RATE_LIMITED")
        raise ResourceExhausted(
            f"tenant request rate exceeded ({self.tenant_rate}) for {operation}",
            reason="TENANT_RATE_LIMITED",
            retry_after_s=max(0.001, reset_at - time.time()),
            metadata={"limit": str(self.tenant_rate), "operation": operation},
        )

    def enter(self, tenant: str, provider_id: str) -> Slot:
        """Take an execution place for ``tenant`` on ``provider_id``, or refuse."""
        if self.tenant_max_concurrent and self._per_tenant[tenant] >= self.tenant_max_concurrent:
            record_admission_refused("TENANT_CONCURRENCY_LIMITED")
            raise ResourceExhausted(
                f"the tenant already has {self.tenant_max_concurrent} executions in flight",
                reason="TENANT_CONCURRENCY_LIMITED",
                retry_after_s=CONCURRENCY_RETRY_S,
                metadata={"limit": str(self.tenant_max_concurrent)},
            )
        if (
            self.provider_max_concurrent
            and self._per_provider[provider_id] >= self.provider_max_concurrent
        ):
            record_admission_refused("PROVIDER_CONCURRENCY_LIMITED")
            raise ResourceExhausted(
                f"provider {provider_id!r} already has {self.provider_max_concurrent} "
                "executions in flight",
                reason="PROVIDER_CONCURRENCY_LIMITED",
                retry_after_s=CONCURRENCY_RETRY_S,
                metadata={"limit": str(self.provider_max_concurrent), "provider_id": provider_id},
            )
        self._per_tenant[tenant] += 1
        self._per_provider[provider_id] += 1
        return Slot(self, tenant, provider_id)

    def leave(self, slot: Slot) -> None:
        for counts, key in (
            (self._per_tenant, slot.tenant),
            (self._per_provider, slot.provider_id),
        ):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]

    def in_flight(self, *, tenant: str | None = None, provider_id: str | None = None) -> int:
        if tenant is not None:
            return self._per_tenant[tenant]
        if provider_id is not None:
            return self._per_provider[provider_id]
        return sum(self._per_tenant.values())
