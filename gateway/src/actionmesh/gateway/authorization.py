"""Where every governed decision is made: discover, execute and approve share one path.

Discovery asks about every action a record type has; ExecuteAction about one action for
the requester; an approval asks twice, whether the approver may approve and whether
the requester may still execute, on the record as it is now. Each answer carries the
evidence an audit event keeps (the decisions, the policies that made them and the
context they saw), so the caller of this module never builds evidence by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.directory import ProviderEntry
from actionmesh.gateway.facts import VerifiedRecord
from actionmesh.gateway.policy import (
    ActionSubject,
    Decision,
    Operation,
    PolicyEngine,
    Quorum,
    decision_evidence,
    policy_context,
)
from actionmesh.rpc.convert import display_input
from actionmesh.v1 import audit_pb2, common_pb2


@dataclass(frozen=True)
class Authorized:
    """One decision on one action, with the evidence an audit event keeps."""

    entry: ProviderEntry
    descriptor: common_pb2.ActionDescriptor
    decision: Decision
    evidence: list[audit_pb2.PolicyDecision] = field(default_factory=list)
    context: dict[str, str] = field(default_factory=dict)
    facts: common_pb2.RecordFacts | None = None
    """The facts the decision was taken on and who vouched for them."""
    quorum: Quorum = field(default_factory=Quorum)
    """For an allowed execution of an action that requires approval: the approvers it
    needs (policy action ``quorum``)."""

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


@dataclass(frozen=True)
class Visibility:
    """Discovery's decisions: one per action the record type has."""

    subjects: list[ActionSubject]
    decisions: list[Decision]
    context: dict[str, str]
    facts: common_pb2.RecordFacts

    @property
    def evidence(self) -> list[audit_pb2.PolicyDecision]:
        return [
            decision_evidence(Operation.DISCOVER, s, d)
            for s, d in zip(self.subjects, self.decisions, strict=True)
        ]

    def visible(self) -> list[ActionSubject]:
        return [s for s, d in zip(self.subjects, self.decisions, strict=True) if d.allowed]


class Authorizer:
    """The policy engine, asked the questions the gateway has."""

    def __init__(self, policy: PolicyEngine) -> None:
        self._policy = policy

    def discover(
        self,
        caller: Caller,
        verified: VerifiedRecord,
        entries: Sequence[ProviderEntry],
    ) -> Visibility:
        """Which of the actions ``entries`` offer for ``record``'s type the caller may see."""
        record, source = verified.record, verified.source_name
        subjects = [
            ActionSubject(d.action_id, e.provider_id, d)
            for e in entries
            for d in e.registration.actions
            if record.type in d.record_types
        ]
        decisions = self._policy.authorize(
            Operation.DISCOVER, caller, record, subjects, source=source
        )
        return Visibility(
            subjects, decisions, policy_context(caller, record, source), verified.facts
        )

    def execute(
        self,
        caller: Caller,
        verified: VerifiedRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
        inputs: Mapping[str, common_pb2.InputValue] | None = None,
    ) -> Authorized:
        """May ``caller`` run the action on the record; with ``inputs``, for an action
        that requires approval, also how many approvers it needs (``quorum``)."""
        authorized = self._one(Operation.EXECUTE, caller, verified, entry, descriptor)
        if inputs is None or not descriptor.requires_approval or not authorized.allowed:
            return authorized
        quorum = self._policy.quorum(
            caller,
            verified.record,
            ActionSubject(descriptor.action_id, entry.provider_id, descriptor),
            {name: display_input(value) for name, value in inputs.items()},
            source=verified.source_name,
        )
        return replace(authorized, quorum=quorum)

    def approve(
        self,
        approver: Caller,
        verified: VerifiedRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
    ) -> Authorized:
        """May ``approver`` decide another person's execution of the action on the record."""
        return self._one(Operation.APPROVE, approver, verified, entry, descriptor)

    def cancel(
        self,
        caller: Caller,
        verified: VerifiedRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
    ) -> Authorized:
        """May ``caller`` stop a running execution of the action on the record."""
        return self._one(Operation.CANCEL, caller, verified, entry, descriptor)

    def resolve(
        self,
        caller: Caller,
        verified: VerifiedRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
    ) -> Authorized:
        """May ``caller`` record what became of an execution of the action on the record."""
        return self._one(Operation.RESOLVE, caller, verified, entry, descriptor)

    def _one(
        self,
        operation: Operation,
        caller: Caller,
        verified: VerifiedRecord,
        entry: ProviderEntry,
        descriptor: common_pb2.ActionDescriptor,
    ) -> Authorized:
        record, source = verified.record, verified.source_name
        subject = ActionSubject(descriptor.action_id, entry.provider_id, descriptor)
        decision = self._policy.authorize(operation, caller, record, [subject], source=source)[0]
        return Authorized(
            entry=entry,
            descriptor=descriptor,
            decision=decision,
            evidence=[decision_evidence(operation, subject, decision)],
            context=policy_context(caller, record, source),
            facts=verified.facts,
        )
