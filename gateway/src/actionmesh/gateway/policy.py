"""Authorization with Cedar (cedarpy): the same inputs at discovery and execution.

Cedar was chosen because its model (principal attributes, resource attributes,
request context, forbid overriding permit, policy ids for evidence) maps one to
one onto role / record status / sensitivity / risk, and policies stay readable
for the operators who edit the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import cedarpy
from cachetools import LRUCache
from opentelemetry import trace

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.model import Quorum
from actionmesh.rpc.convert import utcnow
from actionmesh.v1 import audit_pb2, common_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")

PRINCIPAL_TYPE = "ActionMesh::Operator"
RESOURCE_TYPE = "ActionMesh::ProviderAction"
ACTION_TYPE = "ActionMesh::Action"
# Decisions remembered per exact input (see PolicyEngine._authorize).
DECISION_CACHE_ENTRIES = 8192


class Operation(StrEnum):
    DISCOVER = "discover"
    EXECUTE = "execute"
    APPROVE = "approve"
    CANCEL = "cancel"
    # Asked at ExecuteAction for an action that requires approval: the permit policies
    # that apply say, in annotations, how many approvers and which roles it needs.
    QUORUM = "quorum"
    RESOLVE = "resolve"


@dataclass(frozen=True)
class Decision:
    """A policy decision and the evidence behind it."""

    allowed: bool
    policy_ids: tuple[str, ...]
    errors: tuple[str, ...] = ()
    positions: tuple[str, ...] = field(default=(), compare=False)
    """Cedar's own ids of the deciding policies (to find their annotations)."""


def decision_evidence(
    operation: Operation, subject: ActionSubject, decision: Decision
) -> audit_pb2.PolicyDecision:
    return audit_pb2.PolicyDecision(
        operation=operation.value,
        action_id=subject.action_id,
        provider_id=subject.provider_id,
        allowed=decision.allowed,
        policy_ids=list(decision.policy_ids),
        errors=list(decision.errors),
    )


@dataclass(frozen=True)
class ActionSubject:
    """What policy needs to know about one action."""

    action_id: str
    provider_id: str
    descriptor: common_pb2.ActionDescriptor


class PolicyError(ValueError):
    """The policy file could not be parsed."""


def sensitivity_name(value: int) -> str:
    if value in (common_pb2.SENSITIVITY_UNSPECIFIED, common_pb2.SENSITIVITY_NORMAL):
        return "normal"
    return common_pb2.Sensitivity.Name(value).removeprefix("SENSITIVITY_").lower()  # type: ignore[arg-type]


def risk_name(value: int) -> str:
    if value == common_pb2.RISK_UNSPECIFIED:
        return "medium"
    return common_pb2.Risk.Name(value).removeprefix("RISK_").lower()  # type: ignore[arg-type]


UNVERIFIED = "unverified"
"""The fact source of a record nobody the platform trusts vouched for (see facts.py)."""


def record_context(record: common_pb2.RecordContext, source: str = UNVERIFIED) -> dict[str, Any]:
    return {
        "tenant": record.tenant,
        "type": record.type,
        "id": record.id,
        "status": record.status,
        "sensitivity": sensitivity_name(record.sensitivity),
        "attributes": dict(record.attributes),
        # Who vouched for the facts: "provider", "trusted_caller" or "unverified".
        "source": source,
        "verified": source != UNVERIFIED,
    }


def policy_context(
    caller: Caller, record: common_pb2.RecordContext, source: str = UNVERIFIED
) -> dict[str, str]:
    """The inputs a decision was taken on, flattened for the audit event."""
    context = {
        "principal.subject": caller.subject,
        "principal.tenant": caller.tenant,
        "principal.roles": ",".join(sorted(caller.roles)),
        "record.status": record.status,
        "record.sensitivity": sensitivity_name(record.sensitivity),
        "record.source": source,
        "record.verified": "true" if source != UNVERIFIED else "false",
    }
    for name, value in sorted(record.attributes.items()):
        context[f"record.attributes.{name}"] = value
    return context


@dataclass(frozen=True)
class LoadedPolicies:
    """One parsed policy file: what is in force and how to name it in evidence."""

    policies: cedarpy.PolicySet
    names: dict[str, str]
    digest: str
    loaded_at: datetime
    quorums: dict[str, Quorum] = field(default_factory=dict)
    """The quorum each ``quorum`` policy asks for (by Cedar's positional id)."""

    @property
    def policy_ids(self) -> list[str]:
        return sorted(self.names.values())


@dataclass(frozen=True)
class PolicyStatus:
    path: str
    digest: str
    loaded_at: datetime
    policy_ids: list[str]
    reload_error: str
    reload_error_at: datetime | None


