"""Dispatch: the one Execute call to a provider, its deadline, and its late answer.

A dispatched execution runs in a task this module owns: the caller gets TIMED_OUT at
the action's deadline, or goes away, but the dispatcher keeps listening for the
provider's answer (for ``late_result_grace_s``) and records it when it comes. Failed
calls become outcomes here (:func:`answer_for_error`), with the gRPC-status table
shared with the SDK (:func:`actionmesh.rpc.outcomes.outcome_for_status`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, TypeVar

import grpc
import grpc.aio
from opentelemetry import trace

from actionmesh.gateway.admission import Slot
from actionmesh.gateway.auth import Caller
from actionmesh.gateway.directory import ProviderDirectory, ProviderEntry
from actionmesh.gateway.ledger import Ledger
from actionmesh.gateway.metrics import record_execution
from actionmesh.gateway.model import Change, ExecuteCommand, ExecutionRecord, ExecutionState
from actionmesh.gateway.storage import OrphanRule
from actionmesh.rpc.convert import utcnow
from actionmesh.rpc.errors import error_details
from actionmesh.rpc.outcomes import (
    LONG_RUNNING_OUTCOMES,
    PROVIDER_OUTCOMES,
    Outcome,
    outcome_for_status,
)
from actionmesh.v1 import common_pb2, provider_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")
T = TypeVar("T")
# How long past its dispatch deadline a RUNNING row waits for its runner's finish write
# before any replica may close it as orphaned (a live runner writes at the deadline).
ORPHAN_MARGIN_S = 5.0


@dataclass(frozen=True)
class Deadlines:
    """How long a dispatch may take, and when a RUNNING row has lost its runner."""

    default_timeout_s: float
    """An action's deadline when its descriptor sets none."""
    max_timeout_s: float
    """The longest deadline any action gets, whatever its descriptor says."""
    late_result_grace_s: float
    """How long after TIMED_OUT a provider's answer is still awaited (0: not at all)."""
    poll_interval_s: float = 5.0
    """How often an ACCEPTED execution's provider is asked how it goes, when its action
    declares no poll interval."""
    max_run_s: float = 7 * 86400.0
    """The longest any long-running action may run, whatever its descriptor says."""

    def poll_interval_for(self, descriptor: common_pb2.ActionDescriptor) -> timedelta:
        return poll_interval(descriptor, self.poll_interval_s)

    def run_deadline(self, descriptor: common_pb2.ActionDescriptor, start: datetime) -> datetime:
        """When a long-running action dispatched at ``start`` must have finished."""
        declared = descriptor.long_running.max_duration_s or self.max_run_s
        return start + timedelta(seconds=min(declared, self.max_run_s))

    def timeout_for(self, descriptor: common_pb2.ActionDescriptor) -> float:
        return min((descriptor.timeout_ms / 1000.0) or self.default_timeout_s, self.max_timeout_s)

    def dispatch_deadline(
        self, descriptor: common_pb2.ActionDescriptor, start: datetime
    ) -> datetime:
        """When a dispatch starting at ``start`` has written its outcome, at the latest.

        The caller's answer (TIMED_OUT at worst) is due ``timeout_for`` after dispatch;
        the late-result grace only adds to a row that already left RUNNING.
        """
        return start + timedelta(seconds=self.timeout_for(descriptor))

    @cached_property
    def orphan_rule(self) -> OrphanRule:
        return OrphanRule(
            margin=timedelta(seconds=ORPHAN_MARGIN_S),
            # Rows without a deadline (before migration 0002): the longest run there can be.
            legacy_running=timedelta(seconds=self.max_timeout_s + self.late_result_grace_s),
        )


def poll_interval(descriptor: common_pb2.ActionDescriptor | None, default_s: float) -> timedelta:
    """How often an ACCEPTED execution of ``descriptor``'s action is asked how it goes:
    what the action declares, else ``default_s`` (also for an action no longer known)."""
    declared = descriptor.long_running.poll_interval_ms / 1000.0 if descriptor else 0.0
    return timedelta(seconds=declared or default_s)


