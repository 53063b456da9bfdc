"""People stepping into an execution: cancelling it, or recording what became of it.

Both are governed (Cedar actions ``cancel`` and ``resolve``) and audited, refusals
included (EXECUTION_CANCEL_REQUESTED / EXECUTION_RESOLVE_REFUSED with POLICY_DENIED),
like approvals.

**Cancel** a long-running execution: the provider is told.

Only an ACCEPTED execution of an action that declares itself cancellable can be
cancelled. Policy decides who may (Cedar action ``cancel``, on the record's facts as
its source gives them now; the default lets operators and supervisors), and every
attempt is evidence: an EXECUTION_CANCEL_REQUESTED event, with reason POLICY_DENIED when
refused. The request is stored first (a compare-and-set, so two cancels count once),
then the provider is asked to stop right away through the reconciler, which asks again
at every question until the provider reports how the execution ended (CANCELLED, or
what it reached before it could stop). The caller is answered with the execution as it
stands then: usually still ACCEPTED, its cancel recorded.

**Resolve** an execution whose outcome the gateway could not settle (NEEDS_ATTENTION, or
still PENDING when a person knows first): the person records what the provider's system
shows (its outcome, external ref, how they know). It becomes the resolved outcome, with
an EXECUTION_RECONCILED event naming them; what the caller was told stays. UNAVAILABLE
records that nothing ran, so a same-key retry dispatches again. A provider that left
the mesh does not block it: the action is then decided on as a high-risk one.
"""

from __future__ import annotations

import logging

from actionmesh.gateway.approvals import check_comment
from actionmesh.gateway.auth import Caller
from actionmesh.gateway.authorization import Authorizer
from actionmesh.gateway.directory import ProviderDirectory, ProviderEntry
from actionmesh.gateway.facts import FactResolver, VerifiedRecord
from actionmesh.gateway.ledger import CANCEL_REQUESTED, RESOLVE_REFUSED, Ledger
from actionmesh.gateway.model import (
    PERSON_OUTCOMES,
    ExecuteCommand,
    ExecutionRecord,
    ExecutionState,
    IllegalTransition,
)
from actionmesh.gateway.reconciler import Reconciler
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from actionmesh.rpc.outcomes import Outcome
from actionmesh.v1 import common_pb2, registry_pb2

log = logging.getLogger(__name__)


