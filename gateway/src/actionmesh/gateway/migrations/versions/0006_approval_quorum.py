"""executions: approval quorum (approvals needed, roles needed, approvals counted).

Policy (Cedar action ``quorum``, annotations ``@approvers`` / ``@approver_roles``)
decides, when an execution is held for approval, how many distinct approvers it needs
and which roles must be among them. approvals_needed and approver_roles_json keep that;
votes_json the approvals counted so far. Existing rows need one approver, as before.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(
            sa.Column("approvals_needed", sa.Integer(), nullable=False, server_default="1")
        )
        batch.add_column(
            sa.Column("approver_roles_json", sa.Text(), nullable=False, server_default="[]")
        )
        batch.add_column(sa.Column("votes_json", sa.Text(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        for column in ("votes_json", "approver_roles_json", "approvals_needed"):
            batch.drop_column(column)
