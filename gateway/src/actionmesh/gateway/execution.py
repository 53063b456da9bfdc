"""ExecuteAction: validate, authorize again, claim the key, dispatch once.

Where an execution goes, module by module:

- validated and **authorized** here (:class:`Executor`), on the record's facts as
  :mod:`~actionmesh.gateway.facts` resolves them (its system of record, a trusted
  caller, or marked unverified), with the decision made in
  :mod:`~actionmesh.gateway.authorization`; every refusal (invalid input, tenant,
  unknown action, unknown record, record source down, stale view, policy, unhealthy
  provider) is one EXECUTION_FINISHED event;
- **admitted** by :mod:`~actionmesh.gateway.admission` (rate and concurrency limits);
- **claimed** in :mod:`~actionmesh.gateway.claims` (one execution per idempotency key;
  actions that require approval stop there at APPROVAL_REQUESTED, see
  :mod:`~actionmesh.gateway.approvals`);
- **dispatched** and finished in :mod:`~actionmesh.gateway.dispatch` (deadline, late
  answers, the outcome of a failed call);
- **written** only by :mod:`~actionmesh.gateway.ledger` (row and events together);
- **swept** by :mod:`~actionmesh.gateway.sweeper` (expired approvals, orphans).

The states and legal moves are in :mod:`~actionmesh.gateway.model`.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import replace
from typing import NoReturn

from opentelemetry import trace

from actionmesh.gateway.admission import Admission
from actionmesh.gateway.auth import Caller
from actionmesh.gateway.authorization import Authorized, Authorizer
from actionmesh.gateway.claims import Claims, request_hash
from actionmesh.gateway.directory import ProviderDirectory
from actionmesh.gateway.dispatch import Dispatch, Dispatcher
from actionmesh.gateway.facts import FactResolver
from actionmesh.gateway.ledger import FINISHED, PREVIEWED, Ledger
from actionmesh.gateway.metrics import record_execution
from actionmesh.gateway.model import ExecuteCommand, ExecutionRecord, ExecutionState
from actionmesh.gateway.previews import Previews
from actionmesh.gateway.requests import execute_violations
from actionmesh.gateway.tenancy import require_same_tenant
from actionmesh.rpc.errors import (
    ActionMeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from actionmesh.rpc.outcomes import Outcome
from actionmesh.rpc.schema import validate_inputs
from actionmesh.v1 import audit_pb2, common_pb2

UNAVAILABLE_RETRY_S = 1.0


def provider_unavailable(provider_id: str, why: str) -> Unavailable:
    """The refusal when the action's provider cannot run it now (nothing ran)."""
    return Unavailable(
        f"provider {provider_id} {why}; nothing ran",
        reason="PROVIDER_UNAVAILABLE",
        retry_after_s=UNAVAILABLE_RETRY_S,
    )


class Purpose(enum.Enum):
    """Why a request is authorized: to run it, or to preview what running it would do."""

    EXECUTE = "execute"
    PREVIEW = "preview"

    @property
    def event_type(self) -> audit_pb2.AuditEventType.ValueType:
        """The audit event a refusal is recorded as."""
        return FINISHED if self is Purpose.EXECUTE else PREVIEWED


class _Replay(Exception):
    """The request is a retry of an execution that already has its answer."""

    def __init__(self, record: ExecutionRecord) -> None:
        super().__init__(record.execution_id)
        self.record = record


