"""The values a provider author handles: records, operators, availability, results."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from opentelemetry.trace import Span

from actionmesh.rpc.identifiers import REASON
from actionmesh.v1 import common_pb2, provider_pb2

_SENSITIVITY = {
    common_pb2.SENSITIVITY_UNSPECIFIED: "normal",
    common_pb2.SENSITIVITY_NORMAL: "normal",
    common_pb2.SENSITIVITY_SENSITIVE: "sensitive",
    common_pb2.SENSITIVITY_RESTRICTED: "restricted",
}

_SENSITIVITY_VALUE = {
    "normal": common_pb2.SENSITIVITY_NORMAL,
    "sensitive": common_pb2.SENSITIVITY_SENSITIVE,
    "restricted": common_pb2.SENSITIVITY_RESTRICTED,
}
MAX_FACT_VERSION_CHARS = 128

# Results are stored, audited and shown on a record's timeline: keep them small.
MAX_MESSAGE_CHARS = 2000
MAX_REF_CHARS = 512
MAX_CHANGES = 50
MAX_WARNINGS = 20
MAX_DISPLAY_CHARS = 1000


def _check_reason(reason: str) -> str:
    if not REASON.valid(reason):
        raise ValueError(f"reason must be UPPER_SNAKE (e.g. 'NOT_FAILED'), got {reason!r}")
    return reason


class Risk(enum.Enum):
    """How risky an action is; an input to the gateway's policy."""

    LOW = common_pb2.RISK_LOW
    MEDIUM = common_pb2.RISK_MEDIUM
    HIGH = common_pb2.RISK_HIGH


@dataclass(frozen=True)
class Unavailable:
    """An availability predicate's "no", with a machine-readable UPPER_SNAKE reason.

    Falsy, so ``cond or Unavailable("WHY")`` reads naturally and the result can be
    tested with ``if``.
    """

    reason: str = "NOT_AVAILABLE"

    def __post_init__(self) -> None:
        _check_reason(self.reason)

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class RecordView:
    """The record an action is discovered for or executed on, as the caller describes it.

    The caller's view, not the provider's state: providers re-check their own
    state at execution.
    """

    tenant: str
    type: str
    id: str
    status: str
    # "normal", "sensitive" or "restricted".
    sensitivity: str = "normal"
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_proto(cls, record: common_pb2.RecordContext) -> RecordView:
        return cls(
            tenant=record.tenant,
            type=record.type,
            id=record.id,
            status=record.status,
            sensitivity=_SENSITIVITY.get(record.sensitivity, "normal"),
            attributes=MappingProxyType(dict(record.attributes)),
        )


@dataclass(frozen=True)
class Facts:
    """What a system of record says about one of its records right now.

    Returned by a ``@provider.record_source(...)`` resolver. The gateway governs on
    these facts (policy, discovery, redaction, approvals), never on the caller's
    claims, and names this provider in the evidence. ``version`` must change
    whenever any of the facts does (a revision number, an etag, an update stamp).
    """

    status: str
    version: str
    # "normal", "sensitive" or "restricted".
    sensitivity: str = "normal"
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.version, str) or not self.version.strip():
            raise ValueError("Facts.version is required: it changes whenever the facts do")
        if len(self.version) > MAX_FACT_VERSION_CHARS:
            raise ValueError(f"Facts.version must be at most {MAX_FACT_VERSION_CHARS} characters")
        if self.sensitivity not in _SENSITIVITY_VALUE:
            raise ValueError(f"Facts.sensitivity must be one of {sorted(_SENSITIVITY_VALUE)}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.attributes.items()):
            raise ValueError("Facts.attributes must map strings to strings")
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    def to_proto(self, tenant: str, record_type: str, record_id: str) -> common_pb2.RecordContext:
        return common_pb2.RecordContext(
            tenant=tenant,
            type=record_type,
            id=record_id,
            status=self.status,
            sensitivity=_SENSITIVITY_VALUE[self.sensitivity],
            attributes=dict(self.attributes),
            version=self.version,
        )


@dataclass(frozen=True)
class OperatorView:
    """The verified operator (from the caller's token, never from a request body)."""

    subject: str
    tenant: str
    roles: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, operator: common_pb2.Operator) -> OperatorView:
        return cls(subject=operator.subject, tenant=operator.tenant, roles=tuple(operator.roles))


Display = str | int | float | bool | None


