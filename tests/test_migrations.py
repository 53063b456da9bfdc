"""Schema migrations: upgrade, honesty against the models, legacy adoption, locking, the CLI.

Every test runs on SQLite and on a throwaway PostgreSQL (tests/postgres.py). The
"no differences" test is the one that keeps migrations honest: change a model
without writing a migration and it fails, naming what autogenerate would do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
    inspect,
    select,
    text,
)

from actionmesh.auditlog.config import AuditLogConfig
from actionmesh.auditlog.server import start_auditlog
from actionmesh.db_cli import SERVICES
from actionmesh.gateway.config import GatewayConfig
from actionmesh.gateway.server import start_gateway
from actionmesh.registry.config import RegistryConfig
from actionmesh.registry.server import start_registry
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.runtime.migrations import (
    BASELINE_REVISION,
    LegacySchemaError,
    MigrationError,
    SchemaNotCurrentError,
    ensure_current,
    head_revision,
    schema_differences,
    schema_status,
    upgrade,
)
from actionmesh.v1 import audit_pb2, common_pb2

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
SERVICE_NAMES = sorted(SERVICES)


# --- the schema each service's create_all made before migrations (baseline 0001) ----------
# Transcribed from the models as they were when migrations were introduced; frozen here
# because the models move on. Column types and names are what create_all emitted.


def _legacy_gateway() -> MetaData:
    metadata = MetaData()
    Table(
        "executions",
        metadata,
        Column("execution_id", String(64), primary_key=True),
        Column("tenant", String(128), nullable=False, index=True),
        Column("idempotency_key", String(128), nullable=False),
        Column("request_hash", String(64), nullable=False),
        Column("action_id", String(128), nullable=False),
        Column("provider_id", String(128), nullable=False),
        Column("record_type", String(128), nullable=False),
        Column("record_id", String(256), nullable=False),
        Column("actor", String(256), nullable=False),
        Column("outcome", String(32), nullable=False),
        Column("reason", String(128), nullable=False),
        Column("message", Text, nullable=False),
        Column("external_ref", String(512), nullable=False),
        Column("changes_json", Text, nullable=False),
        Column("warnings_json", Text, nullable=False),
        Column("trace_id", String(32), nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True), nullable=True),
        Column("request_payload", LargeBinary, nullable=False),
        Column("requester_roles_json", Text, nullable=False),
        Column("sensitive", Boolean, nullable=False),
        Column("approval_state", String(16), nullable=False, index=True),
        Column("approval_expires_at", DateTime(timezone=True), nullable=True),
        Column("approval_decided_at", DateTime(timezone=True), nullable=True),
        Column("approver", String(256), nullable=False),
        Column("approval_comment", Text, nullable=False),
        Column("late_outcome", String(32), nullable=False),
        Column("late_result_at", DateTime(timezone=True), nullable=True),
        UniqueConstraint("tenant", "idempotency_key", name="uq_execution_key"),
    )
    for name in ("audit_outbox", "audit_outbox_parked"):
        Table(
            name,
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("event_id", String(64), nullable=False),
            Column("payload", LargeBinary, nullable=False),
            *([Column("error", Text, nullable=False)] if name == "audit_outbox_parked" else []),
        )
    return metadata


def _legacy_auditlog() -> MetaData:
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    Table(
        "audit_events",
        metadata,
        Column(
            "sequence",
            BigInteger().with_variant(Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        Column("event_id", String(128), nullable=False, unique=True),
        Column("tenant", String(128), nullable=False),
        Column("record_type", String(128), nullable=False),
        Column("record_id", String(256), nullable=False),
        Column("execution_id", String(128), nullable=False),
        Column("action_id", Text, nullable=False),
        Column("actor", Text, nullable=False),
        Column("type", String(64), nullable=False),
        Column("outcome", String(64), nullable=False),
        Column("occurred_at", DateTime(timezone=True), nullable=True),
        Column("trace_id", String(64), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Index("ix_audit_events_record", "tenant", "record_type", "record_id", "sequence"),
        Index("ix_audit_events_trace", "tenant", "trace_id"),
        Index("ix_audit_events_execution", "tenant", "execution_id"),
        sqlite_autoincrement=True,
    )
    return metadata


def _legacy_registry() -> MetaData:
    metadata = MetaData()
    Table(
        "providers",
        metadata,
        Column("provider_id", String(63), primary_key=True),
        Column("endpoint", String(255), nullable=False),
        Column("version", String(128), nullable=False),
        Column("actions", LargeBinary, nullable=False),
        Column("lease_id", String(32), nullable=False),
        Column("lease_expires_at", DateTime(timezone=True), nullable=False, index=True),
        Column("registered_at", DateTime(timezone=True), nullable=False),
        Column("health", String(16), nullable=False),
    )
    return metadata


LEGACY = {"gateway": _legacy_gateway, "auditlog": _legacy_auditlog, "registry": _legacy_registry}
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _legacy_row(service: str) -> tuple[str, dict[str, object]]:
    """One row a legacy database held, to prove adoption keeps the data."""
    if service == "gateway":
        return "audit_outbox", {"event_id": "e-1", "payload": b"\x01"}
    if service == "registry":
        return "providers", {
            "provider_id": "workitems",
            "endpoint": "127.0.0.1:1",
            "version": "1",
            "actions": b"",
            "lease_id": "l-1",
            "lease_expires_at": NOW,
            "registered_at": NOW,
            "health": "unknown",
        }
    event = audit_pb2.AuditEvent(
        event_id="e-1",
        type=audit_pb2.AUDIT_EVENT_TYPE_EXECUTION_FINISHED,
        tenant="acme",
        record=common_pb2.RecordRef(type="workitem", id="wi-1"),
        execution_id="x-1",
        action_id="workitem.retry",
        actor="alice",
        outcome=common_pb2.OUTCOME_SUCCEEDED,
    )
    event.occurred_at.FromDatetime(NOW)
    return "audit_events", {
        "event_id": "e-1",
        "tenant": "acme",
        "record_type": "workitem",
        "record_id": "wi-1",
        "execution_id": "x-1",
        "action_id": "workitem.retry",
        "actor": "alice",
        "type": "AUDIT_EVENT_TYPE_EXECUTION_FINISHED",
        "outcome": "OUTCOME_SUCCEEDED",
        "occurred_at": NOW,
        "trace_id": "",
        "payload": event.SerializeToString(deterministic=True),
    }


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "db.sqlite")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def version_rows(engine: Engine, service: str) -> list[str]:
    with engine.connect() as connection:
        table = SERVICES[service].version_table
        return list(connection.scalars(text(f"SELECT version_num FROM {table}")))


# --- upgrade from nothing ---------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_upgrade_creates_a_schema_equal_to_the_current_models(engine: Engine, service: str) -> None:
    before = schema_status(engine, SERVICES[service])
    assert (before.current, before.legacy, before.at_head) == (None, False, False)

    after = upgrade(engine, SERVICES[service])

    assert after.at_head and after.current == head_revision(SERVICES[service])
    assert version_rows(engine, service) == [head_revision(SERVICES[service])]
    assert set(SERVICES[service].metadata.tables) <= tables(engine)
    # A model changed without a migration would show up here as add/remove/modify ops.
    assert schema_differences(engine, SERVICES[service]) == []
    # Upgrading again is a no-op.
    assert upgrade(engine, SERVICES[service]) == after


def test_three_services_share_one_database_with_their_own_version_tables(engine: Engine) -> None:
    for service in SERVICE_NAMES:
        upgrade(engine, SERVICES[service])
    for service in SERVICE_NAMES:
        assert version_rows(engine, service) == [head_revision(SERVICES[service])]
        # Each service's comparison ignores the other services' tables.
        assert schema_differences(engine, SERVICES[service]) == []
    assert {f"alembic_version_{s}" for s in SERVICE_NAMES} <= tables(engine)


# --- legacy databases (create_all, no version table) ------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_a_baseline_legacy_database_is_adopted_and_upgraded(engine: Engine, service: str) -> None:
    LEGACY[service]().create_all(engine)
    table_name, row = _legacy_row(service)
    with engine.begin() as connection:
        legacy_table = LEGACY[service]().tables[table_name]
        connection.execute(insert(legacy_table), [row])

    status = schema_status(engine, SERVICES[service])
    assert status.legacy and status.current is None

    after = upgrade(engine, SERVICES[service])

    assert after.at_head and not after.legacy
    assert schema_differences(engine, SERVICES[service]) == []
    with engine.connect() as connection:
        count = connection.scalar(select(func.count()).select_from(text(table_name)))
    assert count == 1, "adoption must keep the rows the legacy database held"


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_a_legacy_database_of_another_shape_is_refused_untouched(
    engine: Engine, service: str
) -> None:
    LEGACY[service]().create_all(engine)
    table_name = sorted(LEGACY[service]().tables)[0]
    with engine.begin() as connection:
        connection.execute(text(f"ALTER TABLE {table_name} ADD COLUMN surprise INTEGER"))
    before = tables(engine)

    with pytest.raises(LegacySchemaError) as refused:
        upgrade(engine, SERVICES[service])

    message = str(refused.value)
    assert f"{table_name} has unexpected column(s) surprise" in message
    assert f"baseline revision {BASELINE_REVISION}" in message
    assert f"actionmesh db upgrade --service {service}" in message
    # Refused inside the migration transaction: not even the version table was left behind.
    assert tables(engine) == before
    assert schema_status(engine, SERVICES[service]).legacy


def test_a_legacy_database_missing_a_table_is_refused(engine: Engine) -> None:
    legacy = _legacy_gateway()
    legacy.tables["executions"].create(engine)

    with pytest.raises(LegacySchemaError, match="table audit_outbox is missing"):
        upgrade(engine, SERVICES["gateway"])
    assert tables(engine) == {"executions"}


def test_a_legacy_database_with_a_later_table_is_refused(engine: Engine) -> None:
    # Tables a later revision creates, made by create_all of newer models: stamping the
    # baseline would make that revision fail halfway, so it is refused up front.
    _legacy_auditlog().create_all(engine)
    later = sorted(set(SERVICES["auditlog"].metadata.tables) - {"audit_events"})
    if not later:
        pytest.skip("the auditlog has no tables beyond the baseline yet")
    SERVICES["auditlog"].metadata.tables[later[0]].create(engine)

    with pytest.raises(LegacySchemaError, match=f"table {later[0]} exists but is not part"):
        upgrade(engine, SERVICES["auditlog"])


def test_a_database_migrated_by_a_newer_version_is_refused(engine: Engine) -> None:
    upgrade(engine, SERVICES["registry"])
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version_registry SET version_num = '9999'"))
    for attempt in (upgrade, ensure_current):
        with pytest.raises(MigrationError, match="revision 9999, which this version") as refused:
            attempt(engine, SERVICES["registry"])
        assert not isinstance(refused.value, LegacySchemaError)


# --- migrate_on_start=False -------------------------------------------------------------


async def test_services_that_may_not_migrate_refuse_a_database_behind_head(
    database_url: str, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    starts = {
        "auditlog": lambda: start_auditlog(
            AuditLogConfig(port=0, database_url=database_url, migrate_on_start=False)
        ),
        "registry": lambda: start_registry(
            RegistryConfig(port=0, database_url=database_url, migrate_on_start=False)
        ),
        "gateway": lambda: start_gateway(
            GatewayConfig(
                port=0,
                database_url=database_url,
                jwt_secret_file=str(secret),
                jwt_dev_mode=True,
                registry="127.0.0.1:9",
                auditlog="127.0.0.1:9",
                migrate_on_start=False,
            )
        ),
    }
    for service, start in starts.items():
        with pytest.raises(SchemaNotCurrentError) as refused:
            await start()
        assert f"actionmesh db upgrade --service {service}" in str(refused.value)

    # After the migration job, the same settings start.
    upgrade(database_url, SERVICES["auditlog"])
    running = await starts["auditlog"]()
    await running.stop(0.5)
    upgrade(database_url, SERVICES["registry"])
    running = await starts["registry"]()
    await running.stop(0.5)


# --- concurrency ------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_concurrent_upgrades_all_succeed_and_migrate_once(database_url: str, service: str) -> None:
    replicas = 6
    barrier = threading.Barrier(replicas)
    results: list[str | None] = []
    errors: list[BaseException] = []

    def replica() -> None:
        engine = make_engine(database_url)
        try:
            barrier.wait(timeout=10)
            results.append(upgrade(engine, SERVICES[service]).current)
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=replica, daemon=True) for _ in range(replicas)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))

    assert errors == []
    assert results == [head_revision(SERVICES[service])] * replicas
    engine = make_engine(database_url)
    try:
        assert version_rows(engine, service) == [head_revision(SERVICES[service])]
        assert schema_differences(engine, SERVICES[service]) == []
    finally:
        engine.dispose()


# --- the CLI ----------------------------------------------------------------------------


def actionmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actionmesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def current(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    done = actionmesh("db", "current", "--json", *args, env=env)
    assert done.returncode == 0, done.stderr
    return {row["service"]: row for row in json.loads(done.stdout)}


def test_cli_upgrades_the_databases_of_actionmesh_up(tmp_path: Path) -> None:
    data_dir = tmp_path / "mesh"
    # --check fails while nothing is migrated.
    before = actionmesh("--data-dir", str(data_dir), "db", "current", "--check")
    assert before.returncode == 1, before.stdout + before.stderr
    assert not data_dir.exists(), "looking must not create the databases"

    done = actionmesh("--data-dir", str(data_dir), "db", "upgrade")
    assert done.returncode == 0, done.stdout + done.stderr
    check = actionmesh("--data-dir", str(data_dir), "db", "current", "--check", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    rows = {row["service"]: row for row in json.loads(check.stdout)}
    assert set(rows) == set(SERVICES)
    for service, row in rows.items():
        assert row["current"] == head_revision(SERVICES[service]) and row["at_head"] is True
    # The files are where `actionmesh up` opens them.
    assert {p.name for p in (data_dir / "data").iterdir()} >= {
        "gateway.db",
        "audit.db",
        "registry.db",
    }


def test_cli_takes_the_service_url_from_its_environment_variable(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "elsewhere.db")
    env = {"ACTIONMESH_REGISTRY_DATABASE_URL": url}
    done = actionmesh("db", "upgrade", "--service", "registry", "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    [row] = json.loads(done.stdout)
    assert row["database_url"] == url and row["at_head"] is True
    assert current("--service", "registry", env=env)["registry"]["current"] == head_revision(
        SERVICES["registry"]
    )


def test_cli_on_postgresql_migrates_all_services_into_one_database(postgres_url: str) -> None:
    before = current("--database-url", postgres_url)
    assert all(row["current"] is None for row in before.values())

    done = actionmesh("db", "upgrade", "--database-url", postgres_url)
    assert done.returncode == 0, done.stdout + done.stderr
    # The password (if any) is never printed; here the URL has none.
    assert "postgresql+psycopg://" in done.stdout

    rows = current("--check", "--database-url", postgres_url)
    assert {service: row["current"] for service, row in rows.items()} == {
        service: head_revision(SERVICES[service]) for service in SERVICES
    }


def test_cli_reports_a_refused_legacy_database_without_a_traceback(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "legacy.db")
    engine = make_engine(url)
    try:
        _legacy_gateway().tables["executions"].create(engine)
    finally:
        engine.dispose()
    done = actionmesh("db", "upgrade", "--service", "gateway", "--database-url", url)
    assert done.returncode == 1
    assert "error:" in done.stdout and "table audit_outbox is missing" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_cli_reports_an_unreachable_database_in_one_line() -> None:
    done = actionmesh(
        "db", "current", "--database-url", "postgresql+psycopg://nobody:secret@127.0.0.1:9/x"
    )
    assert done.returncode == 1
    assert "database error:" in done.stdout and "secret" not in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
