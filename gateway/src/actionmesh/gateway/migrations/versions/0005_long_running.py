"""executions: long-running actions (accepted, progress, run deadline, cancel).

An execution of a long-running action whose provider answered ACCEPTED stays ACCEPTED
while the gateway follows it (reconcile_state PENDING, asked every poll interval):
accepted_at is when the provider accepted it, run_deadline when it must have finished
(past it: TIMED_OUT MAX_DURATION_EXCEEDED), progress_payload the provider's last
ExecutionProgress (serialized), and cancel_requested_by/at/comment who asked to stop it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("run_deadline", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("progress_payload", sa.LargeBinary(), nullable=True))
        batch.add_column(
            sa.Column(
                "cancel_requested_by", sa.String(length=256), nullable=False, server_default=""
            )
        )
        batch.add_column(
            sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("cancel_comment", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        for column in (
            "cancel_comment",
            "cancel_requested_at",
            "cancel_requested_by",
            "progress_payload",
            "run_deadline",
            "accepted_at",
        ):
            batch.drop_column(column)
