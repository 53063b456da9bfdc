"""Alembic environment of the gateway: migrations run on the connection the caller passes."""

from actionmesh.gateway.storage import MIGRATIONS
from actionmesh.runtime.migrations import run_env

run_env(MIGRATIONS)
