"""DiscoverActions: policy first, then a parallel fan-out with per-provider deadlines.

Policy runs on the descriptors the registry already holds, so providers are only
asked about actions the caller could see; a slow or unhealthy provider is
reported as degraded and never holds the others' answer past its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc.aio
from opentelemetry import trace

from actionmesh.v1 import common_pb2, provider_pb2
from gateway.auth import Caller
from gateway.directory import ProviderDirectory, ProviderEntry
from gateway.policy import ActionSubject, Operation, PolicyEngine
from gateway.requests import check_record
from gateway.tenancy import require_same_tenant

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")


@dataclass(frozen=True)
class VisibleAction:
    descriptor: common_pb2.ActionDescriptor
    provider_id: str
    available: bool
    unavailable_reason: str


@dataclass(frozen=True)
class DiscoveryResult:
    actions: list[VisibleAction]
    degraded: list[tuple[str, str]]


class Discoverer:
    def __init__(
        self, directory: ProviderDirectory, policy: PolicyEngine, timeout_s: float
    ) -> None:
        self._directory = directory
        self._policy = policy
        self._timeout_s = timeout_s

    async def discover(
        self, caller: Caller, record: common_pb2.RecordContext, has_record: bool
    ) -> DiscoveryResult:
        check_record(record, has_record)
        require_same_tenant(caller, record)
        entries = self._directory.providers_for(record.type)
        subjects = [
            ActionSubject(d.action_id, e.provider_id, d)
            for e in entries
            for d in e.registration.actions
            if record.type in d.record_types
        ]
        decisions = self._policy.authorize(Operation.DISCOVER, caller, record, subjects)
        visible: dict[str, list[common_pb2.ActionDescriptor]] = {}
        for subject, decision in zip(subjects, decisions, strict=True):
            if decision.allowed:
                visible.setdefault(subject.provider_id, []).append(subject.descriptor)
        asked = [e for e in entries if e.provider_id in visible]
        answers = await asyncio.gather(*(self._ask(e, caller, record) for e in asked))
        actions: list[VisibleAction] = []
        degraded: list[tuple[str, str]] = []
        for entry, answer in zip(asked, answers, strict=True):
            if isinstance(answer, str):
                degraded.append((entry.provider_id, answer))
                continue
            for descriptor in visible[entry.provider_id]:
                found = answer.get(descriptor.action_id)
                if found is None:
                    continue
                actions.append(VisibleAction(descriptor, entry.provider_id, found[0], found[1]))
        return DiscoveryResult(actions=actions, degraded=degraded)

    async def _ask(
        self, entry: ProviderEntry, caller: Caller, record: common_pb2.RecordContext
    ) -> dict[str, tuple[bool, str]] | str:
        """The provider's availability per action id, or a degradation reason."""
        if entry.not_serving:
            return "NOT_SERVING"
        with tracer.start_as_current_span(
            "discover provider", attributes={"actionmesh.provider": entry.provider_id}
        ):
            try:
                reply = await self._directory.stub(entry).Discover(
                    provider_pb2.DiscoverRequest(
                        record=record,
                        operator=common_pb2.Operator(
                            subject=caller.subject, tenant=caller.tenant, roles=caller.roles
                        ),
                    ),
                    timeout=self._timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                log.info("discover on %s failed: %s", entry.provider_id, exc.code().name)
                return exc.code().name
        return {a.action_id: (a.available, a.unavailable_reason) for a in reply.actions}
