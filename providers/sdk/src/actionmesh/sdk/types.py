"""The values a provider author handles: records, operators, availability, results,
execution status."""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

from opentelemetry.trace import Span

from actionmesh.rpc.convert import to_timestamp
from actionmesh.rpc.identifiers import REASON
from actionmesh.rpc.records import record_violations
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


def _check_report(changes: Sequence[Change], warnings: Sequence[str]) -> None:
    """The limits of what a result or a preview reports: changes and warnings."""
    if len(changes) > MAX_CHANGES:
        raise ValueError(f"at most {MAX_CHANGES} changes")
    if len(warnings) > MAX_WARNINGS:
        raise ValueError(f"at most {MAX_WARNINGS} warnings")
    if any(len(w) > MAX_MESSAGE_CHARS for w in warnings):
        raise ValueError(f"each warning must be at most {MAX_MESSAGE_CHARS} characters")


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
        # The record limits the gateway holds a source's answer to, refused here already.
        problems = [
            f"{p.field.removeprefix('record.')} {p.description}"
            for p in record_violations(self.to_proto("tenant", "type", "id"), True)
        ]
        if problems:
            raise ValueError(f"Facts break the record limits: {'; '.join(problems)}")

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
    happened but a later step failed; needs human follow-up). A long-running action
    asked to stop (``ctx.stop_request`` is set) may also return ``Result.cancelled``
    (it stopped; ``changes`` says what it had changed by then).
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
            common_pb2.OUTCOME_CANCELLED,
        ):
            raise ValueError("a provider result is SUCCEEDED, REJECTED, PARTIAL or CANCELLED")
        if self.outcome != common_pb2.OUTCOME_SUCCEEDED or self.reason:
            _check_reason(self.reason)
        if len(self.message) > MAX_MESSAGE_CHARS:
            raise ValueError(f"message must be at most {MAX_MESSAGE_CHARS} characters")
        if len(self.external_ref) > MAX_REF_CHARS:
            raise ValueError(f"external_ref must be at most {MAX_REF_CHARS} characters")
        _check_report(self.changes, self.warnings)

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

    @classmethod
    def cancelled(
        cls,
        *,
        reason: str = "CANCELLED",
        message: str = "",
        external_ref: str = "",
        changes: Sequence[Change] = (),
        warnings: Sequence[str] = (),
    ) -> Result:
        """A long-running execution stopped at a caller's request (``ctx.stop_request``)
        before it finished; ``changes`` holds what it had changed by then. Only valid
        after a stop was asked for: the SDK turns it into PARTIAL ``HANDLER_FAILED``
        otherwise."""
        return cls(
            outcome=common_pb2.OUTCOME_CANCELLED,
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

    @classmethod
    def from_proto(cls, response: provider_pb2.ExecuteResponse) -> Result:
        """The result an ExecuteResponse carries (changes as their display strings);
        ``to_proto`` gives the same message back. ValueError for a response no handler
        could have returned."""
        return cls(
            outcome=response.outcome,
            reason=response.reason,
            message=response.message,
            external_ref=response.external_ref,
            changes=tuple(Change(c.field, c.before, c.after) for c in response.changes),
            warnings=tuple(response.warnings),
        )


MAX_DIGEST_CHARS = 128


@dataclass(frozen=True)
class Preview:
    """What a ``@provider.preview`` function returns: what an Execute of the same request
    would change, computed without side effects. Build it with the class methods.

    ``Preview.of(digest=..., changes=..., effect=..., warnings=...)``: the field changes
    (before: as it is now), the external effect in words ("opens an escalation in queue
    billing"), and ``digest``, an opaque string naming the state the preview was
    computed against (a record version, an etag, a hash of what was read): it must
    change whenever anything the preview depends on does. An Execute approved on this
    preview is refused REJECTED ``STATE_CHANGED_SINCE_PREVIEW`` when the digest no
    longer matches.

    ``Preview.rejected(reason, message)``: Execute would refuse (e.g. ``NO_CHANGE``); the
    caller gets FAILED_PRECONDITION with the reason.
    """

    digest: str = ""
    changes: tuple[Change, ...] = ()
    effect: str = ""
    warnings: tuple[str, ...] = ()
    # Set when Execute would refuse: the REJECTED reason and message it would give.
    reason: str = ""
    message: str = ""

    def __post_init__(self) -> None:
        if self.reason:
            _check_reason(self.reason)
        elif not isinstance(self.digest, str) or not self.digest.strip():
            raise ValueError("Preview.digest is required: it names the state previewed")
        if len(self.digest) > MAX_DIGEST_CHARS:
            raise ValueError(f"Preview.digest must be at most {MAX_DIGEST_CHARS} characters")
        if len(self.effect) > MAX_MESSAGE_CHARS or len(self.message) > MAX_MESSAGE_CHARS:
            raise ValueError(f"effect and message must be at most {MAX_MESSAGE_CHARS} characters")
        _check_report(self.changes, self.warnings)

    @classmethod
    def of(
        cls,
        *,
        digest: str,
        changes: Sequence[Change] = (),
        effect: str = "",
        warnings: Sequence[str] = (),
    ) -> Preview:
        return cls(digest=digest, changes=tuple(changes), effect=effect, warnings=tuple(warnings))

    @classmethod
    def rejected(cls, reason: str, message: str = "") -> Preview:
        return cls(reason=reason, message=message)

    @property
    def refused(self) -> bool:
        return bool(self.reason)

    def to_proto(self) -> provider_pb2.PreviewResponse:
        return provider_pb2.PreviewResponse(
            changes=[c.to_proto() for c in self.changes],
            effect=self.effect,
            warnings=list(self.warnings),
            state_digest=self.digest,
        )


@dataclass(frozen=True)
class PreviewContext:
    """What a ``@provider.preview`` function knows besides the inputs: read, never write."""

    action_id: str
    operator: OperatorView
    tenant: str
    record: RecordView
    logger: logging.LoggerAdapter[logging.Logger]


MAX_LONG_RUNNING_S = 7 * 24 * 3600.0
"""The longest ``LongRunning.max_duration_s`` a provider may declare (a week)."""


@dataclass(frozen=True)
class LongRunning:
    """Declares an action long-running: ``@provider.action(..., long_running=LongRunning(...))``.

    Execute then answers ACCEPTED at once and the handler runs on in the background
    (owned by the SDK, tracked by its idempotency key); the gateway follows it with
    GetExecutionStatus until it is FINISHED. Checked when the decorator is applied.
    """

    max_duration_s: float
    """The longest the action may run, from dispatch: > 0 and at most a week. Past it
    the gateway asks the provider to stop and ends the execution TIMED_OUT; the SDK
    itself cancels a handler still running a minute after it (PARTIAL
    ``MAX_DURATION_EXCEEDED``)."""

    poll_interval_s: float = 5.0
    """How often the gateway asks how the execution is going (> 0, at most
    ``max_duration_s``). Shorter moves faster on a timeline; longer costs less."""

    cancellable: bool = False
    """Whether a caller may cancel a running execution (gateway CancelExecution). The
    SDK then answers StopExecution by cancelling the handler's task: the handler sees
    ``asyncio.CancelledError`` at its next ``await`` and may clean up and return
    ``Result.cancelled(...)``; if it lets the error propagate, the SDK stores CANCELLED."""

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty: nothing)."""
        found = []
        for name in ("max_duration_s", "poll_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                found.append(f"{name} must be a positive number")
        if not found:
            if self.max_duration_s > MAX_LONG_RUNNING_S:
                found.append(f"max_duration_s must be at most {MAX_LONG_RUNNING_S:g}")
            elif self.poll_interval_s > self.max_duration_s:
                found.append("poll_interval_s must not exceed max_duration_s")
        if not isinstance(self.cancellable, bool):
            found.append("cancellable must be True or False")
        return found

    def to_proto(self) -> common_pb2.LongRunning:
        return common_pb2.LongRunning(
            max_duration_s=math.ceil(self.max_duration_s),
            poll_interval_ms=max(1, math.ceil(self.poll_interval_s * 1000)),
            cancellable=self.cancellable,
        )


@dataclass(frozen=True)
class StopRequest:
    """Why a long-running execution is being stopped (``ActionContext.stop_request``)."""

    requested_by: str
    """Who asked: the canceller's subject, or "actionmesh" past the maximum duration."""

    reason: str
    """Their comment, as the gateway passed it on."""


