"""Idempotency records in any SQLAlchemy database (the SDK's ``sql`` extra).

``dedupe=True`` picks this store when the provider's ``database_url`` is not a
SQLite file (PostgreSQL, say); the table is the one
:class:`~actionmesh.sdk.dedupe.SqliteIdempotencyStore` keeps.
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    LargeBinary,
    String,
    and_,
    create_engine,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from actionmesh.sdk.dedupe import ABSENT, Claim, IdempotencyKey, KeyStatus, key_status_of


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
        return cls(create_engine(url, pool_pre_ping=True), stale_claim_s=stale_claim_s)

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

    async def lookup(self, key: IdempotencyKey) -> KeyStatus:
        return await asyncio.to_thread(self._lookup, key)

    def _lookup(self, key: IdempotencyKey) -> KeyStatus:
        with Session(self._engine) as session:
            row = session.execute(
                select(
                    IdempotencyRow.claimed_at,
                    IdempotencyRow.completed_at,
                    IdempotencyRow.response,
                ).where(self._where(key))
            ).one_or_none()
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
