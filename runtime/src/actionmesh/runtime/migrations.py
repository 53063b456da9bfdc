"""Alembic schema migrations of the services' own databases, driven from Python.

Each stateful service (gateway, auditlog, registry) ships a migration environment
inside its package (``actionmesh/SERVICE/migrations``), declares it as a
:class:`ServiceMigrations` next to its models (``MIGRATIONS``) and passes that to the
functions here; this module names no service and records its revision in a version
table of its own (``alembic_version_SERVICE``), so all three may share one
PostgreSQL database. No ``alembic.ini`` is needed: the :class:`alembic.config.Config`
is built here, pointing at the installed package.

An upgrade runs in one transaction under a lock: a PostgreSQL advisory lock, or
SQLite's write lock (``BEGIN IMMEDIATE``), so two replicas starting at once do not
both migrate; the second one waits and then finds the schema at head.

A *legacy* database (tables made by ``create_all`` before migrations existed, no
version table) is adopted when its tables and columns are exactly the baseline
revision's: it is stamped with the baseline and upgraded from there. Any other
shape is refused with :class:`LegacySchemaError`, which says what differs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, inspect, text

from actionmesh.rpc.server import CannotStart
from actionmesh.runtime.db import UTCDateTime, make_engine

log = logging.getLogger(__name__)

BASELINE_REVISION = "0001"
"""The first revision of every service: the schema as ``create_all`` made it."""


class MigrationError(CannotStart):
    """The database schema cannot be brought to, or is not at, the expected revision."""


class LegacySchemaError(MigrationError):
    """Tables from before migrations exist but do not match the baseline revision."""


class SchemaNotCurrentError(MigrationError):
    """The service may not migrate at start and the database is not at head."""


@dataclass(frozen=True, eq=False)
class ServiceMigrations:
    """One service's migrations and the tables they own, declared by the service itself
    (``MIGRATIONS`` beside its models) and handed to the functions of this module."""

    name: str
    """Service name, as on the command line (gateway, auditlog, registry)."""
    script_location: str
    """Folder holding the service's env.py, script.py.mako and versions/."""
    metadata: MetaData
    """The service's current models: the schema the head revision must describe."""

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.name}"

    @classmethod
    def beside(cls, name: str, models_file: str, metadata: MetaData) -> ServiceMigrations:
        """The migrations in the ``migrations`` folder next to ``models_file``."""
        return cls(name, str(Path(models_file).resolve().with_name("migrations")), metadata)


@dataclass(frozen=True)
class SchemaStatus:
    """Where one service's schema stands in a database."""

    service: str
    current: str | None
    """Revision recorded in the service's version table; None when there is none."""
    head: str
    """Latest revision this code ships."""
    legacy: bool = False
    """Service tables exist without a version table (made by ``create_all``)."""

    @property
    def at_head(self) -> bool:
        return self.current == self.head


def alembic_config(spec: ServiceMigrations, connection: Connection | None = None) -> Config:
    """A Config for one service; ``connection`` is the one env.py migrates on."""
    config = Config()
    config.set_main_option("script_location", spec.script_location)
    config.set_main_option("path_separator", "os")
    config.attributes["service"] = spec.name
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision(spec: ServiceMigrations) -> str:
    head = ScriptDirectory.from_config(alembic_config(spec)).get_current_head()
    if head is None:
        raise MigrationError(f"{spec.name} ships no migrations")
    return head


def schema_status(bind: Engine | str, spec: ServiceMigrations) -> SchemaStatus:
    """The service's current and head revisions in the database at ``bind``."""
    with _engine(bind) as engine, engine.connect() as connection:
        return _status(connection, spec)


def upgrade(bind: Engine | str, spec: ServiceMigrations, revision: str = "head") -> SchemaStatus:
    """Migrate the service's tables to ``revision``, adopting a baseline legacy schema.

    Safe to run from several processes at once; the status returned is after the upgrade.
    """
    with _engine(bind) as engine, _locked_transaction(engine, spec) as connection:
        before = _status(connection, spec)
        if before.legacy:
            _adopt_legacy(connection, spec)
        _refuse_unknown(spec, before.current)
        command.upgrade(alembic_config(spec, connection), revision)
        after = _status(connection, spec)
    if after.current != before.current:
        log.info(
            "%s schema upgraded from %s to %s", spec, before.current or "nothing", after.current
        )
    return after


def ensure_current(bind: Engine | str, spec: ServiceMigrations) -> SchemaStatus:
    """Raise :class:`SchemaNotCurrentError` unless the service's schema is at head."""
    status = schema_status(bind, spec)
    _refuse_unknown(spec, status.current)
    if not status.at_head:
        if status.legacy:
            found = "holds tables made before migrations"
        elif status.current is None:
            found = "has no schema yet"
        else:
            found = f"is at revision {status.current}"
        raise SchemaNotCurrentError(
            f"the {spec.name} database {found}, not at revision {status.head}, and "
            f"migrate_on_start is off: run `actionmesh db upgrade --service {spec.name} "
            "--database-url URL` (or the migration job) first"
        )
    return status


def _refuse_unknown(spec: ServiceMigrations, current: str | None) -> None:
    """A revision this code does not ship means a newer version migrated the database."""
    if current is None:
        return
    try:
        ScriptDirectory.from_config(alembic_config(spec)).get_revision(current)
    except CommandError:
        raise MigrationError(
            f"the {spec.name} database is at revision {current}, which this version of actionmesh "
            f"does not know (its latest is {head_revision(spec)}): a newer version migrated "
            "it; run that version, or restore a backup taken before its upgrade"
        ) from None


