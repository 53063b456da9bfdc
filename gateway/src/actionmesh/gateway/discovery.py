"""DiscoverActions: policy first, then a parallel fan-out with per-provider deadlines.

Policy runs on the descriptors the registry already holds, so providers are only
asked about actions the caller could see; a slow or unhealthy provider is
reported as degraded and never holds the others' answer past its deadline.

Each provider's answer is cached for a few seconds per (provider registration,
tenant, record, record version and content, caller roles), so a UI refresh does
not fan out again; ``skip_cache`` asks again. Discover is side-effect free by
contract, which is what makes this safe. The policy decisions (shown and hidden
actions, with the policies that decided) are recorded as one audit event per
call: hidden actions are never revealed to the caller, but operators can see why.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

import grpc.aio
from cachetools import TTLCache
from opentelemetry import trace

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.authorization import Authorizer, Visibility
from actionmesh.gateway.directory import ProviderDirectory, ProviderEntry
from actionmesh.gateway.facts import SOURCE_UNAVAILABLE, FactResolver
from actionmesh.gateway.ledger import Ledger
from actionmesh.gateway.metrics import record_discover
from actionmesh.gateway.requests import check_record
from actionmesh.gateway.tenancy import require_same_tenant
from actionmesh.rpc.errors import Unavailable
from actionmesh.v1 import common_pb2, provider_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")

Availability = dict[str, tuple[bool, str]]


@dataclass(frozen=True)
class VisibleAction:
    descriptor: common_pb2.ActionDescriptor
    provider_id: str
    available: bool
    unavailable_reason: str
    from_cache: bool = False


@dataclass(frozen=True)
class DiscoveryResult:
    actions: list[VisibleAction]
    degraded: list[tuple[str, str]]
    facts: common_pb2.RecordFacts


class Discoverer:
    def __init__(
        self,
        directory: ProviderDirectory,
        authorizer: Authorizer,
        timeout_s: float,
        *,
        facts: FactResolver,
        ledger: Ledger,
        cache_ttl_s: float,
        cache_max_entries: int,
    ) -> None:
        self._directory = directory
        self._authorizer = authorizer
        self._facts = facts
        self._timeout_s = timeout_s
        self._ledger = ledger
        self._cache: TTLCache[tuple[str, ...], Availability] | None = (
            TTLCache(maxsize=cache_max_entries, ttl=cache_ttl_s) if cache_ttl_s > 0 else None
        )

    async def discover(
        self,
        caller: Caller,
        record: common_pb2.RecordContext,
        has_record: bool,
        *,
        skip_cache: bool = False,
    ) -> DiscoveryResult:
        started = time.monotonic()
        check_record(record, has_record)
        require_same_tenant(caller, record)
        degraded: list[tuple[str, str]] = []
        try:
            verified = await self._facts.resolve(caller, record, fresh=skip_cache)
        except Unavailable as down:
            # Shown on the caller's word, marked unverified, and the source named as degraded.
            verified = self._facts.unverified(record)
            degraded.append((down.metadata.get("provider_id", ""), SOURCE_UNAVAILABLE))
        record = verified.record
        entries = self._directory.providers_for(record.type)
        visibility = self._authorizer.discover(caller, verified, entries)
        visible: dict[str, list[common_pb2.ActionDescriptor]] = {}
        for subject in visibility.visible():
            visible.setdefault(subject.provider_id, []).append(subject.descriptor)
        asked = [e for e in entries if e.provider_id in visible]
        # The same question goes to every provider: build it (and its cache digest) once.
        request = provider_pb2.DiscoverRequest(
            record=record,
            operator=caller.operator(),
        )
        content = record_digest(record)
        with tracer.start_as_current_span(
            "discover.fan_out",
            attributes={
                "actionmesh.tenant": caller.tenant,
                "actionmesh.record.type": record.type,
                "actionmesh.discover.providers": [e.provider_id for e in asked],
            },
        ):
            answers = await asyncio.gather(
                *(self._availability(e, caller, request, content, skip_cache) for e in asked)
            )
        actions: list[VisibleAction] = []
        for entry, answer in zip(asked, answers, strict=True):
            if isinstance(answer, str):
                degraded.append((entry.provider_id, answer))
                continue
            availability, cached = answer
            for descriptor in visible[entry.provider_id]:
                found = availability.get(descriptor.action_id)
                if found is None:
                    continue
                actions.append(
                    VisibleAction(descriptor, entry.provider_id, found[0], found[1], cached)
                )
        if visibility.subjects:
            await self._record_decisions(caller, record, visibility, degraded)
        record_discover(record.type, time.monotonic() - started, bool(degraded))
        return DiscoveryResult(actions=actions, degraded=degraded, facts=verified.facts)

    async def _record_decisions(
        self,
        caller: Caller,
        record: common_pb2.RecordContext,
        visibility: Visibility,
        degraded: list[tuple[str, str]],
    ) -> None:
        hidden = sum(1 for d in visibility.decisions if not d.allowed)
        summary = f"{len(visibility.subjects) - hidden} shown, {hidden} hidden by policy" + (
            f"; degraded: {', '.join(p for p, _ in degraded)}" if degraded else ""
        )
        await self._ledger.discovered(caller, record, visibility, summary)

    async def _availability(
        self,
        entry: ProviderEntry,
        caller: Caller,
        request: provider_pb2.DiscoverRequest,
        content: str,
        skip_cache: bool,
    ) -> tuple[Availability, bool] | str:
        """The provider's availability per action id (and whether cached), or why not."""
        if entry.not_serving:
            return "NOT_SERVING"
        key = cache_key(entry, caller, content)
        if self._cache is not None and not skip_cache:
            cached = self._cache.get(key)
            if cached is not None:
                return cached, True
        answer = await self._ask(entry, request)
        if isinstance(answer, str):
            return answer
        if self._cache is not None:
            self._cache[key] = answer
        return answer, False

    async def _ask(
        self, entry: ProviderEntry, request: provider_pb2.DiscoverRequest
    ) -> Availability | str:
        """The provider's availability per action id, or a degradation reason."""
        with tracer.start_as_current_span(
            "discover.provider", attributes={"actionmesh.provider_id": entry.provider_id}
        ) as span:
            try:
                reply = await self._directory.stub(entry).Discover(request, timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.info("discover on %s failed: %s", entry.provider_id, exc.code().name)
                span.set_attribute("actionmesh.discover.degraded", exc.code().name)
                return exc.code().name
        return {a.action_id: (a.available, a.unavailable_reason) for a in reply.actions}


def record_digest(record: common_pb2.RecordContext) -> str:
    """The record as the providers see it: status, sensitivity, attributes and version."""
    return hashlib.sha256(record.SerializeToString(deterministic=True)).hexdigest()


def cache_key(entry: ProviderEntry, caller: Caller, content: str) -> tuple[str, ...]:
    """Who answered (this registration), about which record state (``content``, a
    :func:`record_digest`), for which roles."""
    registration = entry.registration
    return (
        registration.provider_id,
        registration.endpoint,
        registration.version,
        str(registration.registered_at.ToNanoseconds()),
        caller.tenant,
        ",".join(sorted(caller.roles)),
        content,
    )
