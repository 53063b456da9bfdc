"""Alembic migrations of the gateway's database (see actionmesh.rpc.migrations)."""
