"""``actionmesh db``: apply and inspect the services' schema migrations.

    actionmesh db upgrade                              # every service's database of `actionmesh up`
    actionmesh db upgrade --service gateway --database-url postgresql+psycopg://...
    actionmesh db current --check                      # exit 1 unless every schema is at head
    actionmesh db revision --service auditlog -m "hash chain"   # a new migration (development)

Without ``--database-url`` each service's URL comes from its own variable
(ACTIONMESH_GATEWAY_DATABASE_URL, ACTIONMESH_AUDITLOG_DATABASE_URL,
ACTIONMESH_REGISTRY_DATABASE_URL), else from the data directory ``actionmesh up``
uses (``--data-dir``, SQLite files under ``data/``). With ``--service all`` and
``--database-url`` the three services share that one database, each with its
own version table. :func:`add_db_commands` plugs the group into the
``actionmesh`` parser; ``python -m actionmesh.db_cli db ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from alembic import command
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from actionmesh.auditlog.storage import MIGRATIONS as AUDITLOG_MIGRATIONS
from actionmesh.gateway.storage import MIGRATIONS as GATEWAY_MIGRATIONS
from actionmesh.mesh import mesh_database_url
from actionmesh.registry.storage import MIGRATIONS as REGISTRY_MIGRATIONS
from actionmesh.runtime.db import make_engine, sqlite_url
from actionmesh.runtime.migrations import (
    MigrationError,
    SchemaStatus,
    ServiceMigrations,
    alembic_config,
    head_revision,
    schema_status,
    upgrade,
)

# The stateful services, each with the migrations it declares beside its models.
SERVICES: dict[str, ServiceMigrations] = {
    spec.name: spec for spec in (GATEWAY_MIGRATIONS, AUDITLOG_MIGRATIONS, REGISTRY_MIGRATIONS)
}
DEFAULT_DATA_DIR = Path(os.environ.get("ACTIONMESH_DATA_DIR", ".actionmesh"))
ENV_PREFIXES = {
    "gateway": "ACTIONMESH_GATEWAY",
    "auditlog": "ACTIONMESH_AUDITLOG",
    "registry": "ACTIONMESH_REGISTRY",
}


class DbCliError(Exception):
    """A user-facing failure of a db command: printed without a traceback."""


def _console() -> Console:
    # Built per command so the width follows the environment of the call (COLUMNS).
    return Console()


def database_url(args: argparse.Namespace, service: str) -> str:
    """--database-url, else ACTIONMESH_<SERVICE>_DATABASE_URL, else the mesh's file."""
    if args.database_url:
        return str(args.database_url)
    from_env = os.environ.get(f"{ENV_PREFIXES[service]}_DATABASE_URL")
    if from_env:
        return from_env
    return mesh_database_url(Path(getattr(args, "data_dir", DEFAULT_DATA_DIR)), service)


def selected(args: argparse.Namespace) -> list[str]:
    return list(SERVICES) if args.service == "all" else [args.service]


def shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def describe(status: SchemaStatus) -> str:
    if status.at_head:
        return "at head"
    if status.legacy:
        return "tables from before migrations (adopted by upgrade if they match the baseline)"
    if status.current is None:
        return "empty (upgrade creates the schema)"
    return f"behind (upgrade to {status.head})"


def _as_dict(service: str, url: str, status: SchemaStatus) -> dict[str, object]:
    return {
        "service": service,
        "database_url": shown(url),
        "current": status.current,
        "head": status.head,
        "at_head": status.at_head,
        "legacy": status.legacy,
    }


def _report(rows: list[tuple[str, str, SchemaStatus]], *, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps([_as_dict(*row) for row in rows], indent=2))
        return
    table = Table(title=title)
    for column in ("service", "database", "current", "head", "state"):
        table.add_column(column)
    for service, url, status in rows:
        table.add_row(
            service, shown(url), status.current or "-", status.head, escape(describe(status))
        )
    _console().print(table)


def cmd_upgrade(args: argparse.Namespace) -> int:
    rows = []
    for service in selected(args):
        url = database_url(args, service)
        rows.append((service, url, upgrade(url, SERVICES[service], args.revision)))
    _report(rows, as_json=args.json, title="schema upgraded")
    return 0


def _missing_sqlite_file(url: str) -> bool:
    parsed = make_url(url)
    database = parsed.database or ""
    return (
        parsed.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and not Path(database).exists()
    )


