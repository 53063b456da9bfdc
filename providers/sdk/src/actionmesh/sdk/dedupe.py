"""Idempotency: the same (tenant, action, idempotency key) never acts twice.

The SDK claims a key before running a handler and stores the handler's result
under it. A repeated key returns the stored result without running the handler;
a concurrent duplicate in the same process waits on a per-key lock and then
gets the stored result; a duplicate in another process sharing the store sees
the claim and is told to retry (UNAVAILABLE, nothing ran). If the handler raises,
the claim is released so a retry can run it again (handlers re-check their own
state). A claim left behind by a crashed process is taken over once it is older
than ``stale_claim_s``.

``lookup`` reads what a store holds for a key without changing anything: what the
SDK answers GetExecutionStatus from (see :class:`KeyStatus`).

``Provider(..., dedupe=True)`` uses :class:`SqliteIdempotencyStore` on the
provider's own SQLite file (``ProviderConfig.database_url_for``), or, when that URL
names another database, :class:`~actionmesh.sdk.sqlstore.SqlIdempotencyStore`
(the ``sql`` extra); a provider can pass any :class:`IdempotencyStore` instead.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from actionmesh.rpc.config import sqlite_path


@dataclass(frozen=True)
class IdempotencyKey:
    tenant: str
    action_id: str
    key: str


@dataclass(frozen=True)
class Claim:
    """The answer to a claim.

    ``claimed``: run the handler, then ``complete`` or ``release``.
    ``done``: ``response`` holds the stored serialized ExecuteResponse.
    ``in_progress``: another owner holds the key right now.
    ``conflict``: the key was used before for a different request.
    """

    status: Literal["claimed", "done", "in_progress", "conflict"]
    response: bytes | None = None


@dataclass(frozen=True)
class KeyStatus:
    """What a store holds for one key, read without changing it (``lookup``).

    ``absent``: nothing: never claimed, or released (the handler raised).
    ``running``: claimed ``claimed_at`` (epoch seconds), no result yet, and younger
    than the store's ``stale_claim_s``: an execution holds it.
    ``abandoned``: a claim older than ``stale_claim_s`` without a result: its owner
    stopped (a crashed process) and the next claim of the key takes it over.
    ``done``: ``response`` holds the stored serialized ExecuteResponse, completed at
    ``completed_at`` (epoch seconds).
    """

    status: Literal["absent", "running", "abandoned", "done"]
    response: bytes | None = None
    claimed_at: float | None = None
    completed_at: float | None = None


ABSENT = KeyStatus("absent")


def key_status_of(
    claimed_at: float,
    completed_at: float | None,
    response: bytes | None,
    stale_claim_s: float,
    now: float,
) -> KeyStatus:
    """The :class:`KeyStatus` of a stored row (for stores written outside the SDK too)."""
    if response is not None:
        return KeyStatus("done", response, claimed_at, completed_at)
    # The same rule as claim(): a claim becomes stale strictly after stale_claim_s.
    state: Literal["running", "abandoned"] = (
        "running" if now - claimed_at <= stale_claim_s else "abandoned"
    )
    return KeyStatus(state, None, claimed_at)


class IdempotencyStore(Protocol):
    """Where claims and results live. Implementations must be safe to call concurrently."""

    async def claim(self, key: IdempotencyKey, fingerprint: str, owner: str) -> Claim: ...

    async def complete(self, key: IdempotencyKey, owner: str, response: bytes) -> None: ...

    async def release(self, key: IdempotencyKey, owner: str) -> None: ...

    async def lookup(self, key: IdempotencyKey) -> KeyStatus:
        """What the store holds for ``key``; read-only. A store without it (written
        before it existed) still dedupes; its provider answers GetExecutionStatus
        UNIMPLEMENTED."""
        ...


@dataclass
class _Entry:
    fingerprint: str
    owner: str
    claimed_at: float
    response: bytes | None = None
    completed_at: float | None = None


class MemoryIdempotencyStore:
    """A process-local store: results are lost on restart. For tests and stateless demos."""

    def __init__(self, stale_claim_s: float = 300.0) -> None:
        self._entries: dict[IdempotencyKey, _Entry] = {}
        self._stale_claim_s = stale_claim_s

    async def claim(self, key: IdempotencyKey, fingerprint: str, owner: str) -> Claim:
        entry = self._entries.get(key)
        now = time.time()
        if entry is None:
            self._entries[key] = _Entry(fingerprint, owner, now)
            return Claim("claimed")
        if entry.fingerprint != fingerprint:
            return Claim("conflict")
        if entry.response is not None:
            return Claim("done", entry.response)
        if now - entry.claimed_at > self._stale_claim_s:
            self._entries[key] = _Entry(fingerprint, owner, now)
            return Claim("claimed")
        return Claim("in_progress")

    async def complete(self, key: IdempotencyKey, owner: str, response: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.owner == owner:
            entry.response = response
            entry.completed_at = time.time()

    async def release(self, key: IdempotencyKey, owner: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.owner == owner and entry.response is None:
            del self._entries[key]

    async def lookup(self, key: IdempotencyKey) -> KeyStatus:
        entry = self._entries.get(key)
        if entry is None:
            return ABSENT
        return key_status_of(
            entry.claimed_at, entry.completed_at, entry.response, self._stale_claim_s, time.time()
        )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS actionmesh_idempotency (
    tenant VARCHAR(128) NOT NULL,
    action_id VARCHAR(128) NOT NULL,
    idempotency_key VARCHAR(256) NOT NULL,
    fingerprint VARCHAR(64) NOT NULL,
    owner VARCHAR(64) NOT NULL,
    claimed_at FLOAT NOT NULL,
    completed_at FLOAT,
    response BLOB,
    PRIMARY KEY (tenant, action_id, idempotency_key)
)
"""
_WHERE = "tenant = ? AND action_id = ? AND idempotency_key = ?"


