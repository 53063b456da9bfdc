"""executions.reconcile_*: durable tracking of outcomes that leave open whether the provider acted.

TIMED_OUT executions (orphans closed as GATEWAY_STOPPED included) without a late
result, and PARTIAL ``DOWNSTREAM_OUTCOME_UNKNOWN`` ones, are *unsettled*: the gateway's
reconciler asks their provider (GetExecutionStatus) what became of them. Each row keeps
where that stands (reconcile_state NONE, PENDING, RESOLVED or NEEDS_ATTENTION), how often
it asked (reconcile_attempts), when it asks next (reconcile_next_at), which replica holds
the lease to ask now and until when (reconcile_lease_owner, reconcile_lease_until), and
why the resolved outcome is what it is (resolved_reason). The resolved outcome itself is
late_outcome/late_result_at, as for a late answer. The index on (reconcile_state,
reconcile_next_at) finds the due rows without scanning the settled ones.

Existing unsettled rows are marked PENDING, due now: the reconciler asks about them too.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(
            sa.Column(
                "reconcile_state", sa.String(length=16), nullable=False, server_default="NONE"
            )
        )
        batch.add_column(
            sa.Column("reconcile_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("reconcile_next_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column(
                "reconcile_lease_owner", sa.String(length=128), nullable=False, server_default=""
            )
        )
        batch.add_column(
            sa.Column("reconcile_lease_until", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("resolved_reason", sa.String(length=128), nullable=False, server_default="")
        )
    op.create_index(
        "ix_executions_reconcile_due", "executions", ["reconcile_state", "reconcile_next_at"]
    )
    executions = sa.table(
        "executions",
        sa.column("outcome", sa.String),
        sa.column("reason", sa.String),
        sa.column("late_outcome", sa.String),
        sa.column("finished_at", sa.DateTime(timezone=True)),
        sa.column("reconcile_state", sa.String),
        sa.column("reconcile_next_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        executions.update()
        .where(
            executions.c.late_outcome == "",
            sa.or_(
                executions.c.outcome == "TIMED_OUT",
                sa.and_(
                    executions.c.outcome == "PARTIAL",
                    executions.c.reason == "DOWNSTREAM_OUTCOME_UNKNOWN",
                ),
            ),
        )
        .values(reconcile_state="PENDING", reconcile_next_at=executions.c.finished_at)
    )
    op.execute(
        executions.update()
        .where(executions.c.outcome == "TIMED_OUT", executions.c.late_outcome != "")
        .values(reconcile_state="RESOLVED")
    )


def downgrade() -> None:
    op.drop_index("ix_executions_reconcile_due", table_name="executions")
    with op.batch_alter_table("executions") as batch:
        for column in (
            "resolved_reason",
            "reconcile_lease_until",
            "reconcile_lease_owner",
            "reconcile_next_at",
            "reconcile_attempts",
            "reconcile_state",
        ):
            batch.drop_column(column)
