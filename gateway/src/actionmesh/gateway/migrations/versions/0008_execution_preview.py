"""executions: the preview an execution held for approval was requested with.

preview_payload keeps the provider's preview (an ActionPreview message: the changes,
the effect, warnings and the digest of the state it was computed against) that the
approvers see; the dispatch after approval carries its digest. Empty for executions
whose action has no preview, and for every existing row.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 21:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("preview_payload", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("preview_payload")
