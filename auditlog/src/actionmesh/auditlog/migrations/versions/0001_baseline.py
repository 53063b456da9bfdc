"""Baseline: the audit_events table, as create_all made it.

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
        "audit_events",
        # BIGINT on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the rowid.
        sa.Column(
            "sequence",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("record_type", sa.String(length=128), nullable=False),
        sa.Column("record_id", sa.String(length=256), nullable=False),
        sa.Column("execution_id", sa.String(length=128), nullable=False),
        sa.Column("action_id", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trace_id", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sequence", name="pk_audit_events"),
        sa.UniqueConstraint("event_id", name="uq_audit_events_event_id"),
        # Never reuse a deleted sequence number on SQLite; PostgreSQL ignores it.
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_audit_events_execution", "audit_events", ["tenant", "execution_id"], unique=False
    )
    op.create_index(
        "ix_audit_events_record",
        "audit_events",
        ["tenant", "record_type", "record_id", "sequence"],
        unique=False,
    )
    op.create_index("ix_audit_events_trace", "audit_events", ["tenant", "trace_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_events_trace", table_name="audit_events")
    op.drop_index("ix_audit_events_record", table_name="audit_events")
    op.drop_index("ix_audit_events_execution", table_name="audit_events")
    op.drop_table("audit_events")
