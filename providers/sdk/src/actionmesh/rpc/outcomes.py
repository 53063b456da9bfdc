"""The outcome vocabulary, one for the whole mesh, and its one conversion to and from
the contract's ``actionmesh.v1.Outcome``.

=================  ================================================  ==============
outcome            meaning                                           retry safe?
=================  ================================================  ==============
SUCCEEDED          the provider did the work                         n/a
PENDING_APPROVAL   needs a second person; nothing ran yet            n/a
DENIED             the platform refused                              no
REJECTED           the provider refused                              no, fix first
UNAVAILABLE        provider unreachable or not healthy; nothing ran  yes
TIMED_OUT          deadline passed; it may or may not have acted     same key only
PARTIAL            the work succeeded but a later step failed        human follow-up
ACCEPTED           long-running: accepted, still at work (not final) no, same execution
CANCELLED          long-running: stopped at a caller's request       n/a
=================  ================================================  ==============

Final are all but PENDING_APPROVAL and ACCEPTED. An outcome that leaves open whether
the provider acted (TIMED_OUT; PARTIAL ``DOWNSTREAM_OUTCOME_UNKNOWN``) is settled
afterwards by asking the provider (the gateway's reconciler): what the caller was told
stays, the resolved outcome is added.

:func:`outcome_for_status` is how a provider's deliberate gRPC status reads as an
outcome: the gateway records it, the SDK traces it, from this one table.
"""

from __future__ import annotations

import enum

import grpc

from actionmesh.v1 import common_pb2

__all__ = [
    "FINAL_PROVIDER_OUTCOMES",
    "LONG_RUNNING_OUTCOMES",
    "PROVIDER_OUTCOMES",
    "Outcome",
    "outcome_for_status",
]


class Outcome(enum.StrEnum):
    """One outcome (its value is the name stored in databases and shown to people)."""

    SUCCEEDED = "SUCCEEDED"
    PENDING_APPROVAL = "PENDING_APPROVAL"
    DENIED = "DENIED"
    REJECTED = "REJECTED"
    UNAVAILABLE = "UNAVAILABLE"
    TIMED_OUT = "TIMED_OUT"
    PARTIAL = "PARTIAL"
    ACCEPTED = "ACCEPTED"
    CANCELLED = "CANCELLED"

    def to_proto(self) -> common_pb2.Outcome.ValueType:
        return common_pb2.Outcome.Value(f"OUTCOME_{self.value}")

    @classmethod
    def from_proto(cls, value: common_pb2.Outcome.ValueType) -> Outcome | None:
        """The outcome a proto value names; None for OUTCOME_UNSPECIFIED."""
        if value == common_pb2.OUTCOME_UNSPECIFIED:
            return None
        return cls(common_pb2.Outcome.Name(value).removeprefix("OUTCOME_"))

    @classmethod
    def proto_of(cls, name: str) -> common_pb2.Outcome.ValueType:
        """The proto value of a stored outcome name (OUTCOME_UNSPECIFIED for none)."""
        return cls(name).to_proto() if name else common_pb2.OUTCOME_UNSPECIFIED


PROVIDER_OUTCOMES = frozenset({Outcome.SUCCEEDED, Outcome.REJECTED, Outcome.PARTIAL})
"""What a provider may answer Execute with; the rest are the platform's to decide."""

LONG_RUNNING_OUTCOMES = PROVIDER_OUTCOMES | {Outcome.ACCEPTED}
"""What a provider may answer Execute with for a long-running action."""

FINAL_PROVIDER_OUTCOMES = PROVIDER_OUTCOMES | {Outcome.CANCELLED}
"""What a provider may report as the final answer of a long-running execution
(GetExecutionStatus FINISHED): CANCELLED only after it was asked to stop."""

_REJECTING = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def outcome_for_status(code: grpc.StatusCode) -> Outcome:
    """The outcome a provider's deliberate error status stands for."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Outcome.UNAVAILABLE
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Outcome.TIMED_OUT
    if code in _REJECTING:
        return Outcome.REJECTED
    return Outcome.PARTIAL