class SqliteIdempotencyStore:
    """Claims and results in a SQLite file, through the standard library.

    What ``dedupe=True`` uses on the provider's own database file. A claim is a row
    under a primary key, read and written in one ``BEGIN IMMEDIATE`` transaction, so
    two processes sharing the file cannot both claim a key. The table is the one
    :class:`~actionmesh.sdk.sqlstore.SqlIdempotencyStore` keeps, so either can open
    a file the other wrote.
    """

    def __init__(self, path: str, *, stale_claim_s: float = 300.0) -> None:
        self._stale_claim_s = stale_claim_s
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection, used by one worker thread at a time (the lock): SQLite
        # serialises writers anyway, and the busy timeout covers other processes.
        self._connection = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        with self._lock:
            if path != ":memory:":
                _use_wal(self._connection)
            self._connection.execute(_SCHEMA)

    @classmethod
    def open(cls, url: str, *, stale_claim_s: float = 300.0) -> SqliteIdempotencyStore:
        """The store in the SQLite file a ``sqlite:///PATH`` URL names."""
        path = sqlite_path(url)
        if path is None:
            raise ValueError(f"not a sqlite:/// URL: {url.split(':', 1)[0]}://...")
        return cls(path, stale_claim_s=stale_claim_s)

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def prune(self, older_than_s: float) -> int:
        """Forget completed keys older than ``older_than_s``; returns how many."""
        cutoff = time.time() - older_than_s
        with self._lock:
            cursor = self._connection.execute(
                "DELETE FROM actionmesh_idempotency"
                " WHERE completed_at IS NOT NULL AND completed_at < ?",
                (cutoff,),
            )
            return cursor.rowcount

    async def claim(self, key: IdempotencyKey, fingerprint: str, owner: str) -> Claim:
        return await asyncio.to_thread(self._claim, key, fingerprint, owner)

    async def complete(self, key: IdempotencyKey, owner: str, response: bytes) -> None:
        await asyncio.to_thread(self._complete, key, owner, response)

    async def release(self, key: IdempotencyKey, owner: str) -> None:
        await asyncio.to_thread(self._release, key, owner)

    async def lookup(self, key: IdempotencyKey) -> KeyStatus:
        return await asyncio.to_thread(self._lookup, key)

    def _lookup(self, key: IdempotencyKey) -> KeyStatus:
        with self._lock:
            row = self._connection.execute(
                "SELECT claimed_at, completed_at, response FROM actionmesh_idempotency"
                f" WHERE {_WHERE}",
                (key.tenant, key.action_id, key.key),
            ).fetchone()
        if row is None:
            return ABSENT
        claimed_at, completed_at, response = row
        return key_status_of(
            claimed_at,
            completed_at,
            None if response is None else bytes(response),
            self._stale_claim_s,
            time.time(),
        )

    def _claim(self, key: IdempotencyKey, fingerprint: str, owner: str) -> Claim:
        now = time.time()
        params = (key.tenant, key.action_id, key.key)
        with self._lock, _immediate(self._connection) as db:
            row = db.execute(
                "SELECT fingerprint, owner, claimed_at, response FROM actionmesh_idempotency"
                f" WHERE {_WHERE}",
                params,
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO actionmesh_idempotency (tenant, action_id, idempotency_key,"
                    " fingerprint, owner, claimed_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (*params, fingerprint, owner, now),
                )
                return Claim("claimed")
            stored_fingerprint, holder, claimed_at, response = row
            if stored_fingerprint != fingerprint:
                return Claim("conflict")
            if response is not None:
                return Claim("done", bytes(response))
            if now - claimed_at <= self._stale_claim_s:
                return Claim("in_progress")
            # Take over an abandoned claim (the transaction holds the write lock).
            db.execute(
                f"UPDATE actionmesh_idempotency SET owner = ?, claimed_at = ?"
                f" WHERE {_WHERE} AND owner = ?",
                (owner, now, *params, holder),
            )
            return Claim("claimed")

    def _complete(self, key: IdempotencyKey, owner: str, response: bytes) -> None:
        with self._lock:
            self._connection.execute(
                "UPDATE actionmesh_idempotency SET response = ?, completed_at = ?"
                f" WHERE {_WHERE} AND owner = ?",
                (response, time.time(), key.tenant, key.action_id, key.key, owner),
            )

    def _release(self, key: IdempotencyKey, owner: str) -> None:
        with self._lock:
            self._connection.execute(
                f"DELETE FROM actionmesh_idempotency WHERE {_WHERE}"
                " AND owner = ? AND response IS NULL",
                (key.tenant, key.action_id, key.key, owner),
            )


@contextmanager
def _immediate(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at its start (no read-to-write upgrade)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _use_wal(connection: sqlite3.Connection) -> None:
    """WAL, so the provider's own store and this one share the file; switching takes
    an exclusive lock that another process starting at once may hold: retry, bounded."""
    deadline = time.monotonic() + 30.0
    while True:
        try:
            (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[IdempotencyKey, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: IdempotencyKey) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
