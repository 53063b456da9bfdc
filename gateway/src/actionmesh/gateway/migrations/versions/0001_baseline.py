"""Baseline: executions, the audit outbox and parked events, as create_all made them.

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
        "audit_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_outbox_parked",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "executions",
        sa.Column("execution_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("action_id", sa.String(length=128), nullable=False),
        sa.Column("provider_id", sa.String(length=128), nullable=False),
        sa.Column("record_type", sa.String(length=128), nullable=False),
        sa.Column("record_id", sa.String(length=256), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=128), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("external_ref", sa.String(length=512), nullable=False),
        sa.Column("changes_json", sa.Text(), nullable=False),
        sa.Column("warnings_json", sa.Text(), nullable=False),
        sa.Column("trace_id", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request_payload", sa.LargeBinary(), nullable=False),
        sa.Column("requester_roles_json", sa.Text(), nullable=False),
        sa.Column("sensitive", sa.Boolean(), nullable=False),
        sa.Column("approval_state", sa.String(length=16), nullable=False),
        sa.Column("approval_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("approval_decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("approver", sa.String(length=256), nullable=False),
        sa.Column("approval_comment", sa.Text(), nullable=False),
        sa.Column("late_outcome", sa.String(length=32), nullable=False),
        sa.Column("late_result_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("execution_id"),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_execution_key"),
    )
    op.create_index("ix_executions_approval_state", "executions", ["approval_state"])
    op.create_index("ix_executions_tenant", "executions", ["tenant"])


def downgrade() -> None:
    op.drop_index("ix_executions_tenant", table_name="executions")
    op.drop_index("ix_executions_approval_state", table_name="executions")
    op.drop_table("executions")
    op.drop_table("audit_outbox_parked")
    op.drop_table("audit_outbox")
