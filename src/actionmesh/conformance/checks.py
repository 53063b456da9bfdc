"""The contract checks, run over gRPC against any provider (SDK-built or not).

Most checks are safe on a live provider: Describe and Discover are read-only
by contract, and every deliberately wrong Execute (unknown action, missing
idempotency key, invalid inputs, wrong tenant) is aimed at a *probe record*
that does not exist (``conformance-probe-<random>``), so even a provider that
fails to refuse it finds nothing to act on.

The ``source.*`` checks judge a provider's record sources (the record types it
declares in ``Describe.record_sources`` and answers ResolveRecord for), read-only
by contract as well: an unknown record is a probe id, and the rest read the sample
records of a sourced type you pass in. They judge an answer by the rule the gateway
applies (:func:`actionmesh.rpc.records.resolved_record_violations`). Without a
sample record of a sourced type, the checks that read one are skipped.

One check has a real side effect: ``execute.idempotent`` executes one action
**once** on a sample record you pass in (the first sample record for which
Discover reports an available action), then repeats the request with the same
idempotency key and expects the stored answer. Without an eligible sample
record it is skipped.

The ``long_running.*`` checks judge long-running actions (``ActionDescriptor.long_running``):
Execute may answer ACCEPTED, GetExecutionStatus follows the execution to a final outcome,
and StopExecution stops a cancellable one (the executed key is stopped: that ends the
real execution ``execute.idempotent`` started, e.g. withdraws the escalation). A provider
without long-running actions skips them as *not applicable*.

The ``status.*`` checks ask GetExecutionStatus (read-only by contract) about a key
never sent and about the key ``execute.idempotent`` executed: never received, then
finished with the answer Execute gave, the same twice, and never received for
another tenant. A provider answering UNIMPLEMENTED keeps no record of its
executions, which the contract allows: the ``status.*`` checks are then skipped as
*not supported* (the gateway cannot settle that provider's unknown outcomes).

The ``preview.*`` checks judge previews (dry runs, ``ActionDescriptor.previewable``),
read-only by contract: an action that does not declare one answers UNIMPLEMENTED;
the same Preview (each previewable action on each sample record of its types, else on
a probe record) twice gets the same answer; repeated Previews change nothing
(Describe, Discover, ResolveRecord of the sample records of sourced types, the
digest). Where ``execute.idempotent`` executes a previewable action, it asks the
Preview of the same request first, and ``preview.matches_execute`` compares: the
changes Execute answered are the changes the preview showed (a refusing preview, a
REJECTED Execute). A provider without previewable actions skips those checks as *not
applicable*.

``require_all=True`` turns every skip into a failure, except the skip of a check
that does not apply: a provider that declares no record sources skips the
``source.*`` checks as *not applicable*, and one that does not support
GetExecutionStatus the ``status.*`` checks as *not supported*; either passes
``require_all`` without them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actionmesh.conformance.samples import (
    SampleRecord,
    invalid_cases,
    parse_input,
    valid_inputs,
)
from actionmesh.rpc.errors import ActionMeshError, ErrorDetails, error_details
from actionmesh.rpc.identifiers import ACTION_ID, PROVIDER_ID, REASON, RECORD_TYPE
from actionmesh.rpc.records import resolved_record_violations
from actionmesh.rpc.schema import schema_problems, validate_inputs
from actionmesh.rpc.tls import TlsConfig
from actionmesh.v1 import common_pb2, provider_pb2, provider_pb2_grpc

Status = Literal["pass", "fail", "skip"]
PASS: Status = "pass"
FAIL: Status = "fail"
SKIP: Status = "skip"

PROBE_TENANT = "conformance"
OPERATOR_SUBJECT = "actionmesh-conformance"
# How many extra Discover rounds the side-effect check makes before comparing.
DISCOVER_ROUNDS = 3
# How many extra ResolveRecord rounds source.side_effect_free makes before comparing.
RESOLVE_ROUNDS = 3
PROBE_PREFIX = "conformance-probe-"
# Problems listed in one detail before the rest are counted instead.
MAX_LISTED = 4
PROVIDER_OUTCOMES = (
    common_pb2.OUTCOME_SUCCEEDED,
    common_pb2.OUTCOME_REJECTED,
    common_pb2.OUTCOME_PARTIAL,
)
# What a long-running execution may finish with (GetExecutionStatus FINISHED).
FINAL_OUTCOMES = (*PROVIDER_OUTCOMES, common_pb2.OUTCOME_CANCELLED)

# The checks in the order they run, with what each one proves.
CHECKS: dict[str, str] = {
    "health": "grpc.health.v1 answers SERVING for the default service",
    "describe": "provider id and version set; action ids unique and well-formed; "
    "record types set; input schemas well-formed",
    "discover.declared_only": "Discover answers only declared actions for the record's type, "
    "with an UPPER_SNAKE reason when unavailable",
    "discover.stable": "the same Discover twice gives the same answer",
    "discover.side_effect_free": "Describe and Discover are unchanged after repeated Discovers",
    "source.declared": "the record types in Describe.record_sources are well-formed and declared "
    "once (a sourced type no action acts on is noted, not refused); a provider that sources no "
    "record type skips every source.* check as not applicable, which require_all accepts",
    "source.unknown_record": "ResolveRecord of a probe id of each sourced type is NOT_FOUND "
    "with an ErrorInfo reason",
    "source.tenant_isolation": "a sample record of a sourced type asked for under another "
    "tenant is NOT_FOUND like an unknown id, never the record (needs a sample record)",
    "source.answer": "ResolveRecord of each sample record of a sourced type answers it: tenant, "
    "type and id echoed, a version, status, sensitivity and attributes the gateway accepts "
    "(needs a sample record)",
    "source.stable": "the same ResolveRecord twice gives the same answer (needs a sample record)",
    "source.side_effect_free": "Describe, Discover and ResolveRecord (samples and probes) are "
    "unchanged after repeated ResolveRecords",
    "source.unsourced_type": "ResolveRecord of a type it does not source is NOT_FOUND or "
    "INVALID_ARGUMENT with an ErrorInfo reason, never a record",
    "execute.unknown_action": "an unknown action id is refused (NOT_FOUND or INVALID_ARGUMENT) "
    "with an ErrorInfo reason",
    "execute.idempotency_key_required": "an Execute without idempotency key is INVALID_ARGUMENT",
    "execute.invalid_inputs": "inputs breaking the schema (missing, wrong type, out of bounds, "
    "undeclared) are INVALID_ARGUMENT with a BadRequest violation naming the input",
    "execute.tenant_mismatch": "a record of another tenant than the operator's is "
    "PERMISSION_DENIED with an ErrorInfo reason",
    "preview.unsupported": "Preview of an action that is not previewable "
    "(ActionDescriptor.previewable unset) is UNIMPLEMENTED; a provider whose actions are all "
    "previewable skips it as not applicable, which require_all accepts",
    "preview.stable": "the same Preview twice (each previewable action on each sample record "
    "of its types, else on a probe record) gives the same answer: state_digest (required), "
    "changes, effect and warnings, or the same refusal with an ErrorInfo reason; a provider "
    "without previewable actions skips every preview.* check but preview.unsupported as not "
    "applicable, which require_all accepts",
    "preview.read_only": "Describe, Discover, ResolveRecord of the sample records of sourced "
    "types and the Previews themselves (digest included) are unchanged after repeated Previews",
    "execute.idempotent": "the same idempotency key twice acts once: identical outcome, "
    "reason, external ref and changes (executes the action once on a sample record)",
    "preview.matches_execute": "where execute.idempotent executed a previewable action (after "
    "a Preview of the same request), the changes Execute answered are the ones the preview "
    "showed, and a preview that refused means Execute is REJECTED (an ACCEPTED long-running "
    "execution is not applicable)",
    "status.unknown_key": "GetExecutionStatus of a key never sent is NEVER_RECEIVED, without "
    "result or progress; a provider answering UNIMPLEMENTED (it keeps no record of its "
    "executions) skips every status.* check as not supported, which require_all accepts",
    "status.finished": "the key execute.idempotent executed is FINISHED with the outcome, "
    "reason, external ref and changes Execute answered, or, where Execute answered PARTIAL, "
    "RUNNING or a settled answer (needs execute.idempotent to have executed)",
    "status.stable": "the same GetExecutionStatus twice gives the same answer, for the executed "
    "key and a key never sent",
    "status.tenant_isolation": "the executed key asked for by another tenant is NEVER_RECEIVED, "
    "like a key never sent (needs execute.idempotent to have executed)",
    "long_running.accepted": "long-running actions declare max_duration_s > 0 and a poll "
    "interval; the one execute.idempotent executed answered ACCEPTED (or a final outcome) both "
    "times; a provider that declares no long-running action skips every long_running.* check "
    "as not applicable, which require_all accepts",
    "long_running.progress": "GetExecutionStatus of the accepted key is RUNNING or FINISHED with "
    "a final outcome (never ACCEPTED), and once FINISHED it stays so with the same answer",
    "long_running.stop": "StopExecution of a key never sent is NEVER_RECEIVED; of the accepted "
    "key (cancellable actions) RUNNING or FINISHED, the same when asked again, and the execution "
    "then finishes (CANCELLED, or the final outcome it reached); a non-cancellable action's stop "
    "is FAILED_PRECONDITION or UNIMPLEMENTED",
}
# How long long_running.stop waits for a stopped execution to finish.
STOP_SETTLE_S = 15.0
# How many extra Preview rounds preview.read_only makes before comparing.
PREVIEW_ROUNDS = 3
# What a Preview may refuse with besides FAILED_PRECONDITION (Execute would refuse):
# the request's own faults, judged like Execute's.
PREVIEW_REFUSALS = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
)


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check: ``pass``, ``fail`` or ``skip``, and why."""

    name: str
    status: Status
    detail: str


