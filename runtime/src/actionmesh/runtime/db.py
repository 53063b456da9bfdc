"""SQLAlchemy engine set-up shared by every service that stores state.

Any SQLAlchemy URL works; SQLite files get WAL mode and a busy timeout so
several readers and one writer coexist, and their parent folder is created.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self, cast

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.types import TypeDecorator
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

from actionmesh.rpc.config import sqlite_url
from actionmesh.rpc.errors import Unavailable

__all__ = [
    "DATABASE_RETRY_S",
    "SqlStore",
    "UTCDateTime",
    "database_unavailable",
    "make_engine",
    "sqlite_url",
]

DATABASE_RETRY_S = 1.0
"""The RetryInfo a caller gets while a service's database cannot be reached."""


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def _database_locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


@retry(
    retry=retry_if_exception(_database_locked),
    wait=wait_exponential(multiplier=0.01, max=0.2),
    stop=stop_after_delay(30),
    reraise=True,
)
def _use_wal(cursor: sqlite3.Cursor) -> None:
    """Switch a SQLite file to WAL once; other connections only see that it is WAL.

    Switching takes an exclusive lock and SQLite answers "database is locked" at once,
    without its busy timeout, when another connection holds one, as happens when
    several processes open a new file together. So retry, bounded.
    """
    (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the backend keeps.

    SQLite stores no offset and hands back naive values; PostgreSQL keeps the
    offset. Normalising both ways keeps comparisons and arithmetic correct.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; actionmesh stores UTC-aware times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment = cast(datetime, value)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def database_unavailable(exc: BaseException) -> Unavailable | None:
    """A database that cannot be reached (refused, dropped, failing over, locked, its
    pool exhausted) is a dependency being down: UNAVAILABLE ``DATABASE_UNAVAILABLE``
    with RetryInfo, as the outcome table says, never INTERNAL. An error translator
    for :func:`actionmesh.rpc.server.start_server`."""
    transient = isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    )
    if not transient and not isinstance(exc, sa_exc.TimeoutError):
        return None
    return Unavailable(
        "the service's database cannot be reached; retry later (an execution: with the "
        "same idempotency key, which never runs it twice)",
        reason="DATABASE_UNAVAILABLE",
        retry_after_s=DATABASE_RETRY_S,
    )


class SqlStore:
    """The skeleton of a component's own SQLAlchemy store (the example providers', the
    support desk's): ``open(url)`` makes the engine and the tables of ``metadata``,
    ``close()`` disposes of it. Synchronous: call it through ``asyncio.to_thread``.
    """

    metadata: ClassVar[MetaData]
    """The store's tables (its declarative base's metadata)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metadata.create_all(engine)

    @classmethod
    def open(cls, url: str) -> Self:
        return cls(make_engine(url))

    def close(self) -> None:
        self.engine.dispose()
