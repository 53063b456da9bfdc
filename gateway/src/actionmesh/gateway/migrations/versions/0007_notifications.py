"""notifications: the notification outbox (deliveries to webhooks) and its attempts.

notification_outbox holds one row per (audit event, subscription that wants it),
inserted in the transaction that writes the event: its CloudEvent body (payload), its
state (PENDING, DELIVERED, FAILED), attempts and next attempt, the lease of the
replica delivering it, and the last answer. notification_attempts logs every attempt.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 20:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notification_outbox",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("subscription_id", sa.String(length=128), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("execution_id", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_notification_due", "notification_outbox", ["state", "next_attempt_at"])
    op.create_index("ix_notification_tenant", "notification_outbox", ["tenant", "id"])
    op.create_table(
        "notification_attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("delivered", sa.Boolean(), nullable=False),
    )
    op.create_index(
        "ix_notification_attempts_delivery_id", "notification_attempts", ["delivery_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_notification_attempts_delivery_id", table_name="notification_attempts")
    op.drop_table("notification_attempts")
    op.drop_index("ix_notification_tenant", table_name="notification_outbox")
    op.drop_index("ix_notification_due", table_name="notification_outbox")
    op.drop_table("notification_outbox")