class Executor:
    def __init__(
        self,
        *,
        directory: ProviderDirectory,
        facts: FactResolver,
        authorizer: Authorizer,
        admission: Admission,
        claims: Claims,
        dispatcher: Dispatcher,
        ledger: Ledger,
        previews: Previews,
    ) -> None:
        self._directory = directory
        self._facts = facts
        self._authorizer = authorizer
        self._admission = admission
        self._claims = claims
        self._dispatcher = dispatcher
        self._ledger = ledger
        self._previews = previews

    async def preview(
        self, caller: Caller, command: ExecuteCommand
    ) -> tuple[common_pb2.ActionPreview, common_pb2.RecordFacts | None]:
        """PreviewAction: the checks of ExecuteAction (policy ``execute`` on the verified
        facts), then the provider's preview; audited as ACTION_PREVIEWED either way."""
        span = trace.get_current_span()
        span.set_attribute("actionmesh.action_id", command.action_id)
        span.set_attribute("actionmesh.tenant", caller.tenant)
        authorized, command = await self._authorize(caller, command, "", Purpose.PREVIEW)
        preview = await self._preview(Purpose.PREVIEW, caller, command, "", authorized)
        await self._ledger.previewed(caller, command, authorized, preview)
        return preview, authorized.facts

    async def _preview(
        self,
        purpose: Purpose,
        caller: Caller,
        command: ExecuteCommand,
        attempt_id: str,
        authorized: Authorized,
    ) -> common_pb2.ActionPreview:
        """The provider's preview; its refusal audited (REJECTED when the provider says the
        action would be refused, else the refusal's outcome) and raised."""
        try:
            return await self._previews.ask(
                caller, command, authorized.entry, authorized.descriptor
            )
        except ActionMeshError as refused:
            would_be_rejected = isinstance(refused, FailedPrecondition | InvalidArgument)
            await self._refuse(
                purpose,
                caller,
                command,
                attempt_id,
                refused,
                provider_id=authorized.entry.provider_id,
                authorized=authorized,
                outcome=Outcome.REJECTED if would_be_rejected else None,
            )

    async def execute(self, caller: Caller, command: ExecuteCommand) -> ExecutionRecord:
        span = trace.get_current_span()
        span.set_attribute("actionmesh.action_id", command.action_id)
        span.set_attribute("actionmesh.tenant", caller.tenant)
        span.set_attribute("actionmesh.record.type", command.record.type)
        attempt_id = uuid.uuid4().hex
        try:
            authorized, command = await self._authorize(
                caller, command, attempt_id, Purpose.EXECUTE
            )
            preview = None
            if authorized.descriptor.requires_approval and authorized.descriptor.previewable:
                # What the approvers will approve; asked only for a request not held yet.
                await self._replayed(Purpose.EXECUTE, caller, command)
                preview = await self._preview(
                    Purpose.EXECUTE, caller, command, attempt_id, authorized
                )
        except _Replay as replay:
            span.set_attribute("actionmesh.execution_id", replay.record.execution_id)
            return replay.record
        # Before the claim: a refused call leaves no row, so the same key may come back.
        slot = self._admission.enter(caller.tenant, authorized.entry.provider_id)
        try:
            record = await self._claims.claim(
                caller, command, attempt_id, authorized, preview=preview
            )
            if not record.finished:
                dispatch = Dispatch(caller, command, authorized.entry, authorized.descriptor)
                record = await self._dispatcher.run(dispatch, record, slot=slot)
        finally:
            if not slot.handed_over:
                slot.release()
        span.set_attribute("actionmesh.execution_id", record.execution_id)
        span.set_attribute("actionmesh.outcome", record.outcome.value)
        if record.outcome is ExecutionState.UNAVAILABLE:
            raise Unavailable(
                record.message or "the provider could not be reached; nothing ran",
                reason=record.reason or "PROVIDER_UNAVAILABLE",
                retry_after_s=UNAVAILABLE_RETRY_S,
                metadata={"execution_id": record.execution_id},
            )
        return record

    async def _authorize(
        self, caller: Caller, command: ExecuteCommand, attempt_id: str, purpose: Purpose
    ) -> tuple[Authorized, ExecuteCommand]:
        """Every platform check, in order; a refusal is audited, then raised. A preview
        goes through the same checks, without an idempotency key."""
        problems = execute_violations(
            command.action_id,
            command.record,
            command.has_record,
            command.idempotency_key if purpose is Purpose.EXECUTE else None,
            command.inputs,
        )
        if problems:
            invalid = InvalidArgument(
                "invalid request", reason="INVALID_REQUEST", violations=problems
            )
            # A malformed record cannot be filed on any timeline; refuse without evidence.
            if any(p.field.startswith("record") for p in problems):
                raise invalid
            if any(p.field.startswith("inputs") for p in problems):
                # Inputs beyond the limits never become evidence; the attempt still does.
                command = replace(command, inputs={})
            await self._refuse(purpose, caller, command, attempt_id, invalid)
        try:
            require_same_tenant(caller, command.record)
        except PermissionDenied as denied:
            await self._refuse(purpose, caller, command, attempt_id, denied)
        found = self._directory.find_action(command.action_id)
        if found is None:
            await self._refuse(
                purpose,
                caller,
                command,
                attempt_id,
                NotFound(
                    f"no provider offers action {command.action_id!r}", reason="UNKNOWN_ACTION"
                ),
            )
        entry, descriptor = found
        trace.get_current_span().set_attribute("actionmesh.provider_id", entry.provider_id)
        if command.record.type not in descriptor.record_types:
            await self._refuse(
                purpose,
                caller,
                command,
                attempt_id,
                InvalidArgument(
                    f"action does not apply to record type {command.record.type!r}",
                    reason="RECORD_TYPE_NOT_SUPPORTED",
                ),
                provider_id=entry.provider_id,
            )
        try:
            validate_inputs(descriptor.inputs, command.inputs)
        except InvalidArgument as invalid:
            await self._refuse(
                purpose, caller, command, attempt_id, invalid, provider_id=entry.provider_id
            )
        if entry.not_serving:
            # Nothing could run: say so before asking the record's source anything.
            await self._refuse(
                purpose,
                caller,
                command,
                attempt_id,
                provider_unavailable(entry.provider_id, "is not healthy"),
                provider_id=entry.provider_id,
            )
        try:
            # Fresh: the system of record (or a trusted caller) says what the record is.
            verified = await self._facts.resolve(caller, command.record, fresh=True)
        except (NotFound, Unavailable) as unknown:
            await self._replayed(purpose, caller, command)
            if (
                isinstance(unknown, Unavailable)
                and unknown.metadata.get("provider_id") == entry.provider_id
            ):
                # The action's own provider is its record's source: it is the one down.
                unknown = provider_unavailable(entry.provider_id, "is not available")
            # Nobody vouched for the record: its inputs are kept as if it were sensitive.
            await self._refuse(
                purpose,
                caller,
                command,
                attempt_id,
                unknown,
                provider_id=entry.provider_id,
                sensitive=True,
            )
        if verified.stale:
            await self._replayed(purpose, caller, command)
            await self._refuse(
                purpose,
                caller,
                command,
                attempt_id,
                FailedPrecondition(
                    "the record changed since the caller looked at it (version "
                    f"{verified.facts.caller_version!r}, now {verified.facts.version!r}); "
                    "look again before acting",
                    reason="RECORD_CHANGED",
                    metadata={"version": verified.facts.version},
                ),
                provider_id=entry.provider_id,
                facts=verified.facts,
                sensitive=verified.sensitive,
            )
        # From here on the request is about the record as its source knows it.
        command = command.on(verified.record)
        authorized = self._authorizer.execute(caller, verified, entry, descriptor, command.inputs)
        if not authorized.allowed:
            await self._replayed(purpose, caller, command)
            await self._refuse(
                purpose,
                caller,
                command,
                attempt_id,
                PermissionDenied("not permitted by policy", reason="POLICY_DENIED"),
                provider_id=entry.provider_id,
                authorized=authorized,
            )
        return authorized, command

    async def _replayed(self, purpose: Purpose, caller: Caller, command: ExecuteCommand) -> None:
        """Raise _Replay when this key already ran this very request to an answer.

        Asked only when the record's facts would refuse the call now: the first attempt
        may itself have changed the record (its version, its status), and a retry with
        the same key must get the stored answer rather than a refusal caused by it.
        """
        if purpose is not Purpose.EXECUTE:
            return  # a preview has no key, and nothing to replay
        stored = await self._ledger.find_by_key(caller.tenant, command.idempotency_key)
        if (
            stored is not None
            and stored.request_hash == request_hash(caller, command)
            and stored.finished
            and stored.outcome is not ExecutionState.UNAVAILABLE
        ):
            raise _Replay(stored)

    async def _refuse(
        self,
        purpose: Purpose,
        caller: Caller,
        command: ExecuteCommand,
        attempt_id: str,
        error: ActionMeshError,
        *,
        provider_id: str = "",
        authorized: Authorized | None = None,
        facts: common_pb2.RecordFacts | None = None,
        sensitive: bool | None = None,
        outcome: Outcome | None = None,
    ) -> NoReturn:
        """Record a refused attempt as evidence, then raise the refusal to the caller.

        Before the record's facts are resolved, its inputs are redacted when the caller
        says the record is sensitive or a system of record could have said otherwise.
        """
        if sensitive is None and facts is None and authorized is None:
            sensitive = command.sensitive or self._facts.has_source(command.record.type)
        outcome = await self._ledger.refuse(
            caller,
            command,
            attempt_id="" if purpose is Purpose.PREVIEW else attempt_id,
            error=error,
            provider_id=provider_id,
            authorized=authorized,
            facts=facts,
            sensitive=sensitive,
            event_type=purpose.event_type,
            outcome=outcome,
        )
        trace.get_current_span().set_attribute("actionmesh.outcome", outcome.value)
        record_execution(command.action_id, provider_id, outcome.value)
        raise error
