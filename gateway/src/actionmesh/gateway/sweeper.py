"""The sweeper: what the gateway closes on its own, on every replica, exactly once.

Two kinds of execution end without a caller: approvals nobody decided in time
(PENDING_APPROVAL past ``approval_expires_at`` become DENIED ``APPROVAL_EXPIRED``) and
orphans, rows left RUNNING by a gateway that stopped or crashed mid-dispatch (closed as
TIMED_OUT ``GATEWAY_STOPPED``, see :class:`~actionmesh.gateway.storage.OrphanRule`), so
their EXECUTION_FINISHED event reaches the audit log even if nobody retries them.
Each close is a compare-and-set in the ledger, so replicas sweeping at once close a
row once. The gateway runs both sweeps as supervised loops.
"""

from __future__ import annotations

import logging
from datetime import datetime

from actionmesh.gateway.auth import Caller
from actionmesh.gateway.dispatch import Deadlines, Dispatcher
from actionmesh.gateway.ledger import EXPIRED, SYSTEM, Ledger
from actionmesh.gateway.metrics import record_execution
from actionmesh.gateway.model import (
    ORPHAN_OUTCOME,
    ORPHAN_REASON,
    ExecuteCommand,
    ExecutionRecord,
)
from actionmesh.rpc.convert import utcnow
from actionmesh.v1 import common_pb2

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, ledger: Ledger, dispatcher: Dispatcher, deadlines: Deadlines) -> None:
        self._ledger = ledger
        self._dispatcher = dispatcher
        self._rule = deadlines.orphan_rule

    async def expire_due(self, limit: int = 100) -> int:
        """Close every pending execution whose approval window has passed; how many."""
        now = utcnow()
        expired = 0
        for row in await self._ledger.expired_approvals(now, limit):
            if await self.expire(row, now):
                expired += 1
        return expired

    async def expire(self, row: ExecutionRecord, now: datetime) -> bool:
        """Close one pending execution as expired; False if it was decided first."""
        closed = row.expired(at=now)
        event = self._ledger.event(
            EXPIRED,
            Caller(subject=SYSTEM, tenant=row.tenant, roles=()),
            ExecuteCommand.thaw(row.request_payload),
            closed,
            outcome=common_pb2.OUTCOME_DENIED,
        )
        done = await self._ledger.decide(closed, [event])
        if done:
            log.info("approval of execution %s expired", row.execution_id)
        return done

    async def resolve_orphans(self, limit: int = 100) -> int:
        """Close every RUNNING execution (any tenant) whose gateway is gone; how many.

        Batches of ``limit`` go on while each one is full and fully closed (a backlog
        after an outage); anything else waits for the next sweep.
        """
        total = 0
        while True:
            now = utcnow()
            orphans = await self._ledger.orphaned(self._rule, now, limit)
            resolved = 0
            for row in orphans:
                if await self.resolve_orphan(row, now) is not None:
                    resolved += 1
            total += resolved
            if len(orphans) < limit or resolved < len(orphans):
                return total

    async def resolve_orphan(
        self, row: ExecutionRecord, now: datetime | None = None
    ) -> ExecutionRecord | None:
        """Close a RUNNING execution whose runner is gone, as TIMED_OUT with its event.

        None when the row is not (or no longer) an orphan, e.g. another replica closed
        it first. Never for a row this process is running.
        """
        if self._dispatcher.running(row.execution_id) is not None:
            return None
        resolved = await self._ledger.orphan(row, self._rule, now or utcnow())
        if resolved is None:
            return None
        record_execution(row.action_id, row.provider_id, ORPHAN_OUTCOME)
        log.warning(
            "execution %s (%s on %s) lost its gateway mid-dispatch; closed as %s",
            row.execution_id,
            row.action_id,
            row.provider_id,
            ORPHAN_REASON,
        )
        return resolved
