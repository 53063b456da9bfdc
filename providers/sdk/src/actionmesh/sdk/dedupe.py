"""Idempotency: the same (tenant, action, idempotency key) never acts twice.

The SDK claims a key before running a handler and stores the handler's result
under it. A repeated key returns the stored result without running the handler;
a concurrent duplicate in the same process waits on a per-key lock and then
gets the stored result; a duplicate in another process sharing the store sees
the claim and is told to retry (UNAVAILABLE, nothing ran). If the handler raises,
the claim is released so a retry can run it again (handlers re-check their own
state). A claim left behind by a crashed process is taken over once it is older
than ``stale_claim_s``.

``Provider(..., dedupe=True)`` uses :class:`SqlIdempotencyStore` on the
provider's own database (``ProviderConfig.database_url_for``); a provider can
pass any :class:`IdempotencyStore` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    LargeBinary,
    String,
    and_,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from actionmesh.runtime.db import make_engine


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


class IdempotencyStore(Protocol):
    """Where claims and results live. Implementations must be safe to call concurrently."""

    async def claim(self, key: IdempotencyKey, fingerprint: str, owner: str) -> Claim: ...

    async def complete(self, key: IdempotencyKey, owner: str, response: bytes) -> None: ...

    async def release(self, key: IdempotencyKey, owner: str) -> None: ...


@dataclass
class _Entry:
    fingerprint: str
    owner: str
    claimed_at: float
    response: bytes | None = None


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

    async def release(self, key: IdempotencyKey, owner: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.owner == owner and entry.response is None:
            del self._entries[key]


class _Base(DeclarativeBase):
    pass


class IdempotencyRow(_Base):
    __tablename__ = "actionmesh_idempotency"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    action_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(64))
    # Epoch seconds: comparable across processes without timezone handling.
    claimed_at: Mapped[float] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    response: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class SqlIdempotencyStore:
    """Claims and results in a SQLAlchemy database (a SQLite file by default).

    Claims are rows under a primary key, so two processes sharing the database
    cannot both claim a key.
    """

    def __init__(self, engine: Engine, *, stale_claim_s: float = 300.0) -> None:
        self._engine = engine
        self._stale_claim_s = stale_claim_s
        _Base.metadata.create_all(engine)

    @classmethod
    def open(cls, url: str, *, stale_claim_s: float = 300.0) -> SqlIdempotencyStore:
        return cls(make_engine(url), stale_claim_s=stale_claim_s)

    def close(self) -> None:
        self._engine.dispose()

    def prune(self, older_than_s: float) -> int:
        """Forget completed keys older than ``older_than_s``; returns how many."""
        cutoff = time.time() - older_than_s
        with Session(self._engine) as session, session.begin():
            result = session.execute(
                delete(IdempotencyRow).where(
                    IdempotencyRow.completed_at.is_not(None),
                    IdempotencyRow.completed_at < cutoff,
                )
            )
            return int(getattr(result, "rowcount", 0) or 0)

    async def claim(self, key: IdempotencyKey, fingerprint: str, owner: str) -> Claim:
        return await asyncio.to_thread(self._claim, key, fingerprint, owner)

    async def complete(self, key: IdempotencyKey, owner: str, response: bytes) -> None:
        await asyncio.to_thread(self._complete, key, owner, response)

    async def release(self, key: IdempotencyKey, owner: str) -> None:
        await asyncio.to_thread(self._release, key, owner)

    def _where(self, key: IdempotencyKey) -> ColumnElement[bool]:
        return and_(
            IdempotencyRow.tenant == key.tenant,
            IdempotencyRow.action_id == key.action_id,
            IdempotencyRow.idempotency_key == key.key,
        )

    def _claim(self, key: IdempotencyKey, fingerprint: str, owner: str) -> Claim:
        now = time.time()
        try:
            with Session(self._engine) as session, session.begin():
                session.add(
                    IdempotencyRow(
                        tenant=key.tenant,
                        action_id=key.action_id,
                        idempotency_key=key.key,
                        fingerprint=fingerprint,
                        owner=owner,
                        claimed_at=now,
                    )
                )
            return Claim("claimed")
        except IntegrityError:
            pass
        with Session(self._engine) as session, session.begin():
            row = session.scalars(select(IdempotencyRow).where(self._where(key))).one_or_none()
            if row is None:
                # Released between our insert and this read: the caller retries the claim.
                return Claim("in_progress")
            if row.fingerprint != fingerprint:
                return Claim("conflict")
            if row.response is not None:
                return Claim("done", row.response)
            if now - row.claimed_at <= self._stale_claim_s:
                return Claim("in_progress")
            # Take over an abandoned claim, but only if nobody else just did.
            taken = session.execute(
                update(IdempotencyRow)
                .where(self._where(key), IdempotencyRow.owner == row.owner)
                .values(owner=owner, claimed_at=now)
            )
            return Claim("claimed" if getattr(taken, "rowcount", 0) == 1 else "in_progress")

    def _complete(self, key: IdempotencyKey, owner: str, response: bytes) -> None:
        with Session(self._engine) as session, session.begin():
            session.execute(
                update(IdempotencyRow)
                .where(self._where(key), IdempotencyRow.owner == owner)
                .values(response=response, completed_at=time.time())
            )

    def _release(self, key: IdempotencyKey, owner: str) -> None:
        with Session(self._engine) as session, session.begin():
            session.execute(
                delete(IdempotencyRow).where(
                    self._where(key),
                    IdempotencyRow.owner == owner,
                    IdempotencyRow.response.is_(None),
                )
            )


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