def prepare_schema(engine: Engine, spec: ServiceMigrations, *, migrate: bool) -> SchemaStatus:
    """What a service does at start: upgrade to head, or only check it is there."""
    return upgrade(engine, spec) if migrate else ensure_current(engine, spec)


def run_env(spec: ServiceMigrations) -> None:
    """The body of every service's env.py: migrate on the connection the caller passed.

    Without one (plain ``alembic`` with a ``sqlalchemy.url``) it opens its own.
    """
    from alembic import context

    if context.is_offline_mode():
        raise MigrationError("offline (--sql) migrations are not supported")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run_migrations(context, connection, spec)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise MigrationError("no connection and no sqlalchemy.url to migrate")
    engine = make_engine(url)
    try:
        with engine.begin() as own:
            _run_migrations(context, own, spec)
    finally:
        engine.dispose()


def _run_migrations(context: Any, connection: Connection, spec: ServiceMigrations) -> None:
    context.configure(connection=connection, **context_options(spec))
    with context.begin_transaction():
        context.run_migrations()


def context_options(spec: ServiceMigrations) -> dict[str, Any]:
    """How env.py and :func:`schema_differences` configure Alembic for one service."""
    metadata = spec.metadata

    def include_name(object_name: str | None, type_: str, _parent: Any) -> bool:
        # Several services may share one database: autogenerate must not see the others.
        return type_ != "table" or object_name in metadata.tables

    return {
        "target_metadata": metadata,
        "version_table": spec.version_table,
        "include_name": include_name,
        # SQLite cannot ALTER most things; batch mode recreates the table there.
        "render_as_batch": True,
        "compare_type": True,
        "render_item": _render_item,
    }


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # A migration is frozen history: it must not import application types that may
    # change later, so UTCDateTime is written as the column type it stores.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        autogen_context.imports.add("import sqlalchemy as sa")
        return "sa.DateTime(timezone=True)"
    return False


def schema_differences(bind: Engine | str, spec: ServiceMigrations) -> list[Any]:
    """What autogenerate would change to make the database match the current models.

    Empty when the migrations describe the models exactly; a model change without a
    migration shows up here (the tests assert it is empty after an upgrade).
    """
    with _engine(bind) as engine, engine.connect() as connection:
        context = MigrationContext.configure(connection, opts=context_options(spec))
        return list(compare_metadata(context, spec.metadata))


@contextmanager
def _engine(bind: Engine | str) -> Iterator[Engine]:
    if isinstance(bind, Engine):
        yield bind
        return
    engine = make_engine(bind)
    try:
        yield engine
    finally:
        engine.dispose()


def advisory_lock_key(spec: ServiceMigrations) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``, one per service."""
    digest = hashlib.sha256(f"actionmesh.migrations.{spec.name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def _locked_transaction(engine: Engine, spec: ServiceMigrations) -> Iterator[Connection]:
    """One transaction holding the service's migration lock until it commits."""
    with engine.begin() as connection:
        backend = connection.dialect.name
        if backend == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_lock_key(spec)}
            )
        elif backend == "sqlite":
            # pysqlite begins no transaction before DDL on its own, so without this each
            # CREATE would commit alone and two processes could interleave.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield connection


def _status(connection: Connection, spec: ServiceMigrations) -> SchemaStatus:
    context = MigrationContext.configure(connection, opts={"version_table": spec.version_table})
    current = context.get_current_revision()
    legacy = False
    if current is None:
        tables = set(inspect(connection).get_table_names())
        legacy = bool(tables) and bool(tables & _owned_tables(spec))
    return SchemaStatus(service=spec.name, current=current, head=head_revision(spec), legacy=legacy)


def _owned_tables(spec: ServiceMigrations) -> set[str]:
    return set(baseline_shape(spec)) | set(spec.metadata.tables)


@cache
def baseline_shape(spec: ServiceMigrations) -> dict[str, frozenset[str]]:
    """Table -> column names the baseline revision creates (built in memory, once)."""
    engine = make_engine("sqlite://")
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(spec, connection), BASELINE_REVISION)
            inspector = inspect(connection)
            return {
                table: frozenset(column["name"] for column in inspector.get_columns(table))
                for table in inspector.get_table_names()
                if table != spec.version_table
            }
    finally:
        engine.dispose()


def legacy_differences(connection: Connection, spec: ServiceMigrations) -> list[str]:
    """How the service's tables in the database differ from the baseline; empty if none."""
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    baseline = baseline_shape(spec)
    differences = [
        f"table {table} exists but is not part of the baseline"
        for table in sorted((set(spec.metadata.tables) - set(baseline)) & tables)
    ]
    for table, columns in sorted(baseline.items()):
        if table not in tables:
            differences.append(f"table {table} is missing")
            continue
        found = {column["name"] for column in inspector.get_columns(table)}
        if missing := sorted(columns - found):
            differences.append(f"{table} lacks column(s) {', '.join(missing)}")
        if extra := sorted(found - columns):
            differences.append(f"{table} has unexpected column(s) {', '.join(extra)}")
    return differences


def _adopt_legacy(connection: Connection, spec: ServiceMigrations) -> None:
    differences = legacy_differences(connection, spec)
    if differences:
        raise LegacySchemaError(
            f"the {spec.name} database has tables made before schema migrations that do not "
            f"match baseline revision {BASELINE_REVISION}: {'; '.join(differences)}. "
            "Back the database up, then either bring those tables to the baseline shape "
            f"by hand or move them aside (a fresh schema is created), and run "
            f"`actionmesh db upgrade --service {spec.name}` again."
        )
    log.warning(
        "%s: adopting tables made before migrations as baseline revision %s",
        spec.name,
        BASELINE_REVISION,
    )
    command.stamp(alembic_config(spec, connection), BASELINE_REVISION)