def _display(value: Display) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text if len(text) <= MAX_DISPLAY_CHARS else text[: MAX_DISPLAY_CHARS - 3] + "..."


@dataclass(frozen=True)
class Change:
    """One field the action changed, before and after (shown as strings)."""

    field: str
    before: Display
    after: Display

    def to_proto(self) -> common_pb2.FieldChange:
        return common_pb2.FieldChange(
            field=self.field, before=_display(self.before), after=_display(self.after)
        )


@dataclass(frozen=True)
class Result:
    """What an action handler returns. Build it with the class methods.

    ``Result.succeeded`` (the work is done), ``Result.rejected`` (a business
    rule refused it; nothing changed) or ``Result.partial`` (the external work
    happened but a later step failed; needs human follow-up).
    """

    outcome: common_pb2.Outcome.ValueType
    reason: str = ""
    message: str = ""
    external_ref: str = ""
    changes: tuple[Change, ...] = ()
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.outcome not in (
            common_pb2.OUTCOME_SUCCEEDED,
            common_pb2.OUTCOME_REJECTED,
            common_pb2.OUTCOME_PARTIAL,
        ):
            raise ValueError("a provider result is SUCCEEDED, REJECTED or PARTIAL")
        if self.outcome != common_pb2.OUTCOME_SUCCEEDED or self.reason:
            _check_reason(self.reason)
        if len(self.message) > MAX_MESSAGE_CHARS:
            raise ValueError(f"message must be at most {MAX_MESSAGE_CHARS} characters")
        if len(self.external_ref) > MAX_REF_CHARS:
            raise ValueError(f"external_ref must be at most {MAX_REF_CHARS} characters")
        if len(self.changes) > MAX_CHANGES:
            raise ValueError(f"at most {MAX_CHANGES} changes")
        if len(self.warnings) > MAX_WARNINGS:
            raise ValueError(f"at most {MAX_WARNINGS} warnings")
        if any(len(w) > MAX_MESSAGE_CHARS for w in self.warnings):
            raise ValueError(f"each warning must be at most {MAX_MESSAGE_CHARS} characters")

    @classmethod
    def succeeded(
        cls,
        *,
        external_ref: str = "",
        changes: Sequence[Change] = (),
        warnings: Sequence[str] = (),
        message: str = "",
    ) -> Result:
        return cls(
            outcome=common_pb2.OUTCOME_SUCCEEDED,
            message=message,
            external_ref=external_ref,
            changes=tuple(changes),
            warnings=tuple(warnings),
        )

    @classmethod
    def rejected(cls, reason: str, message: str = "", *, warnings: Sequence[str] = ()) -> Result:
        return cls(
            outcome=common_pb2.OUTCOME_REJECTED,
            reason=reason,
            message=message,
            warnings=tuple(warnings),
        )

    @classmethod
    def partial(
        cls,
        *,
        reason: str,
        message: str = "",
        external_ref: str = "",
        changes: Sequence[Change] = (),
        warnings: Sequence[str] = (),
    ) -> Result:
        return cls(
            outcome=common_pb2.OUTCOME_PARTIAL,
            reason=reason,
            message=message,
            external_ref=external_ref,
            changes=tuple(changes),
            warnings=tuple(warnings),
        )

    def to_proto(self) -> provider_pb2.ExecuteResponse:
        return provider_pb2.ExecuteResponse(
            outcome=self.outcome,
            reason=self.reason,
            message=self.message,
            external_ref=self.external_ref,
            changes=[c.to_proto() for c in self.changes],
            warnings=list(self.warnings),
        )


@dataclass(frozen=True)
class ActionContext:
    """Everything a handler knows about the execution besides its inputs.

    ``deadline`` is an absolute ``time.monotonic()`` value: when the caller
    stops waiting (the gRPC deadline), or None when the call has none. Use
    :meth:`time_remaining` to bound downstream calls. A handler is *not*
    cancelled when the caller gives up: it runs to completion so that, with
    dedupe on, a retry with the same idempotency key gets its stored result.
    """

    action_id: str
    operator: OperatorView
    tenant: str
    record: RecordView
    idempotency_key: str
    request_id: str
    deadline: float | None
    logger: logging.LoggerAdapter[logging.Logger]
    span: Span
    # Hex trace id of the current trace; "" when tracing is not configured.
    trace_id: str

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline (may be negative), or None."""
        return None if self.deadline is None else self.deadline - time.monotonic()
