"""Cancelling a long-running execution: a governed step, audited, the provider told.

Only an ACCEPTED execution of an action that declares itself cancellable can be
cancelled. Policy decides who may (Cedar action ``cancel``, on the record's facts as
its source gives them now; the default lets operators and supervisors), and every
attempt is evidence: an EXECUTION_CANCEL_REQUESTED event, with reason POLICY_DENIED when
refused. The request is stored first (a compare-and-set, so two cancels count once),
then the provider is asked to stop right away through the reconciler, which asks again
at every question until the provider reports how the execution ended (CANCELLED, or
what it reached before it could stop). The caller is answered with the execution as it
stands then: usually still ACCEPTED, its cancel recorded.
"""

from __future__ import annotations

from actionmesh.gateway.approvals import check_comment
from actionmesh.gateway.auth import Caller
from actionmesh.gateway.authorization import Authorizer
from actionmesh.gateway.directory import ProviderDirectory
from actionmesh.gateway.facts import FactResolver
from actionmesh.gateway.ledger import CANCEL_REQUESTED, Ledger
from actionmesh.gateway.model import ExecuteCommand, ExecutionRecord, ExecutionState
from actionmesh.gateway.reconciler import Reconciler
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import FailedPrecondition, NotFound, PermissionDenied, Unavailable


class Cancels:
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
        try:
            verified = await self._facts.resolve(caller, command.record, fresh=True)
        except (NotFound, Unavailable):
            # Cancelling stops work: a source that is away does not block it.
            verified = self._facts.unverified(command.record)
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
        # Tell the provider now (another replica may hold the lease: it tells it then).
        followed = await self._reconciler.reconcile(written, right_away=True)
        return followed or written


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
