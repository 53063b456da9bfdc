"""Ships the audit outbox to AuditService.AppendEvents.

At-least-once: rows are deleted only after the audit log acknowledged them, and
the audit log dedupes on event id. Failures back off exponentially (capped). A
write to the outbox wakes the shipper, which lingers a few milliseconds first so
that one read, one AppendEvents and one delete carry the events of many calls
(each execution writes two) instead of one each: the timeline lags by the linger
plus one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import AbstractContextManager

import grpc
import grpc.aio
from opentelemetry import context, trace

from actionmesh.gateway.storage import GatewayStore, delete_events_op, park_event_op
from actionmesh.gateway.writer import GroupCommitWriter
from actionmesh.rpc.supervisor import SupervisedLoop, Supervisor
from actionmesh.rpc.telemetry import link_to
from actionmesh.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer("actionmesh.gateway")


class OutboxShipper:
    def __init__(
        self,
        store: GatewayStore,
        writer: GroupCommitWriter,
        audit_channel: grpc.aio.Channel,
        *,
        batch_size: int,
        retry_max_s: float,
        linger_s: float = 0.01,
    ) -> None:
        self._store = store
        self._writer = writer
        self._linger_s = linger_s
        self._stub = audit_pb2_grpc.AuditServiceStub(audit_channel)
        self._batch_size = batch_size
        self._retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self._loop: SupervisedLoop | None = None

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Ship, as a loop of ``supervisor`` (a private one by default): an audit log
        that is down is retried here with backoff; any other failure (the store, say)
        ends the run and the supervisor starts it again, so no event is left behind."""
        supervisor = supervisor or Supervisor("audit outbox")
        self._loop = supervisor.spawn("audit-outbox", self._run)

    def notify(self) -> None:
        self._wake.set()

    async def close(self, drain_timeout_s: float = 2.0) -> None:
        """Try to ship what is left (bounded), then stop; the rest stays in the outbox.

        The channel belongs to the caller, who closes it after this returns.
        """
        loop, self._loop = self._loop, None
        if loop is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain(), drain_timeout_s)
            await loop.stop()

    async def _drain(self) -> None:
        try:
            while await asyncio.to_thread(self._store.outbox_depth):
                self.notify()
                await asyncio.sleep(0.05)
        except Exception:
            # The store is gone too: what is left stays in the outbox for the next start.
            log.exception("could not drain the audit outbox at shutdown")

    async def _run(self, loop: SupervisedLoop) -> None:
        stub = self._stub
        backoff = 0.1
        while True:
            batch = await asyncio.to_thread(self._store.pending_events, self._batch_size)
            loop.progress()
            if not batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                if self._wake.is_set() and self._linger_s > 0:
                    await asyncio.sleep(self._linger_s)
                continue
            events = [audit_pb2.AuditEvent.FromString(payload) for _, payload in batch]
            try:
                with ship_span(events):
                    await stub.AppendEvents(
                        audit_pb2.AppendEventsRequest(events=events), timeout=5.0
                    )
            except grpc.aio.AioRpcError as exc:
                # One bad event, or a batch over the audit log's message size: find out
                # event by event instead of retrying the same batch forever.
                if exc.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ):
                    await self._ship_one_by_one(stub, batch)
                    continue
                log.warning(
                    "audit delivery failed (%s); %d events kept, retry in %.1fs",
                    exc.code().name,
                    len(batch),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry_max_s)
                continue
            backoff = 0.1
            await self._writer.write(delete_events_op([row_id for row_id, _ in batch]))
            if len(batch) < self._batch_size and self._linger_s > 0:
                # Caught up: let the next events gather instead of shipping them one by one.
                await asyncio.sleep(self._linger_s)

    async def _ship_one_by_one(
        self, stub: audit_pb2_grpc.AuditServiceStub, batch: list[tuple[int, bytes]]
    ) -> None:
        """Isolate the event(s) the audit log refuses so the rest still get through."""
        for row_id, payload in batch:
            event = audit_pb2.AuditEvent.FromString(payload)
            try:
                with ship_span([event]):
                    await stub.AppendEvents(
                        audit_pb2.AppendEventsRequest(events=[event]), timeout=5.0
                    )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    return  # a transient failure: the main loop retries with backoff
                log.error("audit log refused event %s: %s; parked", event.event_id, exc.details())
                await self._writer.write(park_event_op(row_id, exc.details() or ""))
                continue
            await self._writer.write(delete_events_op([row_id]))


def ship_span(events: list[audit_pb2.AuditEvent]) -> AbstractContextManager[trace.Span]:
    """The span of one delivery: a trace of its own (batches mix executions), linked to
    the span each event was written in, so an execution's trace leads to its delivery."""
    links = {}
    for event in events:
        link = link_to(event.trace_id, event.span_id)
        if link is not None:
            links[(event.trace_id, event.span_id)] = link
    return tracer.start_as_current_span(
        "audit.ship",
        context=context.Context(),
        kind=trace.SpanKind.PRODUCER,
        links=list(links.values()),
        attributes={"actionmesh.audit.batch_size": len(events)},
    )
