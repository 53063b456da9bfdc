"""Alembic migrations of the auditlog's database (see actionmesh.runtime.migrations)."""