@dataclass(frozen=True)
class ProviderAnswer:
    """What became of one Execute call, in the mesh's outcome vocabulary."""

    outcome: Outcome
    reason: str = ""
    message: str = ""
    external_ref: str = ""
    changes: Sequence[Change] = ()
    warnings: Sequence[str] = ()

    @classmethod
    def of(cls, reply: provider_pb2.ExecuteResponse) -> ProviderAnswer | None:
        """A provider's answer (Execute's, or a finished status's result) in the mesh's
        terms; None when it names no outcome."""
        outcome = Outcome.from_proto(reply.outcome)
        if outcome is None:
            return None
        return cls(
            outcome=outcome,
            reason=reply.reason,
            message=reply.message,
            external_ref=reply.external_ref,
            changes=[(c.field, c.before, c.after) for c in reply.changes],
            warnings=list(reply.warnings),
        )

    def applied_to(self, record: ExecutionRecord, settle_after_s: float = 0.0) -> ExecutionRecord:
        """``record`` finished with this answer; an unsettled outcome is reconciled from
        ``settle_after_s`` on (while this gateway may still hear a late answer)."""
        now = utcnow()
        return record.finished_with(
            self.outcome,
            at=now,
            reconcile_from=now + timedelta(seconds=settle_after_s),
            reason=self.reason,
            message=self.message,
            external_ref=self.external_ref,
            changes=self.changes,
            warnings=self.warnings,
        )

    def late_on(self, record: ExecutionRecord) -> ExecutionRecord:
        return record.with_late_result(
            self.outcome,
            at=utcnow(),
            external_ref=self.external_ref,
            changes=self.changes,
            warnings=self.warnings,
        )


@dataclass(frozen=True)
class Dispatch:
    """One dispatch to make: who asked for what, and the provider's action that does it."""

    caller: Caller
    command: ExecuteCommand
    entry: ProviderEntry
    descriptor: common_pb2.ActionDescriptor


