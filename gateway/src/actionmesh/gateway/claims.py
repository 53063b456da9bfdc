"""Idempotency claims: one execution per (tenant, idempotency key), across replicas.

The claim is the execution row itself, inserted with its first audit event before
anything is dispatched. A second request with the same key gets the first one's
execution: its result when finished, a wait while it runs (here or on another replica),
a fresh dispatch when the first attempt ended UNAVAILABLE (nothing ran), and
IDEMPOTENCY_KEY_REUSED when the key stood for a different request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import timedelta

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.authorization import Authorized
from actionmesh.gateway.dispatch import Deadlines, Dispatcher
from actionmesh.gateway.ledger import Ledger
from actionmesh.gateway.model import (
    ExecuteCommand,
    ExecutionRecord,
    ExecutionState,
    ReconcileState,
)
from actionmesh.gateway.reconciler import Reconciler
from actionmesh.gateway.storage import KeyConflict
from actionmesh.gateway.sweeper import Sweeper
from actionmesh.rpc.convert import input_value_to_python, utcnow
from actionmesh.rpc.errors import AlreadyExists, FailedPrecondition
from actionmesh.rpc.telemetry import current_trace_ids
from actionmesh.v1 import common_pb2

# Longest pause between looks at an execution another request (or replica) runs.
MAX_WAIT_POLL_S = 0.25


class Claims:
    def __init__(
        self,
        ledger: Ledger,
        dispatcher: Dispatcher,
        sweeper: Sweeper,
        deadlines: Deadlines,
        *,
        approval_ttl_s: float,
        reconciler: Reconciler | None = None,
    ) -> None:
        self._ledger = ledger
        self._dispatcher = dispatcher
        self._sweeper = sweeper
        self._deadlines = deadlines
        self._approval_ttl_s = approval_ttl_s
        self._reconciler = reconciler

    async def claim(
        self,
        caller: Caller,
        command: ExecuteCommand,
        execution_id: str,
        authorized: Authorized,
        *,
        preview: common_pb2.ActionPreview | None = None,
    ) -> ExecutionRecord:
        """Create the execution row, or return the one this idempotency key already made.

        A RUNNING record is the caller's to dispatch; anything else is final (or held
        for approval).
        """
        trace_id, _ = current_trace_ids()
        now = utcnow()
        record = ExecutionRecord(
            execution_id=execution_id,
            tenant=caller.tenant,
            idempotency_key=command.idempotency_key,
            request_hash=request_hash(caller, command),
            action_id=command.action_id,
            provider_id=authorized.entry.provider_id,
            record_type=command.record.type,
            record_id=command.record.id,
            actor=caller.subject,
            outcome=ExecutionState.RUNNING,
            started_at=now,
            trace_id=trace_id,
            request_payload=command.frozen(),
            requester_roles=tuple(caller.roles),
            sensitive=command.sensitive,
            dispatch_deadline=self._deadlines.dispatch_deadline(authorized.descriptor, now),
            facts=authorized.facts,
        )
        if authorized.descriptor.requires_approval:
            record = record.awaiting_approval(
                expires_at=now + timedelta(seconds=self._approval_ttl_s),
                quorum=authorized.quorum,
                preview=preview,
            )
        try:
            await self._ledger.open(caller, command, record, authorized)
        except KeyConflict as conflict:
            return await self._existing(
                record,
                conflict.existing,
                command,
                self._deadlines.timeout_for(authorized.descriptor),
            )
        return record

    async def _existing(
        self,
        mine: ExecutionRecord,
        existing: ExecutionRecord,
        command: ExecuteCommand,
        timeout_s: float,
    ) -> ExecutionRecord:
        if existing.request_hash != mine.request_hash:
            raise AlreadyExists(
                "this idempotency key was used for a different request",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"execution_id": existing.execution_id},
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deadlines.max_timeout_s
        pause = 0.02
        rule = self._deadlines.orphan_rule
        # Elsewhere (or in a process that died), a RUNNING row ends by its dispatch deadline,
        # or is an orphan this request closes; the caller's own deadline cancels us earlier.
        while not existing.finished:
            local = self._dispatcher.running(existing.execution_id)
            if local is not None:
                if loop.time() >= deadline:
                    break
                # Run here: wait for it instead of polling (bounded). asyncio.wait neither
                # raises the task's error nor cancels it, and our own cancellation still works.
                await asyncio.wait({local}, timeout=max(0.0, deadline - loop.time()))
            else:
                left = (rule.orphaned_at(existing) - utcnow()).total_seconds()
                if left <= 0:
                    resolved = await self._sweeper.resolve_orphan(existing)
                    if resolved is not None:
                        existing = resolved
                        break
                await asyncio.sleep(min(pause, left) if left > 0 else pause)
                pause = min(pause * 2, MAX_WAIT_POLL_S)
            fresh = await self._ledger.find_by_key(existing.tenant, command.idempotency_key)
            existing = fresh or existing
        if existing.reconcile_state is ReconcileState.PENDING and self._reconciler is not None:
            # Unsettled: ask the provider now rather than repeat "we don't know" (bounded
            # by the status deadline; the caller's own deadline cancels us earlier).
            settled = await self._reconciler.reconcile(existing, right_away=True)
            fresh = await self._ledger.find_by_key(existing.tenant, command.idempotency_key)
            existing = fresh or settled or existing
        if existing.nothing_ran:
            # Nothing ran the first time, so the same key may dispatch again.
            redispatch_by = utcnow() + timedelta(seconds=timeout_s)
            reclaimed = await self._ledger.reclaim(existing, redispatch_by)
            if reclaimed is not None:
                return reclaimed
        if not existing.finished:
            raise FailedPrecondition(
                "an execution with this idempotency key is still running",
                reason="EXECUTION_IN_PROGRESS",
                metadata={"execution_id": existing.execution_id},
            )
        return existing


def request_hash(caller: Caller, command: ExecuteCommand) -> str:
    """Fingerprint of what an idempotency key stands for."""
    record = command.record
    canonical = {
        "action": command.action_id,
        "actor": caller.subject,
        "record": [record.tenant, record.type, record.id],
        "inputs": {k: input_value_to_python(v) for k, v in sorted(command.inputs.items())},
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