class Interventions:
    def __init__(
        self,
        *,
        directory: ProviderDirectory,
        facts: FactResolver,
        authorizer: Authorizer,
        ledger: Ledger,
        reconciler: Reconciler,
    ) -> None:
        self._directory = directory
        self._facts = facts
        self._authorizer = authorizer
        self._ledger = ledger
        self._reconciler = reconciler

    async def cancel(self, caller: Caller, execution_id: str, comment: str) -> ExecutionRecord:
        check_comment(comment, required=True)
        row = await self._ledger.get(caller.tenant, execution_id)
        if row is None:
            raise NotFound("no such execution", reason="EXECUTION_NOT_FOUND")
        not_running(row)
        found = self._directory.find_action(row.action_id)
        if found is None:
            raise Unavailable(
                f"provider {row.provider_id} is not registered now; cancel again later",
                reason="PROVIDER_UNAVAILABLE",
                retry_after_s=5.0,
            )
        entry, descriptor = found
        if not descriptor.long_running.cancellable:
            raise FailedPrecondition(
                f"{row.action_id} cannot be cancelled once accepted",
                reason="ACTION_NOT_CANCELLABLE",
                metadata={"execution_id": row.execution_id},
            )
        command = ExecuteCommand.thaw(row.request_payload)
        # Cancelling stops work: a source that is away does not block it.
        verified = await self._record_now(caller, command)
        authorized = self._authorizer.cancel(caller, verified, entry, descriptor)
        if not authorized.allowed:
            error = PermissionDenied("not permitted by policy to cancel", reason="POLICY_DENIED")
            await self._ledger.note(CANCEL_REQUESTED, caller, command, row, error, authorized)
            raise error
        asked = row.cancel_requested(by=caller.subject, comment=comment, at=utcnow())
        written = await self._ledger.request_cancel(caller, asked, authorized)
        if written is None:
            # Another request moved it first: say what it is now.
            latest = await self._ledger.get(caller.tenant, execution_id)
            if latest is not None:
                not_running(latest)
                if latest.cancel_requested_by:
                    raise FailedPrecondition(
                        f"{latest.cancel_requested_by} already asked to cancel it",
                        reason="CANCEL_ALREADY_REQUESTED",
                        metadata={"execution_id": row.execution_id},
                    )
            raise FailedPrecondition(
                "the execution changed while cancelling; look again",
                reason="EXECUTION_NOT_RUNNING",
            )
        # Tell the provider now (another replica may hold the lease: it tells it then). The
        # cancel is recorded whatever happens here: the loop tells the provider next time.
        try:
            followed = await self._reconciler.reconcile(written, right_away=True)
        except Exception:
            log.exception("execution %s: telling the provider to stop failed", execution_id)
            return written
        return followed or written

    async def resolve(
        self,
        caller: Caller,
        execution_id: str,
        outcome_value: common_pb2.Outcome.ValueType,
        comment: str,
        external_ref: str = "",
    ) -> ExecutionRecord:
        check_comment(comment, required=True)
        outcome = Outcome.from_proto(outcome_value) if outcome_value in _KNOWN else None
        if outcome not in PERSON_OUTCOMES:
            raise InvalidArgument(
                "outcome must be one a provider can reach",
                reason="INVALID_REQUEST",
                violations=[
                    FieldViolation(
                        "outcome",
                        "must be SUCCEEDED, REJECTED, PARTIAL, CANCELLED or UNAVAILABLE "
                        "(nothing ran)",
                    )
                ],
            )
        assert outcome is not None
        if len(external_ref) > MAX_REF_CHARS:
            raise InvalidArgument(
                "external_ref too long",
                reason="INVALID_REQUEST",
                violations=[
                    FieldViolation("external_ref", f"must be at most {MAX_REF_CHARS} characters")
                ],
            )
        row = await self._ledger.get(caller.tenant, execution_id)
        if row is None:
            raise NotFound("no such execution", reason="EXECUTION_NOT_FOUND")
        try:
            moved = row.resolved_by_person(outcome, at=utcnow(), external_ref=external_ref)
        except IllegalTransition:
            raise nothing_to_resolve(row) from None
        command = ExecuteCommand.thaw(row.request_payload)
        authorized = self._authorizer.resolve(
            caller, await self._record_now(caller, command), *self._action_of(row)
        )
        if not authorized.allowed:
            error = PermissionDenied("not permitted by policy to resolve", reason="POLICY_DENIED")
            await self._ledger.note(RESOLVE_REFUSED, caller, command, row, error, authorized)
            raise error
        written = await self._ledger.resolve_by_person(
            caller, moved, told=row, comment=comment, authorized=authorized
        )
        if written is None:
            latest = await self._ledger.get(caller.tenant, execution_id)
            if latest is not None and latest.late_outcome is not None:
                raise nothing_to_resolve(latest)
            raise FailedPrecondition(
                "the gateway is asking the provider about it right now; try again shortly",
                reason="RECONCILE_IN_PROGRESS",
                retry_after_s=5.0,
            )
        return written

    # -- internals ------------------------------------------------------------
    async def _record_now(self, caller: Caller, command: ExecuteCommand) -> VerifiedRecord:
        """The record's facts now, or the stored claim when its source cannot say (neither
        step runs anything)."""
        try:
            return await self._facts.resolve(caller, command.record, fresh=True)
        except (NotFound, Unavailable):
            return self._facts.unverified(command.record)

    def _action_of(self, row: ExecutionRecord) -> tuple[ProviderEntry, common_pb2.ActionDescriptor]:
        """The action as its provider declares it; a provider that left is decided on as
        a high-risk action (nothing better is known of it)."""
        found = self._directory.find_action(row.action_id)
        if found is not None:
            return found
        departed = ProviderEntry(registry_pb2.ProviderRegistration(provider_id=row.provider_id))
        return departed, common_pb2.ActionDescriptor(
            action_id=row.action_id, record_types=[row.record_type], risk=common_pb2.RISK_HIGH
        )


_KNOWN = frozenset(common_pb2.Outcome.values())
MAX_REF_CHARS = 512


def nothing_to_resolve(row: ExecutionRecord) -> FailedPrecondition:
    return FailedPrecondition(
        "the execution's outcome is settled; there is nothing to resolve",
        reason="NOTHING_TO_RESOLVE",
        metadata={
            "execution_id": row.execution_id,
            "reconcile_state": row.reconcile_state.value,
        },
    )


def not_running(row: ExecutionRecord) -> None:
    if row.outcome is not ExecutionState.ACCEPTED:
        raise FailedPrecondition(
            "only an accepted long-running execution can be cancelled "
            f"(this one is {row.outcome.value})",
            reason="EXECUTION_NOT_RUNNING",
            metadata={"execution_id": row.execution_id, "outcome": row.outcome.value},
        )
    if row.cancel_requested_by:
        raise FailedPrecondition(
            f"{row.cancel_requested_by} already asked to cancel it",
            reason="CANCEL_ALREADY_REQUESTED",
            metadata={"execution_id": row.execution_id},
        )
