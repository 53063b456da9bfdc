"""executions.dispatch_deadline: when a RUNNING execution's runner must have finished it.

A gateway that stops (or is killed) with executions in flight leaves their rows
RUNNING. With the deadline stored, any replica can tell such an orphan from an
execution another replica is still running, and close it as TIMED_OUT.

Rows written before this revision keep NULL: the gateway falls back to their
dispatch start plus the longest possible run (see gateway.storage.OrphanRule).
The index on (outcome, dispatch_deadline) finds the few RUNNING rows without
scanning the finished ones.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-10 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("dispatch_deadline", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_executions_outcome_deadline", "executions", ["outcome", "dispatch_deadline"]
    )


def downgrade() -> None:
    op.drop_index("ix_executions_outcome_deadline", table_name="executions")
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("dispatch_deadline")