class _Verdict(Exception):
    """Ends a check early with a status other than pass.

    ``required=False`` marks the skip of a check that does not apply to the provider
    (``require_all`` leaves it a skip); every other skip is one ``require_all`` fails.
    """

    def __init__(self, status: Status, detail: str, *, required: bool = True) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.required = required


def _probe_id() -> str:
    """The id of a record that does not exist."""
    return f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"


def _listing(problems: Sequence[str]) -> str:
    shown = list(problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        shown.append(f"and {len(problems) - MAX_LISTED} more")
    return "; ".join(shown)


def _rpc_summary(details: ErrorDetails) -> str:
    reason = f" {details.reason}" if details.reason else ""
    return f"{details.code.name}{reason}"


def _outcome_name(value: int) -> str:
    try:
        return common_pb2.Outcome.Name(value).removeprefix("OUTCOME_")  # type: ignore[arg-type]
    except ValueError:
        return f"outcome {value}"


def _safe_details(error: grpc.RpcError) -> ErrorDetails:
    try:
        return error_details(error)
    except Exception:
        # Malformed grpc-status-details-bin: report the bare status instead.
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        return ErrorDetails(code=code, message="(undecodable status details)")


def _discover_key(reply: provider_pb2.DiscoverResponse) -> list[tuple[str, bool, str]]:
    # Order-insensitive: the contract does not promise an order of actions.
    return sorted((a.action_id, a.available, a.unavailable_reason) for a in reply.actions)


def _discover_text(reply: provider_pb2.DiscoverResponse) -> str:
    shown = [
        f"{action_id} {'yes' if available else f'no ({reason})'}"
        for action_id, available, reason in _discover_key(reply)
    ]
    return "[" + ", ".join(shown) + "]"


def _label(record: common_pb2.RecordContext) -> str:
    """How a Discover target is named in details: probes by type, samples in full."""
    if record.id.startswith(PROBE_PREFIX):
        return f"probe {record.type}"
    return f"{record.tenant}/{record.type}/{record.id}"


@dataclass(frozen=True)
class _Answer:
    """What must not differ between two Executes with the same idempotency key."""

    outcome: str
    reason: str
    external_ref: str
    changes: tuple[tuple[str, str, str], ...]

    @classmethod
    def of(cls, reply: provider_pb2.ExecuteResponse) -> _Answer:
        return cls(
            outcome=_outcome_name(reply.outcome),
            reason=reply.reason,
            external_ref=reply.external_ref,
            changes=tuple((c.field, c.before, c.after) for c in reply.changes),
        )

    def __str__(self) -> str:
        parts = [self.outcome + (f" {self.reason}" if self.reason else "")]
        if self.external_ref:
            parts.append(f"ref {self.external_ref}")
        parts.extend(f"{field} {before}->{after}" for field, before, after in self.changes)
        return ", ".join(parts)


RecordKey = tuple[str, str, str]
"""A ResolveRecord target: (tenant, type, id)."""

StatusKey = tuple[str, str, str]
"""A GetExecutionStatus target: (tenant, action id, idempotency key)."""


def _state_name(value: int) -> str:
    try:
        name = provider_pb2.ExecutionState.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return f"state {value}"
    return name.removeprefix("EXECUTION_STATE_")


@dataclass(frozen=True, eq=False)
class _Status:
    """One GetExecutionStatus answer: the reply, or the refusal's code and reason."""

    reply: provider_pb2.GetExecutionStatusResponse | None
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""

    @property
    def state(self) -> int:
        return provider_pb2.EXECUTION_STATE_UNSPECIFIED if self.reply is None else self.reply.state

    def answer(self) -> _Answer | None:
        if self.reply is None or not self.reply.HasField("result"):
            return None
        return _Answer.of(self.reply.result)

    def key(self) -> tuple[object, ...]:
        """What must not differ between two answers to the same question."""
        if self.reply is None:
            return (self.code, self.reason)
        return (self.reply.state, self.answer())

    def __str__(self) -> str:
        if self.reply is None:
            return self.code.name + (f" {self.reason}" if self.reason else "")
        answer = self.answer()
        return _state_name(self.reply.state) + (f" [{answer}]" if answer else "")


def _key_text(key: RecordKey) -> str:
    tenant, record_type, record_id = key
    if record_id.startswith(PROBE_PREFIX):
        return f"probe {record_type}"
    return f"{tenant}/{record_type}/{record_id}"


def _sensitivity_name(value: int) -> str:
    try:
        name = common_pb2.Sensitivity.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return f"sensitivity {value}"
    return name.removeprefix("SENSITIVITY_")


def _facts_text(record: common_pb2.RecordContext) -> str:
    status = repr(record.status) if record.status else "no status"
    return (
        f"{status}, version {record.version!r}, {_sensitivity_name(record.sensitivity)}, "
        f"{len(record.attributes)} attribute(s)"
    )


@dataclass(frozen=True, eq=False)
class _Resolved:
    """One ResolveRecord answer: the reply, or the refusal's code and reason."""

    reply: provider_pb2.ResolveRecordResponse | None
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""

    def refusal(self) -> str:
        return self.code.name + (f" {self.reason}" if self.reason else "")

    def __str__(self) -> str:
        if self.reply is None:
            return self.refusal()
        record = self.reply.record
        return f"{record.tenant}/{record.type}/{record.id} {_facts_text(record)}"

    def changes(self, later: _Resolved) -> list[str]:
        """How ``later`` differs from this answer (empty when it is the same answer)."""
        if self.reply is None or later.reply is None:
            same = (self.code, self.reason, self.reply) == (later.code, later.reason, later.reply)
            return [] if same else [f"{self} then {later}"]
        first, then = self.reply.record, later.reply.record
        found = [
            f"{name} {getattr(first, name)!r} then {getattr(then, name)!r}"
            for name in ("tenant", "type", "id", "status", "version")
            if getattr(first, name) != getattr(then, name)
        ]
        if first.sensitivity != then.sensitivity:
            found.append(
                f"sensitivity {_sensitivity_name(first.sensitivity)} then "
                f"{_sensitivity_name(then.sensitivity)}"
            )
        for key in sorted(set(first.attributes) | set(then.attributes)):
            before, after = first.attributes.get(key), then.attributes.get(key)
            if before != after:
                found.append(f"attributes[{key}] {before!r} then {after!r}")
        if not found and self.reply != later.reply:
            found.append("the reply changed")
        return found


Change = tuple[str, str, str]


@dataclass(frozen=True, eq=False)
class _Previewed:
    """One Preview answer: the reply, or the refusal's code and reason."""

    reply: provider_pb2.PreviewResponse | None
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""

    @property
    def changes(self) -> tuple[Change, ...]:
        if self.reply is None:
            return ()
        return tuple((c.field, c.before, c.after) for c in self.reply.changes)

    def key(self) -> tuple[object, ...]:
        """What must not differ between two answers to the same Preview."""
        if self.reply is None:
            return (self.code, self.reason)
        return (self.reply.state_digest, self.changes, self.reply.effect, *self.reply.warnings)

    def problem(self) -> str | None:
        """What is wrong with this answer on its own, if anything."""
        if self.reply is None:
            expected = " or ".join(code.name for code in PREVIEW_REFUSALS)
            if self.code not in PREVIEW_REFUSALS:
                return f"answered {self}, expected a preview or {expected}"
            if not self.reason:
                return f"{self.code.name} without google.rpc.Status details (no ErrorInfo reason)"
            return None
        if not self.reply.state_digest.strip():
            return "a preview without state_digest (it is required)"
        return None

    def __str__(self) -> str:
        if self.reply is None:
            return self.code.name + (f" {self.reason}" if self.reason else "")
        shown = [f"digest {self.reply.state_digest!r}"]
        shown.extend(f"{field} {before}->{after}" for field, before, after in self.changes)
        if self.reply.warnings:
            shown.append(f"{len(self.reply.warnings)} warning(s)")
        return ", ".join(shown)


PreviewTarget = tuple[
    common_pb2.RecordContext, common_pb2.ActionDescriptor, dict[str, common_pb2.InputValue]
]
"""A Preview request: (record, action, inputs)."""


def _target_text(target: PreviewTarget) -> str:
    record, action, _ = target
    return f"{action.action_id} on {_label(record)}"


def _refusal_problem(answer: _Resolved, codes: Sequence[grpc.StatusCode]) -> str | None:
    """What is wrong with an answer that must be a refusal with ``codes`` and a reason."""
    expected = " or ".join(code.name for code in codes)
    if answer.reply is not None:
        return f"answered a record ({answer}), expected {expected}"
    if answer.code not in codes:
        return f"answered {answer.refusal()}, expected {expected}"
    if not answer.reason:
        return f"{answer.code.name} without google.rpc.Status details (no ErrorInfo reason)"
    return None


class _Kit:
    """One run of the checks against one provider channel."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        records: Sequence[SampleRecord],
        action: str | None,
        inputs: Mapping[str, str],
        timeout_s: float,
    ) -> None:
        self.stub = provider_pb2_grpc.ActionProviderServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.records = list(records)
        self.action = action
        self.inputs = dict(inputs)
        self.timeout_s = timeout_s
        self.describe: provider_pb2.DescribeResponse | None = None
        self.declared: dict[str, common_pb2.ActionDescriptor] = {}
        # Discover targets: the sample records, plus one probe per declared record type.
        self.targets: list[common_pb2.RecordContext] = []
        self.first_answers: list[provider_pb2.DiscoverResponse] = []
        self.probe_tenant = records[0].tenant if records else PROBE_TENANT
        # The record types of Describe.record_sources (each once, in declared order).
        self.sources: list[str] = []
        # source.answer's answers, which source.stable asks for again.
        self.first_resolved: dict[RecordKey, _Resolved] = {}
        # Sample records source.stable saw change: side effects are not judged on them.
        self.unstable: set[RecordKey] = set()
        # Whether discover.stable saw an answer change (likewise).
        self.discover_unstable = False
        # GetExecutionStatus: None until status.unknown_key asked, then whether it is
        # supported (not UNIMPLEMENTED).
        self.status_supported: bool | None = None
        # The key never sent that status.unknown_key asked about, and its answer.
        self.unknown_status: tuple[StatusKey, _Status] | None = None
        # The key execute.idempotent executed and the answer Execute gave; why not, if not.
        self.executed: tuple[StatusKey, _Answer] | None = None
        self.not_executed = "execute.idempotent did not run"
        # status.finished's answer, which status.stable asks for again.
        self.finished_status: _Status | None = None
        # Whether execute.idempotent's execution is long-running and was ACCEPTED.
        self.executed_accepted = False
        # The Preview execute.idempotent asked before executing a previewable action.
        self.executed_preview: _Previewed | None = None

    # -- helpers --------------------------------------------------------------

    def operator(self, tenant: str) -> common_pb2.Operator:
        return common_pb2.Operator(subject=OPERATOR_SUBJECT, tenant=tenant, roles=["operator"])

    def probe(self, record_type: str) -> common_pb2.RecordContext:
        """A record that does not exist: deliberately wrong Executes find nothing to act on."""
        return common_pb2.RecordContext(
            tenant=self.probe_tenant,
            type=record_type,
            id=_probe_id(),
            status="",
            sensitivity=common_pb2.SENSITIVITY_NORMAL,
        )

    def execute_request(
        self,
        action: common_pb2.ActionDescriptor | str,
        *,
        record: common_pb2.RecordContext | None = None,
        inputs: Mapping[str, common_pb2.InputValue] | None = None,
        operator_tenant: str | None = None,
        key: str | None = None,
    ) -> provider_pb2.ExecuteRequest:
        descriptor = self.declared.get(action) if isinstance(action, str) else action
        action_id = action if isinstance(action, str) else action.action_id
        if record is None:
            record_type = (
                descriptor.record_types[0] if descriptor and descriptor.record_types else ""
            )
            record = self.probe(record_type or "conformance")
        if inputs is None:
            inputs = valid_inputs(descriptor.inputs) if descriptor else {}
        return provider_pb2.ExecuteRequest(
            action_id=action_id,
            record=record,
            operator=self.operator(operator_tenant or record.tenant),
            inputs=dict(inputs),
            idempotency_key=f"conformance-{uuid.uuid4().hex}" if key is None else key,
            request_id=f"conformance-{uuid.uuid4().hex}",
        )

    async def refused(
        self,
        request: provider_pb2.ExecuteRequest,
        codes: Sequence[grpc.StatusCode],
    ) -> tuple[ErrorDetails | None, str | None]:
        """Send a request that must be refused: (details, problem or None)."""
        expected = " or ".join(code.name for code in codes)
        try:
            reply = await self.stub.Execute(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            details = _safe_details(exc)
            if details.code not in codes:
                return details, f"answered {_rpc_summary(details)}, expected {expected}"
            if not details.reason:
                return details, (
                    f"{details.code.name} without google.rpc.Status details (no ErrorInfo reason)"
                )
            return details, None
        outcome = _outcome_name(reply.outcome)
        reason = f" {reply.reason}" if reply.reason else ""
        return None, f"answered OK ({outcome}{reason}), expected {expected}"

    async def discover(self, record: common_pb2.RecordContext) -> provider_pb2.DiscoverResponse:
        return await self.stub.Discover(
            provider_pb2.DiscoverRequest(record=record, operator=self.operator(record.tenant)),
            timeout=self.timeout_s,
        )

    async def discover_all(self) -> list[provider_pb2.DiscoverResponse]:
        return [await self.discover(target) for target in self.targets]

    async def resolve(self, key: RecordKey) -> _Resolved:
        """ResolveRecord of (tenant, type, id): the reply, or the refusal."""
        tenant, record_type, record_id = key
        request = provider_pb2.ResolveRecordRequest(
            tenant=tenant, record=common_pb2.RecordRef(type=record_type, id=record_id)
        )
        try:
            reply = await self.stub.ResolveRecord(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            details = _safe_details(exc)
            return _Resolved(None, details.code, details.reason)
        return _Resolved(reply)

    async def ask_status(self, key: StatusKey) -> _Status:
        """GetExecutionStatus of (tenant, action, idempotency key): the reply, or the refusal."""
        tenant, action_id, idempotency_key = key
        request = provider_pb2.GetExecutionStatusRequest(
            tenant=tenant,
            action_id=action_id,
            idempotency_key=idempotency_key,
            request_id=f"conformance-{uuid.uuid4().hex}",
        )
        try:
            reply = await self.stub.GetExecutionStatus(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            details = _safe_details(exc)
            return _Status(None, details.code, details.reason)
        return _Status(reply)

    async def preview(self, target: PreviewTarget) -> _Previewed:
        """Preview of (record, action, inputs): the reply, or the refusal."""
        record, action, inputs = target
        request = provider_pb2.PreviewRequest(
            action_id=action.action_id,
            record=record,
            operator=self.operator(record.tenant),
            inputs=inputs,
        )
        try:
            reply = await self.stub.Preview(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            details = _safe_details(exc)
            return _Previewed(None, details.code, details.reason)
        return _Previewed(reply)

    def previewable(self) -> list[common_pb2.ActionDescriptor]:
        """The previewable actions; a provider without any skips (not applicable)."""
        self.require_describe()
        found = [a for a in self.declared.values() if a.previewable]
        if not found:
            raise _Verdict(
                SKIP,
                "not applicable: the provider declares no previewable action",
                required=False,
            )
        return found

    def preview_inputs(
        self, action: common_pb2.ActionDescriptor
    ) -> dict[str, common_pb2.InputValue]:
        """The inputs execute.idempotent would send for the action (schema-derived else)."""
        if self.action and action.action_id != self.action:
            return valid_inputs(action.inputs)
        try:
            return self.sample_inputs(action)
        except _Verdict:
            return valid_inputs(action.inputs)

    def preview_targets(self) -> list[PreviewTarget]:
        """Each previewable action on each sample record of its types, else on a probe."""
        targets: list[PreviewTarget] = []
        for action in self.previewable():
            records = [r.to_proto() for r in self.records if r.type in action.record_types]
            if not records and action.record_types:
                records = [self.probe(action.record_types[0])]
            targets.extend((record, action, self.preview_inputs(action)) for record in records)
        return targets

    def require_status(self) -> None:
        """Skips when GetExecutionStatus is not supported (not applicable) or was not asked."""
        if self.status_supported is None:
            raise _Verdict(SKIP, "the first GetExecutionStatus (status.unknown_key) did not run")
        if not self.status_supported:
            raise _Verdict(SKIP, _STATUS_UNSUPPORTED, required=False)

    def require_executed(self) -> tuple[StatusKey, _Answer]:
        self.require_status()
        if self.executed is None:
            raise _Verdict(SKIP, f"no executed key to ask about: {self.not_executed}")
        return self.executed

    def require_sources(self) -> list[str]:
        """The sourced record types; a provider without any skips (not applicable)."""
        if self.describe is None:
            raise _Verdict(SKIP, "Describe failed, so there is nothing to check against")
        if not self.sources:
            raise _Verdict(
                SKIP,
                "not applicable: the provider declares no record_sources (it is the system "
                "of record of no record type)",
                required=False,
            )
        return self.sources

    def source_samples(self, use: str) -> list[SampleRecord]:
        """The sample records of a sourced type; skips without one."""
        sources = self.require_sources()
        samples = [r for r in self.records if r.type in sources]
        if not samples:
            raise _Verdict(
                SKIP,
                f"no sample record of a type it sources ({', '.join(sources)}); pass "
                f"--record TENANT/TYPE/ID of a record it holds ({use})",
            )
        return samples

    def source_tenant(self, record_type: str) -> str:
        """The tenant to ask for probes of a type: a sample's of that type, if any."""
        return next((r.tenant for r in self.records if r.type == record_type), self.probe_tenant)

    def require_describe(self) -> None:
        if self.describe is None:
            raise _Verdict(SKIP, "Describe failed, so there is nothing to check against")
        if not self.declared:
            raise _Verdict(SKIP, "the provider declares no actions")

    # -- checks ---------------------------------------------------------------

    async def check_health(self) -> str:
        try:
            reply = await self.health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            details = _safe_details(exc)
            if details.code == grpc.StatusCode.UNIMPLEMENTED:
                raise _Verdict(
                    FAIL, "no grpc.health.v1 Health service: registries cannot health-check it"
                ) from None
            raise _Verdict(FAIL, f"health check failed: {_rpc_summary(details)}") from None
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise _Verdict(FAIL, f"default service is {status}, expected SERVING")
        return "default service SERVING"

    async def check_describe(self) -> str:
        try:
            reply = await self.stub.Describe(provider_pb2.DescribeRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _Verdict(FAIL, f"Describe failed: {_rpc_summary(_safe_details(exc))}") from None
        self.describe = reply
        self.sources = list(dict.fromkeys(reply.record_sources))
        problems: list[str] = []
        if not PROVIDER_ID.valid(reply.provider_id):
            problems.append(f"provider_id {reply.provider_id!r} must match {PROVIDER_ID.pattern}")
        if not reply.version.strip():
            problems.append("version is empty")
        if not reply.actions:
            problems.append("no actions declared")
        record_types: set[str] = set()
        for action in reply.actions:
            where = f"action {action.action_id!r}"
            if not ACTION_ID.valid(action.action_id):
                problems.append(f"{where}: id must match {ACTION_ID.pattern}")
            if action.action_id in self.declared:
                problems.append(f"{where}: declared more than once")
                continue
            self.declared[action.action_id] = action
            if not action.record_types:
                problems.append(f"{where}: no record types")
            for record_type in action.record_types:
                if not RECORD_TYPE.valid(record_type):
                    problems.append(f"{where}: record type {record_type!r} is malformed")
                record_types.add(record_type)
            problems.extend(f"{where}: {p}" for p in schema_problems(action.inputs))
        self.targets = [r.to_proto() for r in self.records] + [
            self.probe(t) for t in sorted(record_types)
        ]
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        return (
            f"{reply.provider_id} {reply.version}: {len(reply.actions)} action(s) "
            f"({', '.join(self.declared)}) on {', '.join(sorted(record_types))}"
        )

    async def check_declared_only(self) -> str:
        self.require_describe()
        problems: list[str] = []
        for target in self.targets:
            where = _label(target)
            try:
                reply = await self.discover(target)
            except grpc.RpcError as exc:
                raise _Verdict(
                    FAIL, f"Discover for {where} failed: {_rpc_summary(_safe_details(exc))}"
                ) from None
            self.first_answers.append(reply)
            seen: set[str] = set()
            for found in reply.actions:
                descriptor = self.declared.get(found.action_id)
                if descriptor is None:
                    problems.append(f"{where}: undeclared action {found.action_id!r}")
                elif target.type not in descriptor.record_types:
                    problems.append(
                        f"{where}: {found.action_id} does not apply to type {target.type!r}"
                    )
                if found.action_id in seen:
                    problems.append(f"{where}: {found.action_id} answered twice")
                seen.add(found.action_id)
                if not found.available and not REASON.valid(found.unavailable_reason):
                    problems.append(
                        f"{where}: {found.action_id} unavailable without an UPPER_SNAKE reason"
                    )
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        return f"{len(self.targets)} record(s) discovered; only declared actions answered"

    async def check_stable(self) -> str:
        self.require_describe()
        if len(self.first_answers) != len(self.targets):
            raise _Verdict(SKIP, "the first Discover failed")
        try:
            again = await self.discover_all()
        except grpc.RpcError as exc:
            raise _Verdict(
                FAIL, f"a repeated Discover failed: {_rpc_summary(_safe_details(exc))}"
            ) from None
        changed = [
            f"{_label(t)}: {_discover_text(a)} then {_discover_text(b)}"
            for t, a, b in zip(self.targets, self.first_answers, again, strict=True)
            if _discover_key(a) != _discover_key(b)
        ]
        if changed:
            self.discover_unstable = True
            raise _Verdict(FAIL, "the same request got another answer: " + _listing(changed))
        return f"{len(self.targets)} record(s) answered identically twice"

    async def check_side_effect_free(self) -> str:
        self.require_describe()
        if len(self.first_answers) != len(self.targets):
            raise _Verdict(SKIP, "the first Discover failed")
        try:
            for _ in range(DISCOVER_ROUNDS):
                await self.discover_all()
            described = await self.stub.Describe(
                provider_pb2.DescribeRequest(), timeout=self.timeout_s
            )
            after = await self.discover_all()
        except grpc.RpcError as exc:
            raise _Verdict(
                FAIL, f"a repeated call failed: {_rpc_summary(_safe_details(exc))}"
            ) from None
        problems = []
        if described != self.describe:
            problems.append("Describe changed")
        problems.extend(
            f"Discover of {_label(t)} changed"
            for t, a, b in zip(self.targets, self.first_answers, after, strict=True)
            if _discover_key(a) != _discover_key(b)
        )
        if problems:
            raise _Verdict(
                FAIL, f"after {DISCOVER_ROUNDS + 2} Discover rounds: " + _listing(problems)
            )
        return f"Describe and Discover unchanged after {DISCOVER_ROUNDS + 2} Discover rounds"

    async def check_source_declared(self) -> str:
        sources = self.require_sources()
        assert self.describe is not None
        problems = [
            f"record type {t!r} must match {RECORD_TYPE.pattern}"
            for t in sources
            if not RECORD_TYPE.valid(t)
        ]
        problems.extend(
            f"record type {t!r} declared more than once"
            for t in sources
            if list(self.describe.record_sources).count(t) > 1
        )
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        acted_on = {t for action in self.declared.values() for t in action.record_types}
        alone = [t for t in sources if t not in acted_on]
        note = (
            f"; no declared action acts on {', '.join(alone)} (only its system of record)"
            if alone
            else ""
        )
        return f"the system of record of {', '.join(sources)}{note}"

    async def check_source_unknown_record(self) -> str:
        problems: list[str] = []
        answers: list[str] = []
        for record_type in self.require_sources():
            key = (self.source_tenant(record_type), record_type, _probe_id())
            answer = await self.resolve(key)
            problem = _refusal_problem(answer, (grpc.StatusCode.NOT_FOUND,))
            if problem:
                problems.append(f"{_key_text(key)}: {problem}")
            answers.append(f"{_key_text(key)} {answer.refusal()}")
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        return "unknown ids refused: " + _listing(answers)

    async def check_source_tenant_isolation(self) -> str:
        samples = self.source_samples("this check asks for it under another tenant")
        other = f"{PROBE_TENANT}-other-{uuid.uuid4().hex[:8]}"
        problems: list[str] = []
        answers: set[str] = set()
        for sample in samples:
            where = f"{sample.tenant}/{sample.type}/{sample.id} asked for by tenant {other}"
            answer = await self.resolve((other, sample.type, sample.id))
            if answer.reply is not None:
                problems.append(
                    f"{where}: answered the record ({answer}); another tenant's record must "
                    "be NOT_FOUND"
                )
                continue
            if answer.code != grpc.StatusCode.NOT_FOUND:
                problems.append(f"{where}: answered {answer.refusal()}, expected NOT_FOUND")
                continue
            unknown = await self.resolve((other, sample.type, _probe_id()))
            if unknown.reply is None and unknown.refusal() != answer.refusal():
                problems.append(
                    f"{where}: answered {answer.refusal()}, but an unknown id "
                    f"{unknown.refusal()}: the answer tells another tenant the record exists"
                )
                continue
            answers.add(answer.refusal())
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        return (
            f"{len(samples)} sample record(s) {' / '.join(sorted(answers))} for another tenant, "
            "like an unknown id"
        )

    async def check_source_answer(self) -> str:
        samples = self.source_samples("this check reads it")
        problems: list[str] = []
        answers: list[str] = []
        for sample in samples:
            key = (sample.tenant, sample.type, sample.id)
            where = _key_text(key)
            answer = await self.resolve(key)
            self.first_resolved[key] = answer
            if answer.reply is None:
                problems.append(
                    f"{where}: answered {answer.refusal()}; a sample record of a type it "
                    "sources must be found (pass a record it holds)"
                )
                continue
            record = answer.reply.record
            violations = resolved_record_violations(answer.reply, *key)
            if violations:
                echoed = (record.tenant, record.type, record.id)
                other = f" (answered {'/'.join(echoed)})" if echoed != key else ""
                problems.append(
                    f"{where}{other}: "
                    + ", ".join(f"{v.field} {v.description}" for v in violations)
                )
                continue
            answers.append(f"{where}: {_facts_text(record)}")
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        return _listing(answers)

    async def check_source_stable(self) -> str:
        samples = self.source_samples("this check reads it twice")
        keys = [(s.tenant, s.type, s.id) for s in samples]
        if any(key not in self.first_resolved for key in keys):
            raise _Verdict(SKIP, "the first ResolveRecord (source.answer) did not run")
        changed: list[str] = []
        for key in keys:
            changes = self.first_resolved[key].changes(await self.resolve(key))
            if changes:
                self.unstable.add(key)
                changed.append(f"{_key_text(key)}: {', '.join(changes)}")
        if changed:
            raise _Verdict(FAIL, "the same request got another answer: " + _listing(changed))
        return f"{len(keys)} record(s) answered identically twice"

    async def check_source_side_effect_free(self) -> str:
        sources = self.require_sources()
        samples = [(r.tenant, r.type, r.id) for r in self.records if r.type in sources]
        keys = [key for key in dict.fromkeys(samples) if key not in self.unstable]
        keys += [(self.source_tenant(t), t, _probe_id()) for t in sources]
        # Discover is compared when it answered, the same twice, in the discover checks.
        discovers = len(self.first_answers) == len(self.targets) and not self.discover_unstable

        async def resolve_all() -> list[_Resolved]:
            return [await self.resolve(key) for key in keys]

        try:
            described = await self.stub.Describe(
                provider_pb2.DescribeRequest(), timeout=self.timeout_s
            )
            discovered = await self.discover_all() if discovers else []
            before = await resolve_all()
            for _ in range(RESOLVE_ROUNDS):
                await resolve_all()
            described_after = await self.stub.Describe(
                provider_pb2.DescribeRequest(), timeout=self.timeout_s
            )
            discovered_after = await self.discover_all() if discovers else []
            after = await resolve_all()
        except grpc.RpcError as exc:
            raise _Verdict(
                FAIL, f"a repeated call failed: {_rpc_summary(_safe_details(exc))}"
            ) from None
        problems: list[str] = []
        if described != described_after:
            problems.append("Describe changed")
        problems.extend(
            f"Discover of {_label(t)} changed"
            for t, a, b in zip(self.targets, discovered, discovered_after, strict=False)
            if _discover_key(a) != _discover_key(b)
        )
        for key, first, then in zip(keys, before, after, strict=True):
            changes = first.changes(then)
            if changes:
                problems.append(f"ResolveRecord of {_key_text(key)} changed: {', '.join(changes)}")
        rounds = RESOLVE_ROUNDS + 2
        if problems:
            raise _Verdict(FAIL, f"after {rounds} ResolveRecord rounds: " + _listing(problems))
        what = "Describe, Discover" if discovers else "Describe (Discover failed or is unstable)"
        unstable = len(set(samples) & self.unstable)
        left = f"; {unstable} unstable record(s) left to source.stable" if unstable else ""
        probes = len(sources)
        return (
            f"{what} and ResolveRecord of {len(keys) - probes} sample(s) and {probes} probe(s) "
            f"unchanged after {rounds} ResolveRecord rounds{left}"
        )

    async def check_source_unsourced_type(self) -> str:
        sources = self.require_sources()
        # A type it does not source, asked for with the id of a record it does hold (a
        # source that looks records up by id alone answers it), else with a probe id.
        samples = [r for r in self.records if r.type in sources]
        tenant, record_id = (
            (samples[0].tenant, samples[0].id) if samples else (self.probe_tenant, _probe_id())
        )
        acted_on = {t for action in self.declared.values() for t in action.record_types}
        made_up = f"{PROBE_TENANT}-unsourced-{uuid.uuid4().hex[:8]}"
        types = [*sorted(acted_on - set(sources)), made_up]
        problems: list[str] = []
        answers: list[str] = []
        for record_type in types:
            answer = await self.resolve((tenant, record_type, record_id))
            label = "an unknown type" if record_type == made_up else f"type {record_type}"
            problem = _refusal_problem(
                answer, (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
            )
            if problem:
                problems.append(f"{label}: {problem}")
            else:
                answers.append(f"{label} {answer.refusal()}")
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        return "refused: " + _listing(answers)

    async def check_unknown_action(self) -> str:
        self.require_describe()
        some = next(iter(self.declared.values()))
        request = self.execute_request(
            f"conformance.unknown-{uuid.uuid4().hex[:8]}",
            record=self.probe(some.record_types[0] if some.record_types else "conformance"),
            inputs={},
        )
        details, problem = await self.refused(
            request, (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        )
        if problem:
            raise _Verdict(FAIL, problem)
        assert details is not None
        return f"refused: {_rpc_summary(details)}"

    async def check_key_required(self) -> str:
        self.require_describe()
        action = self.chosen_action() or next(iter(self.declared.values()))
        details, problem = await self.refused(
            self.execute_request(action, key=""), (grpc.StatusCode.INVALID_ARGUMENT,)
        )
        if problem:
            raise _Verdict(FAIL, f"{action.action_id}: {problem}")
        assert details is not None
        return f"{action.action_id}: refused: {_rpc_summary(details)}"

    async def check_invalid_inputs(self) -> str:
        self.require_describe()
        problems: list[str] = []
        count = 0
        for action in self.declared.values():
            for case in invalid_cases(action.inputs):
                count += 1
                details, problem = await self.refused(
                    self.execute_request(action, inputs=case.inputs),
                    (grpc.StatusCode.INVALID_ARGUMENT,),
                )
                if problem is None and details is not None:
                    if not details.violations:
                        problem = "INVALID_ARGUMENT without BadRequest field violations"
                    elif not any(case.field in v.field for v in details.violations):
                        fields = ", ".join(v.field for v in details.violations)
                        problem = f"no field violation names {case.field!r} (got {fields})"
                if problem:
                    problems.append(f"{action.action_id} {case.label}: {problem}")
        if problems:
            raise _Verdict(
                FAIL, f"{len(problems)} of {count} invalid requests: " + _listing(problems)
            )
        return (
            f"{count} invalid request(s) on {len(self.declared)} action(s) refused "
            "with field violations"
        )

    async def check_tenant_mismatch(self) -> str:
        self.require_describe()
        action = self.chosen_action() or next(iter(self.declared.values()))
        request = self.execute_request(action, operator_tenant=f"{self.probe_tenant}-other")
        details, problem = await self.refused(request, (grpc.StatusCode.PERMISSION_DENIED,))
        if problem:
            raise _Verdict(FAIL, f"{action.action_id}: {problem}")
        assert details is not None
        return f"{action.action_id}: refused: {_rpc_summary(details)}"

    # -- previews -------------------------------------------------------------------

    async def check_preview_unsupported(self) -> str:
        self.require_describe()
        plain = [a for a in self.declared.values() if not a.previewable]
        if not plain:
            raise _Verdict(SKIP, "not applicable: every action is previewable", required=False)
        problems, answers = [], []
        for action in plain:
            record = self.probe(action.record_types[0] if action.record_types else "conformance")
            answer = await self.preview((record, action, valid_inputs(action.inputs)))
            if answer.code != grpc.StatusCode.UNIMPLEMENTED:
                problems.append(
                    f"{action.action_id} is not previewable, but Preview answered {answer}; "
                    "expected UNIMPLEMENTED"
                )
            else:
                answers.append(f"{action.action_id} {answer}")
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        return "refused: " + _listing(answers)

    async def check_preview_stable(self) -> str:
        targets = self.preview_targets()
        problems: list[str] = []
        shown: list[str] = []
        for target in targets:
            first = await self.preview(target)
            then = await self.preview(target)
            where = _target_text(target)
            problem = first.problem() or then.problem()
            if problem:
                problems.append(f"{where}: {problem}")
            elif first.key() != then.key():
                problems.append(f"{where}: [{first}] then [{then}]")
            else:
                shown.append(f"{where}: {first}")
        if problems:
            raise _Verdict(
                FAIL, "the same Preview got another answer or a bad one: " + _listing(problems)
            )
        return f"{len(targets)} preview(s) answered identically twice: " + _listing(shown)

    async def check_preview_read_only(self) -> str:
        targets = self.preview_targets()
        keys = [
            key
            for key in dict.fromkeys((r.tenant, r.type, r.id) for r in self.records)
            if key[1] in self.sources and key not in self.unstable
        ]
        discovers = len(self.first_answers) == len(self.targets) and not self.discover_unstable

        async def preview_all() -> list[_Previewed]:
            return [await self.preview(target) for target in targets]

        async def resolve_all() -> list[_Resolved]:
            return [await self.resolve(key) for key in keys]

        try:
            described = await self.stub.Describe(
                provider_pb2.DescribeRequest(), timeout=self.timeout_s
            )
            discovered = await self.discover_all() if discovers else []
            resolved = await resolve_all()
            before = await preview_all()
            for _ in range(PREVIEW_ROUNDS):
                await preview_all()
            described_after = await self.stub.Describe(
                provider_pb2.DescribeRequest(), timeout=self.timeout_s
            )
            discovered_after = await self.discover_all() if discovers else []
            resolved_after = await resolve_all()
            after = await preview_all()
        except grpc.RpcError as exc:
            raise _Verdict(
                FAIL, f"a repeated call failed: {_rpc_summary(_safe_details(exc))}"
            ) from None
        problems: list[str] = []
        if described != described_after:
            problems.append("Describe changed")
        problems.extend(
            f"Discover of {_label(t)} changed"
            for t, a, b in zip(self.targets, discovered, discovered_after, strict=False)
            if _discover_key(a) != _discover_key(b)
        )
        for key, first, then in zip(keys, resolved, resolved_after, strict=True):
            changes = first.changes(then)
            if changes:
                problems.append(f"ResolveRecord of {_key_text(key)} changed: {', '.join(changes)}")
        for target, first_preview, then_preview in zip(targets, before, after, strict=True):
            if first_preview.key() != then_preview.key():
                problems.append(
                    f"Preview of {_target_text(target)} changed: [{first_preview}] then "
                    f"[{then_preview}]"
                )
        rounds = PREVIEW_ROUNDS + 2
        if problems:
            raise _Verdict(FAIL, f"after {rounds} Preview rounds: " + _listing(problems))
        what = "Describe, Discover" if discovers else "Describe (Discover failed or is unstable)"
        read = f", ResolveRecord of {len(keys)} sample(s)" if keys else ""
        return f"{what}{read} and {len(targets)} preview(s) unchanged after {rounds} Preview rounds"

    async def check_preview_matches_execute(self) -> str:
        self.previewable()
        if self.executed is None:
            raise _Verdict(SKIP, f"nothing executed to compare with: {self.not_executed}")
        (_, action_id, _), answer = self.executed
        if not self.declared[action_id].previewable:
            raise _Verdict(
                SKIP,
                f"execute.idempotent executed {action_id}, which is not previewable; pass "
                "--action of a previewable one",
            )
        if self.executed_accepted:
            raise _Verdict(
                SKIP,
                f"not applicable: {action_id} is long-running and Execute answered ACCEPTED "
                "(its changes come with the final answer)",
                required=False,
            )
        shown = self.executed_preview
        if shown is None:
            raise _Verdict(SKIP, "execute.idempotent got no Preview before executing")
        where = f"{action_id} of execute.idempotent"
        rejected = _outcome_name(common_pb2.OUTCOME_REJECTED)
        if shown.reply is None:
            if answer.outcome != rejected:
                raise _Verdict(
                    FAIL, f"{where}: the preview refused ({shown}), but Execute answered [{answer}]"
                )
            same = "" if answer.reason == shown.reason else " (another reason)"
            return f"{where}: the preview refused ({shown}); Execute answered [{answer}]{same}"
        if answer.outcome == rejected:
            raise _Verdict(
                FAIL, f"{where}: the preview showed [{shown}], but Execute answered [{answer}]"
            )
        if answer.outcome != _outcome_name(common_pb2.OUTCOME_SUCCEEDED):
            raise _Verdict(SKIP, f"{where}: Execute answered [{answer}]: nothing whole to compare")
        if sorted(answer.changes) != sorted(shown.changes):
            previewed = ", ".join(f"{f} {b}->{a}" for f, b, a in shown.changes) or "no changes"
            executed = ", ".join(f"{f} {b}->{a}" for f, b, a in answer.changes) or "no changes"
            raise _Verdict(
                FAIL, f"{where}: the preview showed {previewed}, Execute changed {executed}"
            )
        return f"{where}: Execute changed what the preview showed ({len(answer.changes)} change(s))"

    def chosen_action(self) -> common_pb2.ActionDescriptor | None:
        return self.declared.get(self.action) if self.action else None

    def sample_inputs(
        self, action: common_pb2.ActionDescriptor
    ) -> dict[str, common_pb2.InputValue]:
        fields = {f.name: f for f in action.inputs}
        inputs = valid_inputs(action.inputs)
        problems = []
        for name, raw in self.inputs.items():
            try:
                inputs[name] = parse_input(raw, fields.get(name))
            except ValueError as exc:
                problems.append(f"--input {name}: {exc}")
        try:
            validate_inputs(action.inputs, inputs)
        except ActionMeshError as exc:
            problems.extend(f"--input {v.field}: {v.description}" for v in exc.violations)
        if problems:
            raise _Verdict(SKIP, "the sample inputs are invalid: " + _listing(problems))
        return inputs

    def eligible(self) -> tuple[common_pb2.RecordContext, common_pb2.ActionDescriptor]:
        """The first sample record and action Discover says are available."""
        if self.action and self.action not in self.declared:
            raise _Verdict(FAIL, f"--action {self.action} is not declared by the provider")
        if not self.records:
            raise _Verdict(
                SKIP,
                "no sample record; pass --record TENANT/TYPE/ID[:STATUS] of a record the "
                "provider may act on (this check executes the action once)",
            )
        if len(self.first_answers) < len(self.records):
            raise _Verdict(SKIP, "Discover failed for the sample records")
        seen: list[str] = []
        for record, answer in zip(self.records, self.first_answers, strict=False):
            for found in answer.actions:
                if self.action and found.action_id != self.action:
                    continue
                if found.available and found.action_id in self.declared:
                    return record.to_proto(), self.declared[found.action_id]
                seen.append(f"{record}: {found.action_id} {found.unavailable_reason or 'n/a'}")
        if not seen:
            seen = [f"{r}: no actions" for r in self.records]
        raise _Verdict(
            SKIP, "no sample record has an available action; Discover said " + _listing(seen)
        )

    async def check_idempotent(self) -> str:
        self.not_executed = "execute.idempotent executed nothing"
        self.require_describe()
        record, action = self.eligible()
        inputs = self.sample_inputs(action)
        key = f"conformance-{uuid.uuid4().hex}"
        where = f"{action.action_id} on {record.tenant}/{record.type}/{record.id}"
        self.not_executed = f"execute.idempotent got no answer for {where}"
        if action.previewable:
            # Read-only: what preview.matches_execute compares the execution with.
            self.executed_preview = await self.preview((record, action, inputs))
        answers = []
        for attempt in (1, 2):
            try:
                reply = await self.stub.Execute(
                    self.execute_request(action, record=record, inputs=inputs, key=key),
                    timeout=self.timeout_s,
                )
            except grpc.RpcError as exc:
                summary = _rpc_summary(_safe_details(exc))
                raise _Verdict(FAIL, f"{where}: attempt {attempt} failed: {summary}") from None
            long_running = action.HasField("long_running")
            allowed = (
                (*PROVIDER_OUTCOMES, common_pb2.OUTCOME_ACCEPTED)
                if long_running
                else (PROVIDER_OUTCOMES)
            )
            if reply.outcome not in allowed:
                raise _Verdict(
                    FAIL,
                    f"{where}: attempt {attempt} answered {_outcome_name(reply.outcome)}; "
                    "a provider answers SUCCEEDED, REJECTED or PARTIAL"
                    + (" (ACCEPTED too: the action is long-running)" if long_running else ""),
                )
            answers.append(_Answer.of(reply))
        first, second = answers
        accepted = _outcome_name(common_pb2.OUTCOME_ACCEPTED)
        if first.outcome == accepted:
            # Still at work: the repeat is ACCEPTED again (the external ref may have been
            # named meanwhile) or the final answer, if it finished in between.
            self.executed = ((record.tenant, action.action_id, key), first)
            self.executed_accepted = True
            return (
                f"{where}: ACCEPTED once (long-running); the repeated key answered {second.outcome}"
            )
        if first != second:
            self.not_executed = (
                f"execute.idempotent got two answers for one key ({where}): no one answer "
                "to compare"
            )
            raise _Verdict(
                FAIL,
                f"{where}: the same idempotency key got another answer: [{first}] then "
                f"[{second}]; a repeated key must return the first answer without acting again",
            )
        self.executed = ((record.tenant, action.action_id, key), first)
        if first.outcome == _outcome_name(common_pb2.OUTCOME_REJECTED):
            raise _Verdict(
                SKIP,
                f"{where}: the provider REJECTED it ({first.reason}), so nothing ran; "
                "pass a record it will act on",
            )
        return f"{where}: {first} once; the repeated key returned the same answer"

    # -- GetExecutionStatus -------------------------------------------------------

    async def check_status_unknown_key(self) -> str:
        self.require_describe()
        action = self.chosen_action() or next(iter(self.declared.values()))
        key = (self.probe_tenant, action.action_id, f"conformance-never-{uuid.uuid4().hex}")
        answer = await self.ask_status(key)
        if answer.code == grpc.StatusCode.UNIMPLEMENTED:
            self.status_supported = False
            raise _Verdict(SKIP, _STATUS_UNSUPPORTED, required=False)
        self.status_supported = True
        self.unknown_status = (key, answer)
        where = f"{action.action_id}, a key never sent"
        if answer.reply is None:
            raise _Verdict(FAIL, f"{where}: answered {answer}, expected NEVER_RECEIVED")
        if answer.state != provider_pb2.EXECUTION_STATE_NEVER_RECEIVED:
            raise _Verdict(FAIL, f"{where}: answered {answer}, expected NEVER_RECEIVED")
        extra = [name for name in ("result", "progress") if answer.reply.HasField(name)]
        if extra:
            raise _Verdict(FAIL, f"{where}: NEVER_RECEIVED with {' and '.join(extra)}")
        return f"{where}: NEVER_RECEIVED"

    async def check_status_finished(self) -> str:
        key, executed = self.require_executed()
        tenant, action_id, _ = key
        where = f"{action_id} key of execute.idempotent ({tenant})"
        answer = await self.ask_status(key)
        self.finished_status = answer
        reported = answer.answer()
        if self.executed_accepted:
            problem = _long_running_problem(answer)
            if problem:
                raise _Verdict(FAIL, f"{where}: Execute answered ACCEPTED; {problem}")
            return f"{where}: Execute answered ACCEPTED; now {answer}"
        partial = executed.outcome == _outcome_name(common_pb2.OUTCOME_PARTIAL)
        if (
            answer.reply is not None
            and partial
            and answer.state
            in (
                provider_pb2.EXECUTION_STATE_RUNNING,
                provider_pb2.EXECUTION_STATE_FINISHED,
            )
        ):
            if reported == executed:
                return f"{where}: FINISHED [{reported}], as Execute answered"
            # The contract lets a provider settle a PARTIAL it could not tell about.
            return f"{where}: Execute answered [{executed}], since settled as {answer}"
        if answer.reply is None or answer.state != provider_pb2.EXECUTION_STATE_FINISHED:
            raise _Verdict(
                FAIL, f"{where}: answered {answer}, expected FINISHED [{executed}] as Execute did"
            )
        if reported != executed:
            raise _Verdict(
                FAIL,
                f"{where}: FINISHED with [{reported or 'no result'}], but Execute answered "
                f"[{executed}]",
            )
        return f"{where}: FINISHED [{reported}], as Execute answered"

    async def check_status_stable(self) -> str:
        self.require_status()
        asked: list[tuple[str, _Status, StatusKey]] = []
        if self.unknown_status is not None:
            key, first = self.unknown_status
            asked.append(("a key never sent", first, key))
        if self.executed is not None and self.finished_status is not None:
            asked.append(("the executed key", self.finished_status, self.executed[0]))
        if not asked:
            raise _Verdict(SKIP, "no earlier GetExecutionStatus answer to compare with")
        changed = []
        for label, first, key in asked:
            for _ in range(2):
                then = await self.ask_status(key)
                moved_on = (
                    label == "the executed key"
                    and self.executed_accepted
                    and first.state == provider_pb2.EXECUTION_STATE_RUNNING
                    and then.state == provider_pb2.EXECUTION_STATE_FINISHED
                )
                if moved_on:
                    break  # a long-running execution finished in between
                if then.key() != first.key():
                    changed.append(f"{label}: {first} then {then}")
                    break
        if changed:
            raise _Verdict(FAIL, "the same request got another answer: " + _listing(changed))
        return f"{' and '.join(label for label, _, _ in asked)} answered the same 3 times"

    async def check_status_tenant_isolation(self) -> str:
        (tenant, action_id, key), _ = self.require_executed()
        other = f"{PROBE_TENANT}-other-{uuid.uuid4().hex[:8]}"
        answer = await self.ask_status((other, action_id, key))
        where = f"the {action_id} key of {tenant} asked for by tenant {other}"
        if answer.reply is None or answer.state != provider_pb2.EXECUTION_STATE_NEVER_RECEIVED:
            raise _Verdict(
                FAIL,
                f"{where}: answered {answer}; another tenant's key must be NEVER_RECEIVED, like "
                "a key never sent",
            )
        if answer.reply.HasField("result") or answer.reply.HasField("progress"):
            raise _Verdict(FAIL, f"{where}: NEVER_RECEIVED, but with what the key holds")
        return f"{where}: NEVER_RECEIVED"

    # -- long-running actions ----------------------------------------------------

    def long_running_actions(self) -> list[common_pb2.ActionDescriptor]:
        """The long-running actions; a provider without any skips (not applicable)."""
        self.require_describe()
        found = [a for a in self.declared.values() if a.HasField("long_running")]
        if not found:
            raise _Verdict(
                SKIP,
                "not applicable: the provider declares no long-running action",
                required=False,
            )
        return found

    def require_accepted(self) -> tuple[StatusKey, common_pb2.ActionDescriptor]:
        self.long_running_actions()
        if self.executed is None:
            raise _Verdict(SKIP, f"no executed key to ask about: {self.not_executed}")
        key = self.executed[0]
        action = self.declared[key[1]]
        if not action.HasField("long_running"):
            raise _Verdict(
                SKIP,
                f"execute.idempotent executed {action.action_id}, which is not long-running; "
                "pass --action of a long-running one",
            )
        if not self.executed_accepted:
            raise _Verdict(
                SKIP, f"{action.action_id} finished at once (Execute did not answer ACCEPTED)"
            )
        return key, action

    async def check_long_running_accepted(self) -> str:
        problems = []
        for action in self.long_running_actions():
            settings = action.long_running
            if settings.max_duration_s == 0:
                problems.append(f"{action.action_id}: long_running.max_duration_s is 0")
            if settings.poll_interval_ms > settings.max_duration_s * 1000:
                problems.append(f"{action.action_id}: poll_interval_ms exceeds max_duration_s")
        if problems:
            raise _Verdict(FAIL, _listing(problems))
        if self.executed is None or self.executed[0][1] not in self.declared:
            raise _Verdict(SKIP, f"nothing executed to judge: {self.not_executed}")
        (_, action_id, _), answer = self.executed
        if not self.declared[action_id].HasField("long_running"):
            raise _Verdict(
                SKIP,
                f"execute.idempotent executed {action_id}, which is not long-running; pass "
                "--action of a long-running one",
            )
        return f"{action_id}: Execute answered {answer.outcome}"

    async def check_long_running_progress(self) -> str:
        key, action = self.require_accepted()
        self.require_status()
        first = await self.ask_status(key)
        then = await self.ask_status(key)
        where = f"{action.action_id} key of execute.idempotent"
        for answer in (first, then):
            problem = _long_running_problem(answer)
            if problem:
                raise _Verdict(FAIL, f"{where}: {problem}")
        if first.state == provider_pb2.EXECUTION_STATE_FINISHED and then.key() != first.key():
            raise _Verdict(FAIL, f"{where}: FINISHED changed: {first} then {then}")
        progress = ""
        if then.reply is not None and then.reply.HasField("progress"):
            progress = f" ({then.reply.progress.message!r})"
        return f"{where}: {first} then {then}{progress}"

    async def stop(self, key: StatusKey) -> tuple[int, str]:
        """StopExecution of (tenant, action, key): (state, "") or (0, the refusal)."""
        tenant, action_id, idempotency_key = key
        request = provider_pb2.StopExecutionRequest(
            tenant=tenant,
            action_id=action_id,
            idempotency_key=idempotency_key,
            request_id=f"conformance-{uuid.uuid4().hex}",
            requested_by=OPERATOR_SUBJECT,
            reason="conformance check of StopExecution",
        )
        try:
            reply = await self.stub.StopExecution(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            return provider_pb2.EXECUTION_STATE_UNSPECIFIED, _rpc_summary(_safe_details(exc))
        return reply.state, ""

    async def check_long_running_stop(self) -> str:
        actions = self.long_running_actions()
        cancellable = [a for a in actions if a.long_running.cancellable]
        if not cancellable:
            refused = await self.stop((self.probe_tenant, actions[0].action_id, "conformance-x"))
            state, refusal = refused
            if refusal.startswith(("FAILED_PRECONDITION", "UNIMPLEMENTED")):
                return f"no cancellable action; StopExecution answered {refusal}"
            raise _Verdict(
                FAIL,
                f"{actions[0].action_id} is not cancellable, but StopExecution answered "
                f"{refusal or _state_name(state)}; expected FAILED_PRECONDITION or UNIMPLEMENTED",
            )
        never = (
            self.probe_tenant,
            cancellable[0].action_id,
            f"conformance-never-{uuid.uuid4().hex}",
        )
        state, refusal = await self.stop(never)
        if state != provider_pb2.EXECUTION_STATE_NEVER_RECEIVED:
            raise _Verdict(
                FAIL,
                f"StopExecution of a key never sent answered {refusal or _state_name(state)}, "
                "expected NEVER_RECEIVED",
            )
        key, action = self.require_accepted()
        if not action.long_running.cancellable:
            return f"a key never sent: NEVER_RECEIVED ({action.action_id} is not cancellable)"
        where = f"{action.action_id} key of execute.idempotent"
        asked = []
        for _ in range(2):
            state, refusal = await self.stop(key)
            if state not in (
                provider_pb2.EXECUTION_STATE_RUNNING,
                provider_pb2.EXECUTION_STATE_FINISHED,
            ):
                raise _Verdict(
                    FAIL,
                    f"{where}: StopExecution answered {refusal or _state_name(state)}, "
                    "expected RUNNING or FINISHED",
                )
            asked.append(_state_name(state))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_SETTLE_S
        while True:
            answer = await self.ask_status(key)
            problem = _long_running_problem(answer)
            if problem:
                raise _Verdict(FAIL, f"{where}: after StopExecution, {problem}")
            if answer.state == provider_pb2.EXECUTION_STATE_FINISHED:
                break
            if loop.time() > deadline:
                raise _Verdict(
                    FAIL, f"{where}: still {answer} {STOP_SETTLE_S:g} s after StopExecution"
                )
            await asyncio.sleep(0.2)
        state, refusal = await self.stop(key)
        if state != provider_pb2.EXECUTION_STATE_FINISHED:
            raise _Verdict(
                FAIL,
                f"{where}: finished, but StopExecution then answered "
                f"{refusal or _state_name(state)}, expected FINISHED",
            )
        return f"{where}: StopExecution {' then '.join(asked)}, then {answer}"


def _long_running_problem(answer: _Status) -> str | None:
    """What is wrong with a status of an accepted long-running execution, if anything."""
    if answer.reply is None:
        return f"GetExecutionStatus answered {answer}, expected RUNNING or FINISHED"
    if answer.state == provider_pb2.EXECUTION_STATE_RUNNING:
        return None
    if answer.state != provider_pb2.EXECUTION_STATE_FINISHED:
        return f"answered {answer}, expected RUNNING or FINISHED"
    if not answer.reply.HasField("result"):
        return "FINISHED without a result"
    if answer.reply.result.outcome not in FINAL_OUTCOMES:
        return (
            f"FINISHED with {_outcome_name(answer.reply.result.outcome)}; a finished "
            "execution is SUCCEEDED, REJECTED, PARTIAL or CANCELLED"
        )
    return None


_STATUS_UNSUPPORTED = (
    "not supported: GetExecutionStatus is UNIMPLEMENTED (the provider keeps no record of its "
    "executions), so the gateway cannot settle its unknown outcomes; the SDK answers it with "
    "dedupe=True or @provider.execution_status"
)


async def run_checks(
    address: str,
    *,
    records: Sequence[SampleRecord] = (),
    action: str | None = None,
    inputs: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
    require_all: bool = False,
    tls: TlsConfig | None = None,
) -> list[CheckResult]:
    """Run every check in :data:`CHECKS` against the provider at ``address``.

    ``records`` are records the provider may act on; ``action`` and ``inputs``
    (``name -> text``, converted with the declared input types; other required
    inputs get schema-derived values) choose what ``execute.idempotent`` runs.
    That check executes the action once for real. ``records`` of a type the
    provider is the system of record of are what the ``source.*`` checks read.
    ``require_all`` turns skips into failures, except the skips of checks that do
    not apply (the ``source.*`` checks of a provider that sources no record type, the
    ``status.*`` checks of one that answers GetExecutionStatus UNIMPLEMENTED).
    With ``tls`` the kit connects over TLS and presents ``tls.cert_file`` (a
    provider serving TLS requires a client certificate). A coroutine: call it from
    a running event loop (tests with an in-process provider) or through
    ``asyncio.run``.
    """
    channel = (
        grpc.aio.secure_channel(address, tls.channel_credentials())
        if tls is not None and tls.enabled
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        kit = _Kit(
            channel,
            records=records,
            action=action,
            inputs=inputs or {},
            timeout_s=timeout_s,
        )
        steps: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("health", kit.check_health),
            ("describe", kit.check_describe),
            ("discover.declared_only", kit.check_declared_only),
            ("discover.stable", kit.check_stable),
            ("discover.side_effect_free", kit.check_side_effect_free),
            ("source.declared", kit.check_source_declared),
            ("source.unknown_record", kit.check_source_unknown_record),
            ("source.tenant_isolation", kit.check_source_tenant_isolation),
            ("source.answer", kit.check_source_answer),
            ("source.stable", kit.check_source_stable),
            ("source.side_effect_free", kit.check_source_side_effect_free),
            ("source.unsourced_type", kit.check_source_unsourced_type),
            ("execute.unknown_action", kit.check_unknown_action),
            ("execute.idempotency_key_required", kit.check_key_required),
            ("execute.invalid_inputs", kit.check_invalid_inputs),
            ("execute.tenant_mismatch", kit.check_tenant_mismatch),
            ("preview.unsupported", kit.check_preview_unsupported),
            ("preview.stable", kit.check_preview_stable),
            ("preview.read_only", kit.check_preview_read_only),
            ("execute.idempotent", kit.check_idempotent),
            ("preview.matches_execute", kit.check_preview_matches_execute),
            ("status.unknown_key", kit.check_status_unknown_key),
            ("status.finished", kit.check_status_finished),
            ("status.stable", kit.check_status_stable),
            ("status.tenant_isolation", kit.check_status_tenant_isolation),
            ("long_running.accepted", kit.check_long_running_accepted),
            ("long_running.progress", kit.check_long_running_progress),
            ("long_running.stop", kit.check_long_running_stop),
        ]
        results = []
        for name, step in steps:
            required = True
            try:
                result = CheckResult(name, PASS, await step())
            except _Verdict as verdict:
                result = CheckResult(name, verdict.status, verdict.detail)
                required = verdict.required
            except grpc.RpcError as exc:
                result = CheckResult(name, FAIL, f"call failed: {_rpc_summary(_safe_details(exc))}")
            if require_all and required and result.status == SKIP:
                result = CheckResult(name, FAIL, f"skipped but required: {result.detail}")
            results.append(result)
        return results


def failed(results: Sequence[CheckResult]) -> bool:
    """Whether any check failed (skips do not count unless ``require_all`` made them fail)."""
    return any(r.status == FAIL for r in results)
