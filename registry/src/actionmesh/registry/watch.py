"""Fan-out of provider changes to watchers, with bounded memory per watcher.

Every watcher owns a bounded queue. Publishing never waits: a watcher whose
queue is full has fallen too far behind, so it is dropped and its stream ends
with an error telling it to watch again (and get a fresh snapshot) instead of
the registry buffering without limit.
"""

from __future__ import annotations

import asyncio
import logging

from actionmesh.registry.model import Change
from actionmesh.rpc.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 1024


class Subscription:
    """The changes one watcher has not consumed yet; iterate it to receive them."""

    def __init__(self, queue_size: int) -> None:
        # None only wakes a consumer blocked on an empty queue; the flags say why.
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue(maxsize=queue_size)
        self._overflowed = False
        self._closed = False

    def offer(self, change: Change) -> bool:
        """Queue ``change``; False when the watcher has fallen too far behind."""
        try:
            self._queue.put_nowait(change)
        except asyncio.QueueFull:
            self._overflowed = True
            return False
        return True

    def close(self) -> None:
        self._closed = True
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            pass  # a full queue means the consumer is not blocked; it sees the flag next

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Change:
        while True:
            if self._overflowed:
                raise ResourceExhausted(
                    "watcher fell too far behind; watch again for a fresh snapshot",
                    reason="WATCHER_TOO_SLOW",
                )
            if self._closed:
                raise StopAsyncIteration
            item = await self._queue.get()
            if item is not None:
                return item


class ChangeHub:
    """Delivers every published change to every current subscription."""

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be positive")
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def subscribe(self) -> Subscription:
        if self._closed:
            raise Unavailable(
                "registry is shutting down", reason="REGISTRY_STOPPING", retry_after_s=1.0
            )
        subscription = Subscription(self._queue_size)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def publish(self, change: Change) -> None:
        for subscription in list(self._subscriptions):
            if not subscription.offer(change):
                self._subscriptions.discard(subscription)
                log.warning("dropped a watcher that fell %d changes behind", self._queue_size)

    def close(self) -> None:
        """End every watch stream cleanly and refuse new ones."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