class Dispatcher:
    """Owns every dispatch this process runs, and the tasks that wait for late answers."""

    def __init__(self, directory: ProviderDirectory, ledger: Ledger, deadlines: Deadlines) -> None:
        self._directory = directory
        self._ledger = ledger
        self._deadlines = deadlines
        self._tasks: set[asyncio.Task[Any]] = set()
        # Executions this process is running, so same-key waiters here need not poll.
        self._running: dict[str, asyncio.Task[ExecutionRecord]] = {}
        # Called when a provider accepted a long-running action (the reconciler follows
        # it from its first poll on; see GatewayCore).
        self.on_accepted: Callable[[], None] = lambda: None

    def running(self, execution_id: str) -> asyncio.Task[ExecutionRecord] | None:
        """The task dispatching ``execution_id`` in this process, if any."""
        return self._running.get(execution_id)

    async def run(
        self, dispatch: Dispatch, record: ExecutionRecord, slot: Slot | None = None
    ) -> ExecutionRecord:
        """Dispatch a RUNNING execution and record its outcome, even if the caller leaves.

        The admission ``slot`` is held until the dispatch ends, not until the caller does.
        """
        task = self.spawn(self._dispatch_and_finish(dispatch, record, slot))
        self._running[record.execution_id] = task
        task.add_done_callback(lambda _: self._running.pop(record.execution_id, None))
        if slot is not None:
            slot.handed_over = True
            task.add_done_callback(lambda _: slot.release())
        return await asyncio.shield(task)

    async def _dispatch_and_finish(
        self, dispatch: Dispatch, record: ExecutionRecord, slot: Slot | None
    ) -> ExecutionRecord:
        caller, command, entry = dispatch.caller, dispatch.command, dispatch.entry
        # Measured from dispatch, so an approval's wait does not count as latency.
        started = time.monotonic()
        with tracer.start_as_current_span(
            "execute.dispatch",
            attributes={
                "actionmesh.action_id": command.action_id,
                "actionmesh.provider_id": entry.provider_id,
                "actionmesh.tenant": caller.tenant,
                "actionmesh.execution_id": record.execution_id,
                "actionmesh.record.type": command.record.type,
            },
        ):
            record = await self._dispatch_then_finish(dispatch, record, slot)
        record_execution(
            record.action_id, record.provider_id, record.outcome, time.monotonic() - started
        )
        return record

    async def _dispatch_then_finish(
        self, dispatch: Dispatch, record: ExecutionRecord, slot: Slot | None
    ) -> ExecutionRecord:
        caller, command, entry = dispatch.caller, dispatch.command, dispatch.entry
        timeout_s = self._deadlines.timeout_for(dispatch.descriptor)
        grace_s = self._deadlines.late_result_grace_s
        dispatched_at = utcnow()
        request = provider_pb2.ExecuteRequest(
            action_id=command.action_id,
            record=command.record,
            operator=caller.operator(),
            inputs=dict(command.inputs),
            idempotency_key=command.idempotency_key,
            request_id=record.execution_id,
            # Approved on a preview: the provider refuses if the state moved since.
            preview_digest="" if record.preview is None else record.preview.state_digest,
        )
        long_running = dispatch.descriptor.HasField("long_running")
        if grace_s <= 0:
            answer = await self._call_provider(entry, request, timeout_s, long_running)
            return await self._finish(dispatch, record, answer, dispatched_at)
        # The provider may keep working past the deadline the caller is given;
        # its gRPC deadline covers the grace window so a late answer can arrive.
        call = asyncio.ensure_future(
            self._call_provider(entry, request, timeout_s + grace_s, long_running)
        )
        try:
            answer = await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except TimeoutError:
            answer = TIMED_OUT_ANSWER
            if slot is not None:
                slot.outlive(call)
            finished = await self._finish(dispatch, record, answer, dispatched_at)
            self.spawn(self._record_late(dispatch, finished, call))
            return finished
        return await self._finish(dispatch, record, answer, dispatched_at)

    async def _call_provider(
        self,
        entry: ProviderEntry,
        request: provider_pb2.ExecuteRequest,
        timeout_s: float,
        long_running: bool = False,
    ) -> ProviderAnswer:
        try:
            reply = await self._directory.stub(entry).Execute(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return answer_for_error(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this dispatch itself is being cancelled (the gateway is stopping)
            # grpc cancels the calls on a channel that closes under them: the request
            # was sent, so the provider may have acted.
            return CONNECTION_LOST_ANSWER
        answer = ProviderAnswer.of(reply)
        if answer is None or answer.outcome not in (
            LONG_RUNNING_OUTCOMES if long_running else PROVIDER_OUTCOMES
        ):
            return ProviderAnswer(
                Outcome.PARTIAL,
                reason="PROVIDER_PROTOCOL_ERROR",
                message="the provider answered with an outcome it may not report; check its state",
            )
        return answer

    async def _finish(
        self,
        dispatch: Dispatch,
        record: ExecutionRecord,
        answer: ProviderAnswer,
        dispatched_at: datetime,
    ) -> ExecutionRecord:
        if answer.outcome is Outcome.ACCEPTED:
            # A long-running action at work: followed by the reconciler from now on.
            now = utcnow()
            ended = record.accepted(
                at=now,
                poll_at=now + self._deadlines.poll_interval_for(dispatch.descriptor),
                run_deadline=self._deadlines.run_deadline(dispatch.descriptor, dispatched_at),
                message=answer.message,
                external_ref=answer.external_ref,
            )
        else:
            # Only a deadline this dispatcher keeps listening past waits for its late
            # answer before the reconciler asks; any other unsettled outcome is asked
            # about at once.
            settle_after_s = (
                self._deadlines.late_result_grace_s if answer is TIMED_OUT_ANSWER else 0.0
            )
            ended = answer.applied_to(record, settle_after_s)
        finished = await self._ledger.finish(dispatch.caller, dispatch.command, ended)
        if finished is not None and finished.outcome is ExecutionState.ACCEPTED:
            self.on_accepted()
        if finished is None:
            return await self._finished_as_orphan(dispatch, record, answer)
        trace.get_current_span().set_attribute("actionmesh.outcome", finished.outcome.value)
        return finished

    async def _finished_as_orphan(
        self, dispatch: Dispatch, record: ExecutionRecord, answer: ProviderAnswer
    ) -> ExecutionRecord:
        """This runner finished so late that a replica closed its row as orphaned.

        That outcome stands (callers may have seen it); a provider answer is kept on it
        as a late result, so what the provider did is not lost.
        """
        log.warning(
            "execution %s finished after it was closed as orphaned; keeping %s as a late result",
            record.execution_id,
            answer.outcome,
        )
        stored = await self._ledger.get(record.tenant, record.execution_id)
        if stored is None:
            return record
        if answer.outcome in PROVIDER_OUTCOMES:
            late = await self._attach_late(dispatch, stored, answer)
            return late or stored
        return stored

    async def _record_late(
        self, dispatch: Dispatch, record: ExecutionRecord, call: asyncio.Future[ProviderAnswer]
    ) -> None:
        """Attach the provider's answer to a TIMED_OUT execution once it arrives."""
        await self._attach_late(dispatch, record, await call)

    async def _attach_late(
        self, dispatch: Dispatch, record: ExecutionRecord, answer: ProviderAnswer
    ) -> ExecutionRecord | None:
        """Keep a provider's answer on an execution already closed as TIMED_OUT."""
        if answer.outcome not in PROVIDER_OUTCOMES:
            log.warning(
                "execution %s: no late answer from %s (%s); its outcome stays unknown",
                record.execution_id,
                record.provider_id,
                answer.reason,
            )
            return None
        if record.outcome is not ExecutionState.TIMED_OUT or record.late_outcome is not None:
            return None
        late = await self._ledger.late_result(
            dispatch.caller,
            dispatch.command,
            answer.late_on(record),
            reason=answer.reason,
            message=answer.message or "the provider answered after the deadline",
        )
        if late is not None:
            log.info("execution %s: late result %s recorded", record.execution_id, answer.outcome)
        return late

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run work the caller must not be able to cancel; kept until it ends."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background execution work failed", exc_info=task.exception())

    async def close(self, grace_s: float = 5.0) -> None:
        """Let executions (and late answers) finish for a while, then cancel the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)


CONNECTION_LOST_ANSWER = ProviderAnswer(
    Outcome.TIMED_OUT,
    reason="PROVIDER_CONNECTION_LOST",
    message=(
        "the connection to the provider broke while it was working on the request; it may or "
        "may not have acted. Retry only with the same idempotency key"
    ),
)
TIMED_OUT_ANSWER = ProviderAnswer(
    Outcome.TIMED_OUT,
    reason="DEADLINE_EXCEEDED",
    message=(
        "the provider did not answer in time; it may or may not have acted. Retry only with the "
        "same idempotency key; a late answer is recorded on the execution"
    ),
)


def answer_for_error(exc: grpc.aio.AioRpcError) -> ProviderAnswer:
    """Map a failed provider call onto the outcome vocabulary."""
    code = exc.code()
    details = error_details(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        if details.reason:
            # The provider answered: its own downstream is down (nothing ran).
            return ProviderAnswer(
                Outcome.UNAVAILABLE, reason=details.reason, message=details.message
            )
        if never_connected(exc):
            return ProviderAnswer(
                Outcome.UNAVAILABLE,
                reason="PROVIDER_UNAVAILABLE",
                message="the provider could not be reached; nothing ran",
            )
        # The connection broke after the request went out (the provider died or was cut
        # off mid-call): it may have acted, so this is not the retry-safe "nothing ran".
        return CONNECTION_LOST_ANSWER
    outcome = outcome_for_status(code)
    if outcome is Outcome.TIMED_OUT:
        return ProviderAnswer(
            outcome,
            reason="DEADLINE_EXCEEDED",
            message="the provider did not answer in time; it may or may not have acted",
        )
    if outcome is Outcome.REJECTED:
        return ProviderAnswer(outcome, reason=details.reason or code.name, message=details.message)
    return ProviderAnswer(
        Outcome.PARTIAL,
        reason="PROVIDER_ERROR",
        message="the provider failed while executing; its state is unknown, check before retrying",
    )


# How grpc words a call that failed before any connection carried it (C-core status
# messages; "failed to connect to all addresses" is the pick-first/round-robin text).
_NEVER_CONNECTED = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "no route to host",
    "name resolution",
    "dns resolution failed",
    "channel is in state transient_failure",
)


def never_connected(exc: grpc.aio.AioRpcError) -> bool:
    """Whether an UNAVAILABLE call never reached a provider (so nothing can have run)."""
    text = f"{exc.details() or ''} {exc.debug_error_string() or ''}".lower()
    return any(marker in text for marker in _NEVER_CONNECTED)
