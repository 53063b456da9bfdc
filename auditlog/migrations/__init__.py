"""Alembic migrations of the auditlog's database (see actionmesh.rpc.migrations)."""
