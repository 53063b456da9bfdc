"""Alembic environment of the registry: migrations run on the connection the caller passes."""

from actionmesh.rpc.migrations import run_env

run_env("registry")
