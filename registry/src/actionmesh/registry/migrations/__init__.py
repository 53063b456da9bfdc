"""Alembic migrations of the registry's database (see actionmesh.runtime.migrations)."""
