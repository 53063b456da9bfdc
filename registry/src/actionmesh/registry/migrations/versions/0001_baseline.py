"""Baseline: the providers table, as create_all made it.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("provider_id", sa.String(length=63), nullable=False),
        sa.Column("endpoint", sa.String(length=255), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("actions", sa.LargeBinary(), nullable=False),
        sa.Column("lease_id", sa.String(length=32), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("health", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("provider_id"),
    )
    op.create_index("ix_providers_lease_expires_at", "providers", ["lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_providers_lease_expires_at", table_name="providers")
    op.drop_table("providers")
