"""Record facts the platform can vouch for: who says what a record is.

Policy, discovery, redaction and approvals decide on a record's status, sensitivity
and attributes. Those facts come from one of three places, in this order:

1. the record type's **system of record**, a provider that declared the type in its
   registration (``record_sources``) and answers ResolveRecord; the gateway asks it at
   every execution and approval, and discovery reuses an answer for
   ``record_facts_cache_ttl_s`` unless the caller saw another version;
2. a **trusted caller**: a backend service the configuration lists for the type
   (``trusted_callers``), authenticated by its own token; its request's facts count;
3. otherwise the caller's request alone: the facts are **unverified**, and the
   evidence and policy context (``context.record.verified``) say so.

A source that is down, slow or answers something malformed makes the resolution
UNAVAILABLE ``RECORD_SOURCE_UNAVAILABLE`` (retry-safe: nothing was dispatched); an
unknown record (including another tenant's) is NOT_FOUND ``RECORD_NOT_FOUND``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import grpc.aio
from cachetools import TTLCache
from opentelemetry import trace

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.directory import ProviderDirectory, ProviderEntry
from actionmesh.gateway.redaction import is_sensitive
from actionmesh.rpc.errors import NotFound, Unavailable
from actionmesh.rpc.records import resolved_record_violations
from actionmesh.v1 import common_pb2, provider_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")

PROVIDER = common_pb2.FACT_SOURCE_PROVIDER
TRUSTED_CALLER = common_pb2.FACT_SOURCE_TRUSTED_CALLER
UNVERIFIED = common_pb2.FACT_SOURCE_UNVERIFIED
SOURCE_RETRY_S = 1.0
SOURCE_UNAVAILABLE = "RECORD_SOURCE_UNAVAILABLE"


@dataclass(frozen=True)
class VerifiedRecord:
    """The record to govern on, and the evidence of who vouched for it."""

    record: common_pb2.RecordContext
    """Tenant, type and id as asked; status, sensitivity, attributes and version from the
    source (or the caller's claim when unverified)."""
    facts: common_pb2.RecordFacts

    @property
    def verified(self) -> bool:
        return self.facts.source != UNVERIFIED

    @property
    def sensitive(self) -> bool:
        return is_sensitive(self.record)

    @property
    def stale(self) -> bool:
        """The caller said it saw another version than the source's."""
        return bool(self.facts.caller_version)

    @property
    def source_name(self) -> str:
        """``provider``, ``trusted_caller`` or ``unverified`` (policy and evidence)."""
        return common_pb2.FactSource.Name(self.facts.source).removeprefix("FACT_SOURCE_").lower()


def _facts(
    record: common_pb2.RecordContext,
    source: common_pb2.FactSource.ValueType,
    vouched_by: str,
    claimed_version: str,
) -> common_pb2.RecordFacts:
    stale = source == PROVIDER and claimed_version and claimed_version != record.version
    return common_pb2.RecordFacts(
        source=source,
        vouched_by=vouched_by,
        version=record.version,
        status=record.status,
        sensitivity=record.sensitivity,
        attributes=dict(record.attributes),
        caller_version=claimed_version if stale else "",
    )


def source_unavailable(provider_id: str, record_type: str, why: str) -> Unavailable:
    """The refusal when a type's system of record cannot say what a record is."""
    return Unavailable(
        f"the system of record of {record_type!r} records ({provider_id}) {why}; nothing ran",
        reason=SOURCE_UNAVAILABLE,
        retry_after_s=SOURCE_RETRY_S,
        metadata={"provider_id": provider_id, "record_type": record_type},
    )


class FactResolver:
    def __init__(
        self,
        directory: ProviderDirectory,
        trusted_callers: Mapping[str, frozenset[str]],
        *,
        timeout_s: float,
        cache_ttl_s: float,
        cache_max_entries: int = 10000,
    ) -> None:
        self._directory = directory
        self._trusted = dict(trusted_callers)
        self._timeout_s = timeout_s
        self._cache: TTLCache[tuple[str, str, str, str], common_pb2.RecordContext] | None = (
            TTLCache(maxsize=cache_max_entries, ttl=cache_ttl_s) if cache_ttl_s > 0 else None
        )

    def has_source(self, record_type: str) -> bool:
        """A system of record speaks for the type (or did, and is away now)."""
        return self._directory.record_source(record_type) is not None or bool(
            self._directory.departed_source(record_type)
        )

    def unverified(self, claimed: common_pb2.RecordContext) -> VerifiedRecord:
        """The caller's claim, marked as nobody's word (e.g. while the source is down)."""
        return VerifiedRecord(claimed, _facts(claimed, UNVERIFIED, "", ""))

    async def resolve(
        self, caller: Caller, claimed: common_pb2.RecordContext, *, fresh: bool = True
    ) -> VerifiedRecord:
        """The facts to govern ``claimed`` on (tenant, type and id already checked)."""
        source = self._directory.record_source(claimed.type)
        if source is not None:
            record = await self._from_source(source, caller.tenant, claimed, fresh)
            return VerifiedRecord(
                record, _facts(record, PROVIDER, source.provider_id, claimed.version)
            )
        departed = self._directory.departed_source(claimed.type)
        if departed:
            raise source_unavailable(departed, claimed.type, "is not registered")
        if caller.service and claimed.type in self._trusted.get(caller.service, ()):
            return VerifiedRecord(claimed, _facts(claimed, TRUSTED_CALLER, caller.service, ""))
        return VerifiedRecord(claimed, _facts(claimed, UNVERIFIED, "", ""))

    async def _from_source(
        self,
        source: ProviderEntry,
        tenant: str,
        claimed: common_pb2.RecordContext,
        fresh: bool,
    ) -> common_pb2.RecordContext:
        key = (source.provider_id, tenant, claimed.type, claimed.id)
        if not fresh and self._cache is not None:
            cached = self._cache.get(key)
            # The caller saw another version than the cached one: it may be newer.
            if cached is not None and (not claimed.version or claimed.version == cached.version):
                return cached
        record = await self._ask(source, tenant, claimed)
        if self._cache is not None:
            self._cache[key] = record
        return record

    async def _ask(
        self, source: ProviderEntry, tenant: str, claimed: common_pb2.RecordContext
    ) -> common_pb2.RecordContext:
        if source.not_serving:
            raise source_unavailable(source.provider_id, claimed.type, "is not healthy")
        request = provider_pb2.ResolveRecordRequest(
            tenant=tenant, record=common_pb2.RecordRef(type=claimed.type, id=claimed.id)
        )
        with tracer.start_as_current_span(
            "facts.resolve",
            attributes={
                "actionmesh.provider_id": source.provider_id,
                "actionmesh.record.type": claimed.type,
            },
        ):
            try:
                reply = await self._directory.stub(source).ResolveRecord(
                    request, timeout=self._timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise NotFound(
                        f"no {claimed.type} record {claimed.id!r} in this tenant",
                        reason="RECORD_NOT_FOUND",
                        metadata={"provider_id": source.provider_id},
                    ) from None
                log.warning(
                    "record source %s failed for %s: %s",
                    source.provider_id,
                    claimed.type,
                    exc.code().name,
                )
                raise source_unavailable(
                    source.provider_id, claimed.type, f"did not answer ({exc.code().name})"
                ) from None
        # The one rule of a valid answer, shared with the conformance kit's source.answer.
        problems = resolved_record_violations(reply, tenant, claimed.type, claimed.id)
        if problems:
            log.warning(
                "record source %s answered a malformed record for %s: %s",
                source.provider_id,
                (tenant, claimed.type, claimed.id),
                ", ".join(sorted({p.field for p in problems})),
            )
            raise source_unavailable(
                source.provider_id, claimed.type, "answered a malformed record"
            )
        return reply.record