class ExecutionState(enum.Enum):
    """Where one execution stands (GetExecutionStatus); see :class:`ExecutionStatus`."""

    NEVER_RECEIVED = provider_pb2.EXECUTION_STATE_NEVER_RECEIVED
    RUNNING = provider_pb2.EXECUTION_STATE_RUNNING
    FINISHED = provider_pb2.EXECUTION_STATE_FINISHED


def _aware(moment: datetime | None, name: str) -> None:
    if moment is not None and (not isinstance(moment, datetime) or moment.tzinfo is None):
        raise ValueError(f"{name} must be a timezone-aware datetime (e.g. datetime.now(UTC))")


@dataclass(frozen=True)
class Progress:
    """How far a running execution got: a percentage when known, a message, and when
    the provider last learned something about it."""

    percent: int | None = None
    message: str = ""
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.percent is not None and (
            isinstance(self.percent, bool)
            or not isinstance(self.percent, int)
            or not 0 <= self.percent <= 100
        ):
            raise ValueError("Progress.percent must be an integer in 0..100, or None")
        if len(self.message) > MAX_MESSAGE_CHARS:
            raise ValueError(f"Progress.message must be at most {MAX_MESSAGE_CHARS} characters")
        _aware(self.updated_at, "Progress.updated_at")

    def to_proto(self) -> common_pb2.ExecutionProgress:
        progress = common_pb2.ExecutionProgress(message=self.message)
        if self.percent is not None:
            progress.percent = self.percent
        if self.updated_at is not None:
            progress.updated_at.CopyFrom(to_timestamp(self.updated_at))
        return progress