# The most approvers a policy may ask for (a typo must not make an action unapprovable).
MAX_APPROVERS = 5
_ROLE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def parse_policies(path: Path, text: str) -> LoadedPolicies:
    try:
        policies = cedarpy.PolicySet.from_str(text)
        names, quorums = _policy_names(text)
    except ValueError as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    return LoadedPolicies(
        policies=policies,
        names=names,
        digest=hashlib.sha256(text.encode()).hexdigest(),
        loaded_at=utcnow(),
        quorums=quorums,
    )


class PolicyEngine:
    """Evaluates the operator's Cedar policy file, reloading it when it changes.

    A file that fails to parse never replaces the policies in force: the error
    is logged and reported by :meth:`status` until a good file is saved.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._loaded = parse_policies(self.path, self.path.read_text())
        self._reload_error = ""
        self._reload_error_at: datetime | None = None
        self._failed_digest = ""
        self._lock = threading.Lock()
        # A decision is a pure function of the policies in force and of the request
        # entities and context. The key holds all of them (the policy digest too, so a
        # reload starts afresh): a repeated call (a UI refresh, the same operator acting
        # on the same record) is a dictionary lookup instead of a Cedar evaluation.
        self._decisions: LRUCache[tuple[Any, ...], Decision] = LRUCache(DECISION_CACHE_ENTRIES)
        self._decisions_lock = threading.Lock()

    def reload_if_changed(self) -> bool | None:
        """Reload when the file's content changed: True loaded, False refused, None unchanged."""
        with self._lock:
            try:
                text = self.path.read_text()
            except OSError as exc:
                return self._refuse(hashlib.sha256(str(exc).encode()).hexdigest(), str(exc))
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest == self._loaded.digest:
                if self._reload_error:
                    # The file was put back as it is in force: nothing is pending any more.
                    self._reload_error, self._reload_error_at, self._failed_digest = "", None, ""
                return None
            if digest == self._failed_digest:
                return None
            try:
                loaded = parse_policies(self.path, text)
            except PolicyError as exc:
                return self._refuse(digest, str(exc))
            self._loaded = loaded
            self._reload_error, self._reload_error_at, self._failed_digest = "", None, ""
            log.info(
                "policies reloaded from %s (sha256 %s): %s",
                self.path,
                loaded.digest[:12],
                ", ".join(loaded.policy_ids),
            )
            return True

    def _refuse(self, digest: str, error: str) -> bool:
        log.error("policy file %s rejected, previous policies stay in force: %s", self.path, error)
        self._failed_digest = digest
        self._reload_error = error
        self._reload_error_at = utcnow()
        return False

    def status(self) -> PolicyStatus:
        loaded = self._loaded
        return PolicyStatus(
            path=str(self.path),
            digest=loaded.digest,
            loaded_at=loaded.loaded_at,
            policy_ids=loaded.policy_ids,
            reload_error=self._reload_error,
            reload_error_at=self._reload_error_at,
        )

    def authorize(
        self,
        operation: Operation,
        caller: Caller,
        record: common_pb2.RecordContext,
        subjects: Sequence[ActionSubject],
        *,
        source: str = UNVERIFIED,
    ) -> list[Decision]:
        """One decision per subject, evaluated in one batch against the policies in force.

        ``source`` says who vouched for the record's facts (context.record.source).
        """
        if not subjects:
            return []
        with tracer.start_as_current_span(
            "policy.authorize",
            attributes={
                "actionmesh.policy.operation": operation.value,
                "actionmesh.tenant": caller.tenant,
                "actionmesh.record.type": record.type,
                "actionmesh.policy.subjects": len(subjects),
            },
        ) as span:
            decisions = self._authorize(operation, caller, record, subjects, source)
            span.set_attribute("actionmesh.policy.allowed", sum(d.allowed for d in decisions))
            if len(subjects) == 1:
                span.set_attribute("actionmesh.action_id", subjects[0].action_id)
                span.set_attribute("actionmesh.provider_id", subjects[0].provider_id)
                span.set_attribute("actionmesh.policy.ids", list(decisions[0].policy_ids))
            return decisions

    def quorum(
        self,
        caller: Caller,
        record: common_pb2.RecordContext,
        subject: ActionSubject,
        inputs: dict[str, str],
        *,
        source: str = UNVERIFIED,
    ) -> Quorum:
        """The quorum an execution of ``subject`` by ``caller`` needs: the largest number
        of approvers and every role the applying ``quorum`` policies ask for (``inputs``
        are in ``context.inputs``, display strings); one approver when none applies."""
        loaded = self._loaded
        [decision] = self._evaluate(
            loaded, Operation.QUORUM, caller, record, [subject], source, inputs=inputs
        )
        applying = [
            loaded.quorums[position]
            for position in decision.positions
            if decision.allowed and position in loaded.quorums
        ]
        if not applying:
            return Quorum()
        return Quorum(
            approvers=max(rule.approvers for rule in applying),
            roles=tuple(sorted({role for rule in applying for role in rule.roles})),
            policy_ids=tuple(sorted({p for rule in applying for p in rule.policy_ids})),
        )

    def _authorize(
        self,
        operation: Operation,
        caller: Caller,
        record: common_pb2.RecordContext,
        subjects: Sequence[ActionSubject],
        source: str,
    ) -> list[Decision]:
        loaded = self._loaded
        shared = (
            loaded.digest,
            operation.value,
            caller.subject,
            caller.tenant,
            tuple(caller.roles),
            record.tenant,
            record.type,
            record.id,
            record.status,
            record.sensitivity,
            tuple(sorted(record.attributes.items())),
            source,
        )
        keys = [
            (
                *shared,
                subject.action_id,
                subject.provider_id,
                subject.descriptor.risk,
                subject.descriptor.reversible,
                subject.descriptor.requires_approval,
            )
            for subject in subjects
        ]
        with self._decisions_lock:
            known = [self._decisions.get(key) for key in keys]
        missing = [i for i, decision in enumerate(known) if decision is None]
        if missing:
            fresh = self._evaluate(
                loaded, operation, caller, record, [subjects[i] for i in missing], source
            )
            with self._decisions_lock:
                for i, decision in zip(missing, fresh, strict=True):
                    known[i] = self._decisions[keys[i]] = decision
        return [decision for decision in known if decision is not None]

    @staticmethod
    def _evaluate(
        loaded: LoadedPolicies,
        operation: Operation,
        caller: Caller,
        record: common_pb2.RecordContext,
        subjects: Sequence[ActionSubject],
        source: str,
        *,
        inputs: dict[str, str] | None = None,
    ) -> list[Decision]:
        principal = {"type": PRINCIPAL_TYPE, "id": caller.subject}
        entities: list[dict[str, Any]] = [
            {
                "uid": principal,
                "attrs": {"tenant": caller.tenant, "roles": list(caller.roles)},
                "parents": [],
            }
        ]
        requests = []
        context: dict[str, Any] = {"record": record_context(record, source)}
        if inputs is not None:
            context["inputs"] = inputs
        for subject in subjects:
            resource = {"type": RESOURCE_TYPE, "id": subject.action_id}
            entities.append(
                {
                    "uid": resource,
                    "attrs": {
                        "provider": subject.provider_id,
                        "risk": risk_name(subject.descriptor.risk),
                        "reversible": subject.descriptor.reversible,
                        "requires_approval": subject.descriptor.requires_approval,
                    },
                    "parents": [],
                }
            )
            requests.append(
                {
                    "principal": principal,
                    "action": {"type": ACTION_TYPE, "id": operation.value},
                    "resource": resource,
                    "context": context,
                }
            )
        results = cedarpy.is_authorized_batch(requests, loaded.policies, entities)
        decisions = []
        for result in results:
            errors = tuple(str(e) for e in result.diagnostics.errors)
            if errors:
                log.warning("policy evaluation errors: %s", errors)
            reasons = tuple(result.diagnostics.reasons)
            decisions.append(
                Decision(
                    allowed=bool(result.allowed),
                    policy_ids=tuple(loaded.names.get(p, p) for p in reasons),
                    errors=errors,
                    positions=reasons,
                )
            )
        return decisions


