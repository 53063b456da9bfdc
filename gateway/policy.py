"""Authorization with Cedar (cedarpy): the same inputs at discovery and execution.

Cedar was chosen because its model (principal attributes, resource attributes,
request context, forbid overriding permit, policy ids for evidence) maps one to
one onto role / record status / sensitivity / risk, and policies stay readable
for the operators who edit the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import cedarpy

from actionmesh.v1 import common_pb2
from gateway.auth import Caller

log = logging.getLogger(__name__)

PRINCIPAL_TYPE = "ActionMesh::Operator"
RESOURCE_TYPE = "ActionMesh::ProviderAction"
ACTION_TYPE = "ActionMesh::Action"


class Operation(StrEnum):
    DISCOVER = "discover"
    EXECUTE = "execute"


@dataclass(frozen=True)
class Decision:
    """A policy decision and the evidence behind it."""

    allowed: bool
    policy_ids: tuple[str, ...]
    errors: tuple[str, ...] = ()


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


def record_context(record: common_pb2.RecordContext) -> dict[str, Any]:
    return {
        "tenant": record.tenant,
        "type": record.type,
        "id": record.id,
        "status": record.status,
        "sensitivity": sensitivity_name(record.sensitivity),
        "attributes": dict(record.attributes),
    }


class PolicyEngine:
    """Evaluates the operator's Cedar policy file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        text = self.path.read_text()
        try:
            self._policies = cedarpy.PolicySet.from_str(text)
            self._names = _policy_names(text)
        except ValueError as exc:
            raise PolicyError(f"{self.path}: {exc}") from exc

    def authorize(
        self,
        operation: Operation,
        caller: Caller,
        record: common_pb2.RecordContext,
        subjects: Sequence[ActionSubject],
    ) -> list[Decision]:
        """One decision per subject, evaluated in one batch."""
        if not subjects:
            return []
        principal = {"type": PRINCIPAL_TYPE, "id": caller.subject}
        entities: list[dict[str, Any]] = [
            {
                "uid": principal,
                "attrs": {"tenant": caller.tenant, "roles": list(caller.roles)},
                "parents": [],
            }
        ]
        requests = []
        context = {"record": record_context(record)}
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
        results = cedarpy.is_authorized_batch(requests, self._policies, entities)
        decisions = []
        for result in results:
            errors = tuple(str(e) for e in result.diagnostics.errors)
            if errors:
                log.warning("policy evaluation errors: %s", errors)
            decisions.append(
                Decision(
                    allowed=bool(result.allowed),
                    policy_ids=tuple(self._names.get(p, p) for p in result.diagnostics.reasons),
                    errors=errors,
                )
            )
        return decisions


def _policy_names(text: str) -> dict[str, str]:
    """Map Cedar's positional ids (policy0, ...) to their @id annotations."""
    parsed = json.loads(cedarpy.policies_to_json_str(text))
    names = {}
    for position, policy in parsed.get("staticPolicies", {}).items():
        names[position] = policy.get("annotations", {}).get("id", position)
    return names
