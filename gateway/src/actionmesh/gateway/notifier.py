"""Delivers the notification outbox to the subscriptions' webhooks.

A supervised loop (``notifications`` in the gateway's health): it leases the due
PENDING deliveries (a compare-and-set per row, so replicas sharing a database never
send one at the same time; a crashed replica's lease lapses), POSTs each signed
CloudEvent with a timeout, and records the attempt. A 2xx answer delivers it; anything
else (no answer, a timeout, another status) is tried again after a backoff that
doubles from ``retry_initial_s`` up to ``retry_max_s``, until ``max_attempts`` or
``max_age_s`` (then FAILED, kept in the delivery log). Nothing here runs on an
execution's path: an execution only inserts rows.

At least once: a replica that crashed after the receiver answered but before it
wrote the attempt, or a receiver that answers too late, leads to a second delivery
with the same ``webhook-id``, which the receiver deduplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

from actionmesh.client.webhooks import sign_headers
from actionmesh.gateway.auth import Caller
from actionmesh.gateway.notifications import (
    Delivery,
    DeliveryAttempt,
    NotificationRouter,
    NotificationState,
)
from actionmesh.gateway.storage import (
    GatewayStore,
    claim_notifications_op,
    notification_attempted_op,
    prune_notifications_op,
)
from actionmesh.gateway.writer import GroupCommitWriter
from actionmesh.rpc.convert import to_timestamp
from actionmesh.rpc.errors import FieldViolation, InvalidArgument, PermissionDenied
from actionmesh.rpc.supervisor import SupervisedLoop
from actionmesh.v1 import gateway_pb2

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class NotifierSettings:
    poll_interval_s: float
    timeout_s: float
    retry_initial_s: float
    retry_max_s: float
    max_attempts: int
    max_age_s: float
    lease_s: float
    retention_s: float
    batch_size: int = 50
    prune_interval_s: float = 60.0


class Notifier:
    """The delivery loop of one gateway replica."""

    def __init__(
        self,
        store: GatewayStore,
        writer: GroupCommitWriter,
        router: NotificationRouter,
        settings: NotifierSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._store = store
        self._writer = writer
        self._router = router
        self._settings = settings
        self._owner = f"notifier-{uuid.uuid4().hex[:12]}"
        self._wake = asyncio.Event()
        self._transport = transport

    def wake(self) -> None:
        """New notifications may be due: look now instead of at the next poll."""
        self._wake.set()

    async def run(self, loop: SupervisedLoop) -> None:
        async with httpx.AsyncClient(
            timeout=self._settings.timeout_s, transport=self._transport, follow_redirects=False
        ) as client:
            clock = asyncio.get_running_loop()
            pruned_at = -self._settings.prune_interval_s
            while True:
                if clock.time() - pruned_at >= self._settings.prune_interval_s:
                    await self.prune()
                    pruned_at = clock.time()
                delivered_some = await self.deliver_due(client)
                loop.progress()
                if delivered_some:
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval_s)

    async def prune(self) -> int:
        """Delete delivered and failed notifications older than the retention."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self._settings.retention_s)
        return await self._writer.write(prune_notifications_op(cutoff))

    async def deliver_due(self, client: httpx.AsyncClient) -> bool:
        """One round: lease what is due, deliver it; whether there was anything."""
        now = datetime.now(UTC)
        due = await asyncio.to_thread(self._store.due_notifications, now, self._settings.batch_size)
        if not due:
            return False
        until = now + timedelta(seconds=self._settings.lease_s)
        claimed = await self._writer.write(claim_notifications_op(due, self._owner, now, until))
        if not claimed:
            return False
        deliveries = await asyncio.to_thread(self._store.notifications_by_id, claimed)
        await asyncio.gather(*(self._deliver(client, d) for d in deliveries))
        return True

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        subscription = self._router.get(delivery.subscription_id)
        attempt_no = delivery.attempts + 1
        status_code = 0
        error = ""
        if subscription is None:
            error = f"subscription {delivery.subscription_id!r} is no longer configured"
        else:
            headers = sign_headers(subscription.secret, delivery.event_id, delivery.payload)
            try:
                response = await client.post(
                    subscription.url, content=delivery.payload, headers=headers
                )
                status_code = response.status_code
                if not response.is_success:
                    error = f"HTTP {status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS] or type(exc).__name__
        now = datetime.now(UTC)
        delivered = subscription is not None and not error
        state, next_at = self._next(delivery, attempt_no, now, delivered, gone=subscription is None)
        attempt = DeliveryAttempt(
            attempt=attempt_no, at=now, status_code=status_code, error=error, delivered=delivered
        )
        if not delivered:
            log.warning(
                "notification %s (%s) to %s failed, attempt %d: %s; %s",
                delivery.event_id,
                delivery.event_type,
                delivery.subscription_id,
                attempt_no,
                error,
                "gave up" if state is NotificationState.FAILED else f"retry at {next_at:%X}",
            )
        written = await self._writer.write(
            notification_attempted_op(delivery.id, self._owner, attempt, state, next_at)
        )
        if not written:
            log.warning("lost the lease on notification %s before recording it", delivery.id)

    def _next(
        self, delivery: Delivery, attempt_no: int, now: datetime, delivered: bool, *, gone: bool
    ) -> tuple[NotificationState, datetime]:
        if delivered:
            return NotificationState.DELIVERED, now
        settings = self._settings
        if (
            gone
            or attempt_no >= settings.max_attempts
            or now - delivery.created_at >= timedelta(seconds=settings.max_age_s)
        ):
            return NotificationState.FAILED, now
        backoff = min(settings.retry_initial_s * 2 ** (attempt_no - 1), settings.retry_max_s)
        return NotificationState.PENDING, now + timedelta(seconds=backoff)