def cmd_current(args: argparse.Namespace) -> int:
    rows = []
    for service in selected(args):
        url = database_url(args, service)
        if _missing_sqlite_file(url):
            # Only looking: opening it would create an empty file (and its folder).
            status = SchemaStatus(
                service=service, current=None, head=head_revision(SERVICES[service])
            )
        else:
            status = schema_status(url, SERVICES[service])
        rows.append((service, url, status))
    _report(rows, as_json=args.json, title="schema revisions")
    return 1 if args.check and not all(status.at_head for _, _, status in rows) else 0


def next_revision_id(service: str) -> str:
    """The head's number plus one, zero-padded (0001 -> 0002), so files sort in order."""
    head = head_revision(SERVICES[service])
    if not head.isdigit():
        raise DbCliError(f"cannot number a revision after non-numeric head {head!r}")
    return f"{int(head) + 1:0{len(head)}d}"


def cmd_revision(args: argparse.Namespace) -> int:
    """Write SERVICE/migrations/versions/NNNN_message.py, autogenerated unless --empty."""
    service = args.service
    rev_id = next_revision_id(service)
    if args.empty:
        script = command.revision(alembic_config(SERVICES[service]), args.message, rev_id=rev_id)
    else:
        # Compare the models with a scratch database at head, not with anyone's data.
        with tempfile.TemporaryDirectory() as scratch:
            url = args.database_url or sqlite_url(Path(scratch) / f"{service}.db")
            upgrade(url, SERVICES[service])
            engine = make_engine(url)
            try:
                with engine.begin() as connection:
                    script = command.revision(
                        alembic_config(SERVICES[service], connection),
                        args.message,
                        autogenerate=True,
                        rev_id=rev_id,
                    )
            finally:
                engine.dispose()
    written = script if isinstance(script, list) else [script]
    for item in written:
        if item is not None:
            _console().print(f"wrote {escape(item.path)}: review it before committing")
    return 0


def add_db_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db upgrade|current|revision`` to the ``actionmesh`` sub-commands."""
    group = sub.add_parser("db", help="apply and inspect the services' schema migrations")
    commands = group.add_subparsers(dest="db_command", required=True)

    def common(parser: argparse.ArgumentParser, *, services: Sequence[str]) -> None:
        one = "all" not in services
        parser.add_argument(
            "--service",
            choices=services,
            required=one,
            default=None if one else "all",
            help="which service's schema" + ("" if one else " (default: all)"),
        )
        parser.add_argument(
            "--database-url",
            help="SQLAlchemy URL (default: ACTIONMESH_<SERVICE>_DATABASE_URL, else the "
            "SQLite file of `actionmesh up` under --data-dir)",
        )

    upgrade_parser = commands.add_parser(
        "upgrade",
        help="migrate to the latest revision (what services do at start)",
        description="Apply the migrations each service ships. Safe with several replicas "
        "starting at once; tables made before migrations are adopted when they match the "
        "baseline, else refused with what differs.",
    )
    common(upgrade_parser, services=["all", *SERVICES])
    upgrade_parser.add_argument("--revision", default="head", help="target (default: head)")
    upgrade_parser.add_argument("--json", action="store_true", help="machine-readable output")
    upgrade_parser.set_defaults(func=guarded(cmd_upgrade))

    current = commands.add_parser("current", help="show each schema's revision and the head")
    common(current, services=["all", *SERVICES])
    current.add_argument("--check", action="store_true", help="exit 1 unless all are at head")
    current.add_argument("--json", action="store_true", help="machine-readable output")
    current.set_defaults(func=guarded(cmd_current))

    revision = commands.add_parser(
        "revision",
        help="write a new migration for model changes (development)",
        description="Autogenerate SERVICE/migrations/versions/NNNN_MESSAGE.py by comparing "
        "the current models with a scratch SQLite database at head (or --database-url).",
    )
    common(revision, services=list(SERVICES))
    revision.add_argument("-m", "--message", required=True, help="what the migration does")
    revision.add_argument("--empty", action="store_true", help="an empty script, no compare")
    revision.set_defaults(func=guarded(cmd_revision))


def guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a db command so that failures print one line and return 1, not a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (DbCliError, MigrationError) as exc:
            _console().print(f"[red]error:[/red] {escape(str(exc))}")
        except SQLAlchemyError as exc:
            # The driver's first line says what failed (refused connection, bad password...).
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            _console().print(f"[red]database error:[/red] {escape(first)}")
        return 1

    return run


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the db group: ``python -m actionmesh.db_cli db ...``."""
    parser = argparse.ArgumentParser(prog="actionmesh", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="mesh data dir")
    add_db_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
