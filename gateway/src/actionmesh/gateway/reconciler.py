"""The reconciler: no execution ends in "we don't know".

An *unsettled* execution (TIMED_OUT, orphans closed as GATEWAY_STOPPED included, and
PARTIAL ``DOWNSTREAM_OUTCOME_UNKNOWN``; see :func:`actionmesh.gateway.model.unsettled`)
is written with ``reconcile_state`` PENDING. The gateway's ``reconcile`` loop (supervised,
on every replica) picks the due ones, takes a lease on each with a compare-and-set (one
replica asks about an execution at a time; a crashed replica's lease lapses), asks the
provider ``GetExecutionStatus`` with a deadline, and writes what it learned under the
lease:

* FINISHED: RESOLVED with the provider's answer as the resolved outcome (``late_outcome``,
  ``external_ref``, ``changes``); what the caller was told stays. Event
  EXECUTION_RECONCILED with both.
* NEVER_RECEIVED: RESOLVED as UNAVAILABLE ``PROVIDER_NEVER_RECEIVED``: nothing ran, so a
  same-key retry dispatches again (see :class:`~actionmesh.gateway.claims.Claims`).
* RUNNING, or the provider unknown or unreachable: asked again after a backoff
  (``reconcile_interval_s`` doubling up to ``reconcile_max_backoff_s``).
* UNIMPLEMENTED (the provider keeps no results), or ``reconcile_max_attempts`` /
  ``reconcile_max_age_s`` reached: NEEDS_ATTENTION, final, with an
  EXECUTION_NEEDS_ATTENTION event and the ``actionmesh.executions.reconciled`` metric.

The same loop *follows* ACCEPTED executions of long-running actions (the gateway polls
rather than providers pushing: see ``LongRunning`` in the contract), every poll
interval, without the attempts bound (their bound is their ``run_deadline``):

* RUNNING: its progress is kept (an EXECUTION_PROGRESS event when it changed); when a
  cancel was requested, the provider is told again (StopExecution is idempotent).
* FINISHED: the provider's final answer becomes the outcome (EXECUTION_FINISHED).
* NEVER_RECEIVED: the provider lost it: TIMED_OUT ``PROVIDER_LOST_EXECUTION``.
* Past ``run_deadline``: the provider is told to stop, and the execution ends TIMED_OUT
  ``MAX_DURATION_EXCEEDED``. Both TIMED_OUTs are then reconciled like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
import grpc.aio

from actionmesh.gateway.directory import ProviderDirectory, ProviderEntry
from actionmesh.gateway.dispatch import ProviderAnswer, poll_interval
from actionmesh.gateway.ledger import Ledger
from actionmesh.gateway.metrics import record_reconciled
from actionmesh.gateway.model import (
    OVERRAN_REASON,
    ExecuteCommand,
    ExecutionRecord,
    ExecutionState,
    ReconcileState,
)
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.outcomes import FINAL_PROVIDER_OUTCOMES
from actionmesh.rpc.supervisor import SupervisedLoop
from actionmesh.v1 import provider_pb2

log = logging.getLogger(__name__)

UNSUPPORTED_REASON = "RECONCILE_UNSUPPORTED"
# Who asks a provider to stop an execution past its maximum duration.
SYSTEM_ACTOR = "actionmesh"
GAVE_UP_REASON = "RECONCILE_GAVE_UP"
# How many GetExecutionStatus calls one replica has open at once.
CONCURRENT_ASKS = 8
# The shortest pause of the loop between two rounds (an execution leased elsewhere and
# due stays due until its lease lapses; this bounds how often the loop looks).
MIN_WAIT_S = 0.05


@dataclass(frozen=True)
class ReconcileSettings:
    interval_s: float
    max_backoff_s: float
    max_attempts: int
    max_age_s: float
    status_timeout_s: float
    lease_s: float
    poll_interval_s: float = 5.0
    """How often an ACCEPTED execution is asked about when its action declares nothing."""

    def backoff(self, attempts: int) -> timedelta:
        """The pause after the ``attempts``-th question without a final answer."""
        return timedelta(
            seconds=min(self.interval_s * (2 ** max(attempts - 1, 0)), self.max_backoff_s)
        )


class Reconciler:
    def __init__(
        self,
        ledger: Ledger,
        directory: ProviderDirectory,
        settings: ReconcileSettings,
        *,
        owner: str | None = None,
    ) -> None:
        self._ledger = ledger
        self._directory = directory
        self._settings = settings
        # Who holds a lease: this process (unique per start, so a restarted replica does
        # not mistake its predecessor's leases for its own).
        self.owner = owner or f"gateway-{uuid.uuid4().hex[:16]}"
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something became due sooner than the loop planned (an execution was accepted,
        a cancel was asked): look again now."""
        self._wake.set()

    async def run(self, loop: SupervisedLoop) -> None:
        """The ``reconcile`` loop: ask about what is due, then sleep until the next
        execution is due (a long-running action's poll interval may be short), at most
        ``interval_s``, or until woken."""
        clock = asyncio.get_running_loop()
        while True:
            started = clock.time()
            await self.reconcile_due()
            loop.progress()
            wait = self._settings.interval_s - (clock.time() - started)
            upcoming = await self._ledger.next_reconcile_at()
            if upcoming is not None:
                wait = min(wait, (upcoming - utcnow()).total_seconds())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, MIN_WAIT_S))

    async def reconcile_due(self, limit: int = 50) -> int:
        """Ask about every due unsettled execution (any tenant); how many were settled.

        At most ``CONCURRENT_ASKS`` questions are open at once, so one slow provider does
        not hold up the others by a whole status deadline each. A failure is raised once
        all of the batch has been tried (the loop's supervisor sees it).
        """
        rows = await self._ledger.due_reconciles(utcnow(), limit)
        gate = asyncio.Semaphore(CONCURRENT_ASKS)

        async def one(row: ExecutionRecord) -> ExecutionRecord | None:
            async with gate:
                return await self.reconcile(row)

        results = await asyncio.gather(*(one(row) for row in rows), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return sum(
            1
            for result in results
            if isinstance(result, ExecutionRecord)
            and result.reconcile_state is not ReconcileState.PENDING
        )

    async def reconcile(
        self, row: ExecutionRecord, *, timeout_s: float | None = None, right_away: bool = False
    ) -> ExecutionRecord | None:
        """One attempt on ``row`` under a lease; the execution as written, or None when
        another replica holds it, it was not due (``right_away``: due or not), or it was
        settled first. ``timeout_s`` bounds the provider call (default the setting)."""
        now = utcnow()
        if not await self._ledger.lease_reconcile(
            row,
            self.owner,
            now,
            now + timedelta(seconds=self._settings.lease_s),
            right_away=right_away,
        ):
            return None
        if row.outcome is ExecutionState.ACCEPTED:
            return await self._follow(row, timeout_s)
        try:
            moved = await self._attempt(row, timeout_s)
        except Exception:
            # The lease lapses on its own; the loop's supervisor sees what broke.
            log.exception("reconcile of execution %s failed", row.execution_id)
            raise
        written = await self._ledger.reconcile(moved, self.owner, told=row)
        if written is None:
            return None
        if written.reconcile_state is ReconcileState.RESOLVED:
            resolved = written.late_outcome.value if written.late_outcome else ""
            record_reconciled(row.provider_id, row.outcome.value, resolved)
            log.info(
                "execution %s reconciled: told %s, resolved %s %s",
                row.execution_id,
                row.outcome.value,
                resolved,
                written.resolved_reason,
            )
        elif written.reconcile_state is ReconcileState.NEEDS_ATTENTION:
            record_reconciled(row.provider_id, row.outcome.value, "NEEDS_ATTENTION")
            log.warning(
                "execution %s (%s on %s) NEEDS ATTENTION (%s): whether the provider acted "
                "is unknown and the gateway stopped asking",
                row.execution_id,
                row.action_id,
                row.provider_id,
                written.resolved_reason,
            )
        return written

    # -- long-running executions ----------------------------------------------------
    async def _follow(
        self, row: ExecutionRecord, timeout_s: float | None
    ) -> ExecutionRecord | None:
        """One question about an ACCEPTED execution, written under the lease."""
        try:
            moved = await self._follow_step(row, timeout_s)
        except Exception:
            log.exception("following execution %s failed", row.execution_id)
            raise
        written = await self._ledger.follow(moved, self.owner, told=row)
        if written is not None and written.outcome is not ExecutionState.ACCEPTED:
            log.info(
                "long-running execution %s ended %s %s",
                row.execution_id,
                written.outcome.value,
                written.reason,
            )
        return written

    async def _follow_step(self, row: ExecutionRecord, timeout_s: float | None) -> ExecutionRecord:
        now = utcnow()
        entry = self._directory.provider(row.provider_id)
        descriptor = entry.action(row.action_id) if entry is not None else None
        poll = poll_interval(descriptor, self._settings.poll_interval_s)
        asked = self._status_request(row)
        if row.run_deadline is not None and now >= row.run_deadline:
            if entry is not None:
                await self._stop(entry, asked, SYSTEM_ACTOR, OVERRAN_REASON, timeout_s)
            return row.overran(at=now)
        if entry is None:
            log.info("execution %s: its provider is not registered; asking later", row.execution_id)
            return row.progressed(next_at=self._capped(now + poll, row))
        if row.cancel_requested_by:
            await self._stop(
                entry, asked, row.cancel_requested_by, row.cancel_comment or "cancelled", timeout_s
            )
        deadline = self._settings.status_timeout_s if timeout_s is None else timeout_s
        try:
            reply = await self._directory.stub(entry).GetExecutionStatus(
                asked, timeout=max(deadline, 0.05)
            )
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "timeout"
            log.info("execution %s: GetExecutionStatus failed (%s)", row.execution_id, why)
            return row.progressed(next_at=self._capped(now + poll, row))
        if reply.state == provider_pb2.EXECUTION_STATE_FINISHED:
            answer = ProviderAnswer.of(reply.result)
            if answer is not None and answer.outcome in FINAL_PROVIDER_OUTCOMES:
                return row.completed(
                    answer.outcome,
                    at=self._finished_at(reply),
                    reason=answer.reason,
                    message=answer.message,
                    external_ref=answer.external_ref,
                    changes=answer.changes,
                    warnings=answer.warnings,
                )
            log.warning(
                "execution %s: the provider answered FINISHED with %s",
                row.execution_id,
                reply.result.outcome,
            )
        elif reply.state == provider_pb2.EXECUTION_STATE_NEVER_RECEIVED:
            return row.lost(at=now)
        progress = reply.progress if reply.HasField("progress") else None
        return row.progressed(next_at=self._capped(now + poll, row), progress=progress)

    @staticmethod
    def _capped(next_at: datetime, row: ExecutionRecord) -> datetime:
        """Not later than the run deadline, so an overrun is found when it happens."""
        return min(next_at, row.run_deadline) if row.run_deadline is not None else next_at

    async def _stop(
        self,
        entry: ProviderEntry,
        asked: provider_pb2.GetExecutionStatusRequest,
        requested_by: str,
        reason: str,
        timeout_s: float | None,
    ) -> None:
        """Ask the provider to stop the execution ``asked`` names; best effort (asked
        again next time)."""
        request = provider_pb2.StopExecutionRequest(
            tenant=asked.tenant,
            action_id=asked.action_id,
            idempotency_key=asked.idempotency_key,
            request_id=asked.request_id,
            requested_by=requested_by,
            reason=reason,
        )
        deadline = self._settings.status_timeout_s if timeout_s is None else timeout_s
        try:
            await self._directory.stub(entry).StopExecution(request, timeout=max(deadline, 0.05))
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "timeout"
            log.warning("execution %s: StopExecution failed (%s)", asked.request_id, why)

    @staticmethod
    def _status_request(row: ExecutionRecord) -> provider_pb2.GetExecutionStatusRequest:
        command = ExecuteCommand.thaw(row.request_payload)
        return provider_pb2.GetExecutionStatusRequest(
            tenant=command.record.tenant or row.tenant,
            action_id=row.action_id,
            idempotency_key=row.idempotency_key,
            request_id=row.execution_id,
        )

    @staticmethod
    def _finished_at(reply: provider_pb2.GetExecutionStatusResponse) -> datetime:
        return (
            reply.finished_at.ToDatetime(tzinfo=utcnow().tzinfo)
            if reply.HasField("finished_at")
            else utcnow()
        )

    # -- unsettled outcomes ----------------------------------------------------------
    async def _attempt(self, row: ExecutionRecord, timeout_s: float | None) -> ExecutionRecord:
        settings = self._settings
        now = utcnow()
        ended = row.finished_at or row.started_at
        if (now - ended).total_seconds() > settings.max_age_s or (
            row.reconcile_attempts + 1 > settings.max_attempts
        ):
            return row.needs_attention(reason=GAVE_UP_REASON)
        entry = self._directory.provider(row.provider_id)
        if entry is None:
            return self._later(row, "its provider is not registered")
        deadline = settings.status_timeout_s if timeout_s is None else timeout_s
        try:
            reply = await self._directory.stub(entry).GetExecutionStatus(
                self._status_request(row), timeout=max(deadline, 0.05)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return row.needs_attention(reason=UNSUPPORTED_REASON)
            return self._later(row, f"GetExecutionStatus failed: {exc.code().name}")
        except TimeoutError:
            return self._later(row, "GetExecutionStatus timed out")
        return self._apply(row, reply)

    def _apply(
        self, row: ExecutionRecord, reply: provider_pb2.GetExecutionStatusResponse
    ) -> ExecutionRecord:
        state = reply.state
        if state == provider_pb2.EXECUTION_STATE_NEVER_RECEIVED:
            return row.never_received(at=utcnow())
        if state == provider_pb2.EXECUTION_STATE_FINISHED:
            answer = ProviderAnswer.of(reply.result)
            if answer is None or answer.outcome not in FINAL_PROVIDER_OUTCOMES:
                return self._later(
                    row, f"the provider answered FINISHED with {reply.result.outcome}"
                )
            return row.reconciled(
                answer.outcome,
                at=self._finished_at(reply),
                reason=answer.reason,
                external_ref=answer.external_ref,
                changes=answer.changes,
                warnings=answer.warnings,
            )
        if state == provider_pb2.EXECUTION_STATE_RUNNING:
            return self._later(row, "still running at the provider")
        return self._later(row, f"unexpected status {state}")

    def _later(self, row: ExecutionRecord, why: str) -> ExecutionRecord:
        next_at: datetime = utcnow() + self._settings.backoff(row.reconcile_attempts + 1)
        log.info("execution %s: %s; asking again at %s", row.execution_id, why, next_at)
        return row.reconcile_later(next_at=next_at)
