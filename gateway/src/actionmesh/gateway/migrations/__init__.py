"""Alembic migrations of the gateway's database (see actionmesh.runtime.migrations)."""
