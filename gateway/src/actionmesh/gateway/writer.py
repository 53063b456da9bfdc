"""One writer for the gateway store, committing what has queued up together.

Every execution writes at least twice (claim, finish) and the outbox deletes what
the audit log acknowledged. Run from many threads, these small transactions queue
on the database's write lock (SQLite has one per file) and each pays a commit.
Here one task hands the store whatever has queued since the last commit, and the
store writes it in one transaction (group commit): one writer, no lock contention
inside the process, and fewer commits the busier the gateway is. A lone call
waits for nobody: the group is whatever is already there when the writer is free.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from actionmesh.gateway.storage import GatewayStore, WriteOp
from actionmesh.rpc.supervisor import SupervisedLoop, Supervisor

T = TypeVar("T")

# Bounds one transaction, so a burst becomes several commits instead of one huge one.
MAX_GROUP = 256


class WriterClosed(RuntimeError):
    """The gateway is stopping; the write was not attempted."""


class GroupCommitWriter:
    """Queues write operations and runs them in groups, one transaction per group."""

    def __init__(self, store: GatewayStore, *, max_group: int = MAX_GROUP) -> None:
        self._store = store
        self._max_group = max_group
        # None is the stop mark: everything queued before it is written first.
        self._queue: asyncio.Queue[tuple[WriteOp[Any], asyncio.Future[Any]] | None] = (
            asyncio.Queue()
        )
        self._loop: SupervisedLoop | None = None
        self._closed = False

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Start writing, as a loop of ``supervisor`` (a private one by default)."""
        supervisor = supervisor or Supervisor("gateway store writer")
        self._loop = supervisor.spawn("gateway-store-writer", self._run)

    async def write(self, op: WriteOp[T]) -> T:
        """Run ``op`` in the next group; its result, or the exception it raised.

        The write goes ahead even if the caller is cancelled meanwhile, as it
        would in a thread: the caller just stops waiting for it.
        """
        if self._closed or self._loop is None:
            raise WriterClosed("the gateway store writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, future))
        return await future

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop (later writes raise WriterClosed)."""
        self._closed = True
        loop, self._loop = self._loop, None
        if loop is None:
            return
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(loop.join(), timeout_s)
        except TimeoutError:
            pass
        await loop.stop()

    async def _run(self, loop: SupervisedLoop) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < self._max_group and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                group.append(item)
            try:
                results = await asyncio.to_thread(self._store.write_group, [op for op, _ in group])
            except BaseException as exc:
                # write_group hands each operation its own error; only a cancelled
                # writer (shutdown) or a broken thread pool gets here. The callers get
                # the error; the supervisor restarts this loop (unless it was stopping).
                for _, future in group:
                    if not future.done():
                        future.set_exception(
                            exc if isinstance(exc, Exception) else WriterClosed(str(exc))
                        )
                if stopping:
                    return
                raise
            loop.progress()
            for (_, future), result in zip(group, results, strict=True):
                if future.done():  # the caller was cancelled and stopped waiting
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
