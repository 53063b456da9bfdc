"""Alembic migrations of the registry's database (see actionmesh.rpc.migrations)."""