_STATES = {
    NotificationState.PENDING: gateway_pb2.NOTIFICATION_DELIVERY_STATE_PENDING,
    NotificationState.DELIVERED: gateway_pb2.NOTIFICATION_DELIVERY_STATE_DELIVERED,
    NotificationState.FAILED: gateway_pb2.NOTIFICATION_DELIVERY_STATE_FAILED,
}


class NotificationLog:
    """The delivery log as a tenant admin reads it: their tenant only, by role."""

    def __init__(self, store: GatewayStore, roles: frozenset[str]) -> None:
        self._store = store
        self._roles = roles

    async def list(
        self, caller: Caller, request: gateway_pb2.ListNotificationDeliveriesRequest
    ) -> gateway_pb2.ListNotificationDeliveriesResponse:
        if not self._roles.intersection(caller.roles):
            raise PermissionDenied(
                "reading the notification delivery log needs one of the roles "
                + ", ".join(sorted(self._roles)),
                reason="NOTIFICATION_LOG_FORBIDDEN",
            )
        limit = min(request.page_size or 100, 500)
        before: int | None = None
        if request.page_token:
            try:
                before = int(request.page_token)
            except ValueError:
                raise InvalidArgument(
                    "invalid page token",
                    reason="INVALID_PAGE_TOKEN",
                    violations=[FieldViolation("page_token", "is not a token this service issued")],
                ) from None
        rows = await asyncio.to_thread(
            self._store.notification_log,
            caller.tenant,
            failed_only=request.failed_only,
            subscription_id=request.subscription_id,
            before_id=before,
            limit=limit + 1,
        )
        page, more = rows[:limit], len(rows) > limit
        return gateway_pb2.ListNotificationDeliveriesResponse(
            deliveries=[_delivery_proto(d, attempts) for d, attempts in page],
            next_page_token=str(page[-1][0].id) if more and page else "",
        )


def _delivery_proto(
    delivery: Delivery, attempts: list[DeliveryAttempt]
) -> gateway_pb2.NotificationDelivery:
    reply = gateway_pb2.NotificationDelivery(
        subscription_id=delivery.subscription_id,
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        execution_id=delivery.execution_id,
        state=_STATES[delivery.state],
        attempts=delivery.attempts,
        created_at=to_timestamp(delivery.created_at),
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        attempt_log=[
            gateway_pb2.NotificationAttempt(
                attempt=a.attempt,
                at=to_timestamp(a.at),
                status_code=a.status_code,
                error=a.error,
                delivered=a.delivered,
            )
            for a in attempts
        ],
    )
    if delivery.state is NotificationState.PENDING:
        reply.next_attempt_at.CopyFrom(to_timestamp(delivery.next_attempt_at))
    if delivery.delivered_at is not None:
        reply.delivered_at.CopyFrom(to_timestamp(delivery.delivered_at))
    return reply
