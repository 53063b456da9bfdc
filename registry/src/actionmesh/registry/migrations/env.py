"""Alembic environment of the registry: migrations run on the connection the caller passes."""

from actionmesh.registry.storage import MIGRATIONS
from actionmesh.runtime.migrations import run_env

run_env(MIGRATIONS)