@dataclass(frozen=True)
class ExecutionStatus:
    """What became of one execution, by its idempotency key: the answer to
    GetExecutionStatus. Build it with the class methods.

    ``ExecutionStatus.never_received()``: nothing is held or running under the key (an
    Execute with it would run now). ``ExecutionStatus.running(...)``: started, final
    answer not known yet, with optional progress. ``ExecutionStatus.finished(result)``:
    the final answer; once a key is finished, every later answer must be the same.
    """

    state: ExecutionState
    result: Result | None = None
    progress: Progress | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, ExecutionState):
            raise ValueError(f"state must be an ExecutionState, got {self.state!r}")
        finished = self.state is ExecutionState.FINISHED
        if finished != isinstance(self.result, Result):
            raise ValueError("a FINISHED status carries its Result, and only a FINISHED one")
        if self.progress is not None and (
            self.state is not ExecutionState.RUNNING or not isinstance(self.progress, Progress)
        ):
            raise ValueError("only a RUNNING status carries Progress")
        if self.finished_at is not None and not finished:
            raise ValueError("only a FINISHED status has finished_at")
        _aware(self.finished_at, "finished_at")

    @classmethod
    def never_received(cls) -> ExecutionStatus:
        return cls(ExecutionState.NEVER_RECEIVED)

    @classmethod
    def running(
        cls,
        *,
        percent: int | None = None,
        message: str = "",
        updated_at: datetime | None = None,
    ) -> ExecutionStatus:
        return cls(
            ExecutionState.RUNNING,
            progress=Progress(percent=percent, message=message, updated_at=updated_at),
        )

    @classmethod
    def finished(cls, result: Result, *, finished_at: datetime | None = None) -> ExecutionStatus:
        return cls(ExecutionState.FINISHED, result=result, finished_at=finished_at)

    def to_proto(self) -> provider_pb2.GetExecutionStatusResponse:
        reply = provider_pb2.GetExecutionStatusResponse(state=self.state.value)
        if self.result is not None:
            reply.result.CopyFrom(self.result.to_proto())
        if self.progress is not None:
            reply.progress.CopyFrom(self.progress.to_proto())
        if self.finished_at is not None:
            reply.finished_at.CopyFrom(to_timestamp(self.finished_at))
        return reply


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
    # Where report_progress goes (the SDK's servicer); None: nowhere.
    on_progress: Callable[[Progress], None] | None = field(default=None, repr=False, compare=False)
    # Where set_external_ref goes (the SDK's servicer, long-running actions); None: nowhere.
    on_external_ref: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    # Long-running actions: who asked to stop this execution and why (None: nobody).
    stop_requested: Callable[[], StopRequest | None] | None = field(
        default=None, repr=False, compare=False
    )
    # The digest of the preview this execution was approved on ("" when none): the SDK
    # checked it against a fresh preview before calling the handler; a handler whose
    # store can compare-and-set on it (a record version) should, to close the race.
    preview_digest: str = ""

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline (may be negative), or None."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def report_progress(self, percent: int | None = None, message: str = "") -> None:
        """Say how far this execution got. GetExecutionStatus answers it (RUNNING) while
        the handler runs, when asked in this process; cheap, call it as often as useful."""
        progress = Progress(percent=percent, message=message, updated_at=datetime.now(UTC))
        if self.on_progress is not None:
            self.on_progress(progress)

    def set_external_ref(self, external_ref: str) -> None:
        """Long-running actions: name the external work as soon as it exists (e.g. the
        ticket id). A same-key Execute answers ACCEPTED with it while the handler runs;
        the final Result still carries its own ``external_ref``."""
        if len(external_ref) > MAX_REF_CHARS:
            raise ValueError(f"external_ref must be at most {MAX_REF_CHARS} characters")
        if self.on_external_ref is not None:
            self.on_external_ref(external_ref)

    @property
    def stop_request(self) -> StopRequest | None:
        """Long-running, cancellable actions: set once StopExecution asked this execution
        to stop (the handler then sees ``asyncio.CancelledError``). None otherwise, also
        when the task is cancelled because the provider is shutting down: then do not
        undo the work, let the error propagate."""
        return None if self.stop_requested is None else self.stop_requested()
