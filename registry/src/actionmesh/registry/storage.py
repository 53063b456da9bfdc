"""Where registrations live, portable across SQLite and PostgreSQL.

Two tables: ``providers`` (the live registrations, gone when a lease lapses) and
``provider_owners`` (which credential identity owns each provider id, kept across
lease expiry and deregistration: otherwise waiting for a crash would be a takeover).

The repository is synchronous (SQLAlchemy's sync engine); the directory calls it
through ``asyncio.to_thread``. Each method is one transaction, so a check and the
write it guards (the owner and action-id checks and the upsert, a lease match and
the renewal) cannot be split by another writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, LargeBinary, String, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from actionmesh.registry.model import ANONYMOUS, Health, Ownership, Provider
from actionmesh.runtime.db import UTCDateTime
from actionmesh.runtime.migrations import ServiceMigrations, prepare_schema
from actionmesh.v1 import common_pb2, registry_pb2


class Base(DeclarativeBase):
    pass


class ProviderRow(Base):
    __tablename__ = "providers"

    provider_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(128))
    # A serialized ProviderRegistration holding only ``actions``: descriptors are
    # read and written whole, never queried field by field.
    actions: Mapped[bytes] = mapped_column(LargeBinary)
    lease_id: Mapped[str] = mapped_column(String(32))
    lease_expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    health: Mapped[str] = mapped_column(String(16))


class OwnerRow(Base):
    __tablename__ = "provider_owners"

    provider_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    # A credential identity (registry.credentials): a token's hash, a certificate's
    # workload name, or "anonymous"; never a secret.
    owner: Mapped[str] = mapped_column(String(255))
    bound_at: Mapped[datetime] = mapped_column(UTCDateTime)


class OwnedByAnother(Exception):
    """The provider id is bound to another credential identity (which is not said)."""

    def __init__(self, provider_id: str) -> None:
        super().__init__(provider_id)
        self.provider_id = provider_id


@dataclass(frozen=True)
class ActionConflict:
    """An action id the registering provider wants that another provider holds."""

    action_id: str
    """The action id, or the record type when ``record_source``."""
    provider_id: str
    record_source: bool = False


def encode_actions(
    actions: Sequence[common_pb2.ActionDescriptor], record_sources: Sequence[str] = ()
) -> bytes:
    """What a provider declares (actions and record sources), as the ``actions`` column."""
    return registry_pb2.ProviderRegistration(
        actions=actions, record_sources=record_sources
    ).SerializeToString()


def decode_actions(data: bytes) -> tuple[common_pb2.ActionDescriptor, ...]:
    holder = registry_pb2.ProviderRegistration.FromString(data)
    return tuple(holder.actions)


def decode_record_sources(data: bytes) -> tuple[str, ...]:
    return tuple(registry_pb2.ProviderRegistration.FromString(data).record_sources)


def _to_provider(row: ProviderRow) -> Provider:
    return Provider(
        provider_id=row.provider_id,
        endpoint=row.endpoint,
        version=row.version,
        actions=decode_actions(row.actions),
        record_sources=decode_record_sources(row.actions),
        lease_id=row.lease_id,
        lease_expires_at=row.lease_expires_at,
        registered_at=row.registered_at,
        health=Health(row.health),
    )


class ProviderRepository:
    """Reads and writes provider registrations."""

    def __init__(self, engine: Engine, *, migrate: bool = True) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._migrate = migrate

    def create_schema(self) -> None:
        """Bring the table to the latest Alembic revision (registry/migrations).

        A repository made with ``migrate=False`` only checks it is there
        (SchemaNotCurrentError otherwise).
        """
        prepare_schema(self._engine, MIGRATIONS, migrate=self._migrate)

    def list_providers(self) -> list[Provider]:
        with self._sessions() as session:
            rows = session.scalars(select(ProviderRow).order_by(ProviderRow.provider_id))
            return [_to_provider(row) for row in rows]

    def get(self, provider_id: str) -> Provider | None:
        with self._sessions() as session:
            row = session.get(ProviderRow, provider_id)
            return _to_provider(row) if row else None

    def register(
        self, provider: Provider, owner: str = ANONYMOUS
    ) -> tuple[list[ActionConflict], Provider | None]:
        """Insert or replace ``provider`` unless another provider holds one of its actions.

        The first successful registration of an id binds it to ``owner``; a later
        one by another identity raises :class:`OwnedByAnother`, with nothing written.
        Returns the conflicts (nothing written when there are any) and the
        registration that was replaced, if any.
        """
        try:
            return self._register(provider, owner)
        except IntegrityError:
            # Another registry process on the same database bound the id between our
            # read and our insert: run again, which sees that owner and judges by it.
            return self._register(provider, owner)

    def _register(
        self, provider: Provider, owner: str
    ) -> tuple[list[ActionConflict], Provider | None]:
        wanted = {action.action_id for action in provider.actions}
        sources = set(provider.record_sources)
        with self._sessions.begin() as session:
            bound = _check_owner(session, provider.provider_id, owner)
            others = list(
                session.scalars(
                    select(ProviderRow).where(ProviderRow.provider_id != provider.provider_id)
                )
            )
            conflicts = [
                ActionConflict(action.action_id, row.provider_id)
                for row in others
                for action in decode_actions(row.actions)
                if action.action_id in wanted
            ] + [
                ActionConflict(record_type, row.provider_id, record_source=True)
                for row in others
                for record_type in decode_record_sources(row.actions)
                if record_type in sources
            ]
            if conflicts:
                return conflicts, None
            row = session.get(ProviderRow, provider.provider_id)
            previous = _to_provider(row) if row else None
            if row is None:
                row = ProviderRow(provider_id=provider.provider_id)
                session.add(row)
            row.endpoint = provider.endpoint
            row.version = provider.version
            row.actions = encode_actions(provider.actions, provider.record_sources)
            row.lease_id = provider.lease_id
            row.lease_expires_at = provider.lease_expires_at
            row.registered_at = provider.registered_at
            row.health = provider.health.value
            if bound is None:
                session.add(
                    OwnerRow(
                        provider_id=provider.provider_id,
                        owner=owner,
                        bound_at=provider.registered_at,
                    )
                )
            return [], previous

    def renew(
        self,
        provider_id: str,
        lease_id: str,
        now: datetime,
        expires_at: datetime,
        owner: str = ANONYMOUS,
    ) -> bool:
        """Extend a live lease; False when it does not exist, does not match or has lapsed.

        Raises :class:`OwnedByAnother` when ``owner`` is not the id's owner.
        """
        with self._sessions.begin() as session:
            _check_owner(session, provider_id, owner)
            result = session.execute(
                update(ProviderRow)
                .where(
                    ProviderRow.provider_id == provider_id,
                    ProviderRow.lease_id == lease_id,
                    ProviderRow.lease_expires_at > now,
                )
                .values(lease_expires_at=expires_at)
            )
            return _rowcount(result) == 1

    def remove(self, provider_id: str, lease_id: str, owner: str = ANONYMOUS) -> Provider | None:
        """Delete the registration held under ``lease_id``; None when there is none.

        The id stays bound to its owner. Raises :class:`OwnedByAnother` when
        ``owner`` is not the id's owner.
        """
        with self._sessions.begin() as session:
            _check_owner(session, provider_id, owner)
            row = session.get(ProviderRow, provider_id)
            if row is None or row.lease_id != lease_id:
                return None
            provider = _to_provider(row)
            session.delete(row)
            return provider

    def remove_expired(self, now: datetime) -> list[Provider]:
        """Delete and return every registration whose lease lapsed by ``now``."""
        removed: list[Provider] = []
        with self._sessions.begin() as session:
            rows = session.scalars(
                select(ProviderRow).where(ProviderRow.lease_expires_at <= now)
            ).all()
            for row in rows:
                provider = _to_provider(row)
                # Conditional, so a lease renewed since the read is not deleted.
                result = session.execute(
                    delete(ProviderRow).where(
                        ProviderRow.provider_id == row.provider_id,
                        ProviderRow.lease_id == row.lease_id,
                        ProviderRow.lease_expires_at <= now,
                    )
                )
                if _rowcount(result) == 1:
                    removed.append(provider)
        return removed

    def set_health(self, provider_id: str, lease_id: str, health: Health) -> Provider | None:
        """Record ``health``; the updated provider when it changed, else None.

        Matching the lease drops results of probes started before a
        re-registration (which may point at an old endpoint).
        """
        with self._sessions.begin() as session:
            row = session.get(ProviderRow, provider_id)
            if row is None or row.lease_id != lease_id or row.health == health.value:
                return None
            row.health = health.value
            return _to_provider(row)

    def owner_of(self, provider_id: str) -> Ownership | None:
        with self._sessions() as session:
            row = session.get(OwnerRow, provider_id)
            return _to_ownership(row) if row else None

    def list_owners(self) -> list[Ownership]:
        with self._sessions() as session:
            rows = session.scalars(select(OwnerRow).order_by(OwnerRow.provider_id))
            return [_to_ownership(row) for row in rows]

    def release_owner(self, provider_id: str) -> Ownership | None:
        """Unbind ``provider_id`` (an operator's decision); the binding removed, if any.

        A live registration stays until its lease ends; the next registration of
        the id, by whichever identity comes first, binds it again.
        """
        with self._sessions.begin() as session:
            row = session.get(OwnerRow, provider_id)
            if row is None:
                return None
            released = _to_ownership(row)
            session.delete(row)
            return released


def _check_owner(session: Session, provider_id: str, owner: str) -> OwnerRow | None:
    """The id's binding (None when unbound); OwnedByAnother when it is not ``owner``'s."""
    bound = session.get(OwnerRow, provider_id)
    if bound is not None and bound.owner != owner:
        raise OwnedByAnother(provider_id)
    return bound


def _to_ownership(row: OwnerRow) -> Ownership:
    return Ownership(provider_id=row.provider_id, owner=row.owner, bound_at=row.bound_at)


def _rowcount(result: Any) -> int:
    return cast(CursorResult[Any], result).rowcount


MIGRATIONS = ServiceMigrations.beside("registry", __file__, Base.metadata)
"""The registry's schema: its migrations (``migrations/`` beside this file) and models."""
