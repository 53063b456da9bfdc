"""The gateway's execution model: the states an execution moves through, as types.

An execution is RUNNING while its dispatch is under way, PENDING_APPROVAL while it
waits for a second person, and otherwise finished with one outcome of the mesh's
vocabulary (:class:`~actionmesh.rpc.outcomes.Outcome`). Its approval, when the action
requires one, is PENDING, then APPROVED, REJECTED or EXPIRED. The values are what the
gateway's database stores (each member's name is its value), so plain strings read
back from a row compare equal to them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from actionmesh.rpc.outcomes import Outcome
from actionmesh.v1 import common_pb2, gateway_pb2


class ExecutionState(enum.StrEnum):
    """Where an execution stands: running, waiting for approval, or its outcome."""

    RUNNING = "RUNNING"
    PENDING_APPROVAL = "PENDING_APPROVAL"
    SUCCEEDED = "SUCCEEDED"
    DENIED = "DENIED"
    REJECTED = "REJECTED"
    UNAVAILABLE = "UNAVAILABLE"
    TIMED_OUT = "TIMED_OUT"
    PARTIAL = "PARTIAL"

    @property
    def outcome(self) -> Outcome | None:
        """The outcome this state reports (None while RUNNING)."""
        return None if self is ExecutionState.RUNNING else Outcome(self.value)

    def to_proto(self) -> common_pb2.Outcome.ValueType:
        outcome = self.outcome
        return common_pb2.OUTCOME_UNSPECIFIED if outcome is None else outcome.to_proto()


class ApprovalState(enum.StrEnum):
    """Where an execution's approval stands (actions that require one)."""

    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"

    def to_proto(self) -> gateway_pb2.ApprovalState.ValueType:
        return gateway_pb2.ApprovalState.Value(f"APPROVAL_STATE_{self.value}")


for _kind in (ExecutionState, ApprovalState):
    # Stored and bound as text: a member's name and value must never differ.
    assert all(member.name == member.value for member in _kind), _kind

# The names the rest of the gateway uses.
RUNNING = ExecutionState.RUNNING
PENDING_APPROVAL = ExecutionState.PENDING_APPROVAL
APPROVAL_PENDING = ApprovalState.PENDING
APPROVAL_APPROVED = ApprovalState.APPROVED
APPROVAL_REJECTED = ApprovalState.REJECTED
APPROVAL_EXPIRED = ApprovalState.EXPIRED
# How an orphaned execution (its gateway stopped while the provider worked) is closed.
ORPHAN_OUTCOME = ExecutionState.TIMED_OUT
ORPHAN_REASON = "GATEWAY_STOPPED"
ORPHAN_MESSAGE = (
    "the gateway stopped while the provider was working on it; it may or may not have acted. "
    "Retry only with the same idempotency key"
)


@dataclass
class ExecutionRecord:
    """An execution as the domain sees it (no ORM state leaks out)."""

    execution_id: str
    tenant: str
    idempotency_key: str
    request_hash: str
    action_id: str
    provider_id: str
    record_type: str
    record_id: str
    actor: str
    outcome: str
    started_at: datetime
    reason: str = ""
    message: str = ""
    external_ref: str = ""
    changes: list[tuple[str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    trace_id: str = ""
    finished_at: datetime | None = None
    request_payload: bytes = b""
    requester_roles: list[str] = field(default_factory=list)
    sensitive: bool = False
    approval_state: str = ""
    approval_expires_at: datetime | None = None
    approval_decided_at: datetime | None = None
    approver: str = ""
    approval_comment: str = ""
    late_outcome: str = ""
    late_result_at: datetime | None = None
    dispatch_deadline: datetime | None = None

    @property
    def finished(self) -> bool:
        """No dispatch is under way (pending approval counts: nothing runs until decided)."""
        return self.outcome != ExecutionState.RUNNING


@dataclass(frozen=True)
class ApprovalDecision:
    """How a pending execution leaves PENDING_APPROVAL."""

    state: str
    outcome: str
    approver: str
    comment: str
    decided_at: datetime
    reason: str = ""
    message: str = ""
    dispatch_deadline: datetime | None = None
    """When the dispatch an approval starts must have ended (outcome RUNNING only)."""
