"""executions.facts_payload: the record facts an execution was authorized on.

The gateway no longer governs on what a caller claims about a record: it asks the
record type's system of record (or takes a trusted caller's word, or marks the
facts unverified). Each execution keeps the facts it was authorized on, and who
vouched for them, as a serialized ``actionmesh.v1.RecordFacts``, so GetExecution
and ``actionmesh execution`` show them next to the outcome.

Rows written before this revision keep NULL (no facts recorded).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("facts_payload", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("facts_payload")
