"""``actionmesh registry``: operator commands on the registry's database.

    actionmesh registry owners                          # which credential owns each provider id
    actionmesh registry release-owner workitems --database-url postgresql+psycopg://...

A provider id belongs to the credential that first registered it, across lease
expiry, deregistration and restarts. When that credential is lost or replaced (a
new token, a renamed workload certificate), an operator releases the binding; the
next registration of the id, with whatever credential comes first, binds it again.
These commands act on the database directly (no RPC exists for this, on purpose:
nobody who can only reach the registry port can do it), and every release is logged.

Without ``--database-url`` the URL comes from ACTIONMESH_REGISTRY_DATABASE_URL, else
it is the SQLite file of ``actionmesh up`` under ``--data-dir``.
:func:`add_registry_commands` plugs the group into the ``actionmesh`` parser;
``python -m actionmesh.registry_cli ...`` runs it standalone. It sits with the other
commands, above the services: it knows the mesh's file layout and the registry's store.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from actionmesh.mesh import mesh_database_url
from actionmesh.registry.config import ENV_PREFIX
from actionmesh.registry.model import Ownership
from actionmesh.registry.storage import MIGRATIONS, ProviderRepository
from actionmesh.runtime.db import make_engine
from actionmesh.runtime.migrations import MigrationError, ensure_current

log = logging.getLogger("actionmesh.registry_cli")

DEFAULT_DATA_DIR = Path(os.environ.get("ACTIONMESH_DATA_DIR", ".actionmesh"))


class AdminError(Exception):
    """A user-facing failure: printed in one line, exit status 1."""


def database_url(args: argparse.Namespace) -> str:
    """--database-url, else ACTIONMESH_REGISTRY_DATABASE_URL, else the mesh's SQLite file."""
    if args.database_url:
        return str(args.database_url)
    from_env = os.environ.get(f"{ENV_PREFIX}_DATABASE_URL")
    if from_env:
        return from_env
    return mesh_database_url(Path(getattr(args, "data_dir", DEFAULT_DATA_DIR)), "registry")


def open_repository(url: str) -> tuple[Engine, ProviderRepository]:
    """The registry's store at ``url``, which must exist and be at the latest revision."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:"):
        if not Path(database).exists():
            # Opening it would create an empty file: say what is wrong instead.
            raise AdminError(f"no registry database at {database}")
    engine = make_engine(url)
    try:
        ensure_current(engine, MIGRATIONS)
    except BaseException:
        engine.dispose()
        raise
    return engine, ProviderRepository(engine, migrate=False)


def _as_dict(ownership: Ownership) -> dict[str, str]:
    return {
        "provider_id": ownership.provider_id,
        "owner": ownership.owner,
        "bound_at": ownership.bound_at.isoformat(),
    }


def cmd_owners(args: argparse.Namespace) -> int:
    engine, repository = open_repository(database_url(args))
    try:
        owners = repository.list_owners()
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps([_as_dict(o) for o in owners], indent=2))
    elif not owners:
        print("no provider id is bound to a credential")
    else:
        for ownership in owners:
            print(f"{ownership.provider_id}\t{ownership.owner}\t{ownership.bound_at.isoformat()}")
    return 0


def cmd_release_owner(args: argparse.Namespace) -> int:
    url = database_url(args)
    engine, repository = open_repository(url)
    try:
        released = repository.release_owner(args.provider_id)
    finally:
        engine.dispose()
    where = make_url(url).render_as_string(hide_password=True)
    if released is None:
        message = f"provider {args.provider_id!r} was not bound to any credential"
    else:
        message = (
            f"released provider {released.provider_id!r} from credential {released.owner} "
            f"(bound since {released.bound_at.isoformat()}); its next registration binds it again"
        )
        log.warning("%s [database %s, by uid %s]", message, where, os.getuid())
    if args.json:
        print(
            json.dumps(
                {
                    "provider_id": args.provider_id,
                    "released": released is not None,
                    "previous": _as_dict(released) if released else None,
                },
                indent=2,
            )
        )
    else:
        print(message)
    return 0


def guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Failures print one line and return 1, never a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (AdminError, MigrationError) as exc:
            print(f"error: {exc}", file=sys.stderr)
        except SQLAlchemyError as exc:
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            print(f"database error: {first}", file=sys.stderr)
        return 1

    return run


def add_registry_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``registry owners|release-owner`` to the ``actionmesh`` sub-commands."""
    group = sub.add_parser("registry", help="operator commands on the registry's database")
    commands = group.add_subparsers(dest="registry_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--database-url",
            help="SQLAlchemy URL of the registry database (default: "
            f"{ENV_PREFIX}_DATABASE_URL, else the SQLite file of `actionmesh up` under "
            "--data-dir)",
        )
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    owners = commands.add_parser("owners", help="list which credential owns each provider id")
    common(owners)
    owners.set_defaults(func=guarded(cmd_owners))

    release = commands.add_parser(
        "release-owner",
        help="unbind a provider id from its credential (logged)",
        description="Forget which credential owns PROVIDER_ID. The live registration, if "
        "any, stays until its lease ends; the next registration of the id binds it to the "
        "credential it presents.",
    )
    release.add_argument("provider_id", metavar="PROVIDER_ID")
    common(release)
    release.set_defaults(func=guarded(cmd_release_owner))


def build_parser() -> argparse.ArgumentParser:
    """The registry group alone: ``python -m actionmesh.registry_cli registry ...``."""
    parser = argparse.ArgumentParser(prog="actionmesh", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="mesh data dir")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