def _policy_names(text: str) -> tuple[dict[str, str], dict[str, Quorum]]:
    """Map Cedar's positional ids (policy0, ...) to their @id annotations, and read the
    quorum the ``@approvers("N")`` / ``@approver_roles("a,b")`` annotations ask for.
    ValueError for a malformed quorum (so a bad file is refused, not half applied)."""
    parsed = json.loads(cedarpy.policies_to_json_str(text))
    names: dict[str, str] = {}
    quorums: dict[str, Quorum] = {}
    for position, policy in parsed.get("staticPolicies", {}).items():
        annotations = policy.get("annotations", {})
        name = annotations.get("id", position)
        names[position] = name
        if "approvers" in annotations or "approver_roles" in annotations:
            quorums[position] = _quorum_of(name, annotations)
    return names, quorums


def _quorum_of(name: str, annotations: dict[str, str]) -> Quorum:
    raw = annotations.get("approvers", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_APPROVERS:
        raise ValueError(f'policy {name}: @approvers must be "1" to "{MAX_APPROVERS}", got {raw!r}')
    roles = tuple(r.strip() for r in annotations.get("approver_roles", "").split(",") if r.strip())
    for role in roles:
        if not _ROLE.match(role):
            raise ValueError(f"policy {name}: @approver_roles has an invalid role {role!r}")
    return Quorum(approvers=int(raw), roles=roles, policy_ids=(name,))
