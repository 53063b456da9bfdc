"""Alembic environment of the auditlog: migrations run on the connection the caller passes."""

from actionmesh.auditlog.storage import MIGRATIONS
from actionmesh.runtime.migrations import run_env

run_env(MIGRATIONS)
