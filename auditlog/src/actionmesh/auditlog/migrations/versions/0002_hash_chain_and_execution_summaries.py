"""Per-tenant hash chain on audit_events; chain heads; execution summaries.

Events stored before this revision are linked into their tenant's chain in
store order, and folded into summaries, so an upgraded audit log verifies and
answers ListExecutionSummaries for its whole history. The hash is the
documented, versioned encoding of :mod:`auditlog.chain` ("v1"), which never
changes once released; the summary fold is derived data and can be rebuilt.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from actionmesh.auditlog.chain import GENESIS_HASH, link_hash
from actionmesh.auditlog.summaries import SUMMARY_FIELDS, Summary, fold
from actionmesh.runtime.db import UTCDateTime
from actionmesh.v1 import audit_pb2

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("chain_index", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("chain_hash", sa.String(length=64), nullable=True))
    heads = op.create_table(
        "audit_chain_heads",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("head_index", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("tenant", name="pk_audit_chain_heads"),
    )
    summaries = op.create_table(
        "audit_executions",
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("execution_id", sa.String(length=128), nullable=False),
        sa.Column("first_sequence", sa.BigInteger(), nullable=False),
        sa.Column("record_type", sa.String(length=128), nullable=False),
        sa.Column("record_id", sa.String(length=256), nullable=False),
        sa.Column("action_id", sa.Text(), nullable=False),
        sa.Column("provider_id", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("approver", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("external_ref", sa.Text(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("trace_id", sa.String(length=64), nullable=False),
        sa.Column("late_outcome", sa.String(length=64), nullable=False),
        sa.Column("last_event_type", sa.String(length=64), nullable=False),
        sa.Column("last_event_at", UTCDateTime(), nullable=True),
        sa.Column("state_at", UTCDateTime(), nullable=True),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "execution_id", name="pk_audit_executions"),
    )
    for name, columns in (
        ("ix_audit_executions_recent", ["tenant", "first_sequence"]),
        ("ix_audit_executions_actor", ["tenant", "actor"]),
        ("ix_audit_executions_approver", ["tenant", "approver"]),
        ("ix_audit_executions_action", ["tenant", "action_id"]),
        ("ix_audit_executions_record", ["tenant", "record_type", "record_id"]),
    ):
        op.create_index(name, "audit_executions", columns, unique=False)

    _backfill(heads, summaries)

    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("chain_index", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("chain_hash", existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint(
            "uq_audit_events_tenant_chain_index", ["tenant", "chain_index"]
        )


def _backfill(heads: sa.Table, summaries_table: sa.Table) -> None:
    """Link every stored event in store order and fold it into its execution's summary."""
    bind = op.get_bind()
    events = sa.table(
        "audit_events",
        sa.column("sequence", sa.BigInteger()),
        sa.column("tenant", sa.String()),
        sa.column("payload", sa.LargeBinary()),
        sa.column("chain_index", sa.BigInteger()),
        sa.column("prev_hash", sa.String()),
        sa.column("chain_hash", sa.String()),
    )
    chain_heads: dict[str, tuple[int, str]] = {}
    summaries: dict[tuple[str, str], Summary] = {}
    after = 0
    while True:
        rows = bind.execute(
            sa.select(events.c.sequence, events.c.tenant, events.c.payload)
            .where(events.c.sequence > after)
            .order_by(events.c.sequence)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        for sequence, tenant, payload in rows:
            index, prev = chain_heads.get(tenant, (0, GENESIS_HASH))
            current = link_hash(tenant, index + 1, prev, payload)
            bind.execute(
                events.update()
                .where(events.c.sequence == sequence)
                .values(chain_index=index + 1, prev_hash=prev, chain_hash=current)
            )
            chain_heads[tenant] = (index + 1, current)
            event = audit_pb2.AuditEvent.FromString(payload)
            if event.execution_id:
                key = (tenant, event.execution_id)
                summary = summaries.setdefault(key, Summary(tenant, event.execution_id, sequence))
                fold(summary, event, sequence)
        after = rows[-1][0]
    if chain_heads:
        bind.execute(
            heads.insert(),
            [
                {"tenant": tenant, "head_index": index, "head_hash": head}
                for tenant, (index, head) in chain_heads.items()
            ],
        )
    if summaries:
        bind.execute(
            summaries_table.insert(),
            [
                {
                    "tenant": summary.tenant,
                    "execution_id": summary.execution_id,
                    **{name: getattr(summary, name) for name in SUMMARY_FIELDS},
                }
                for summary in summaries.values()
            ],
        )


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_constraint("uq_audit_events_tenant_chain_index", type_="unique")
        batch.drop_column("chain_hash")
        batch.drop_column("prev_hash")
        batch.drop_column("chain_index")
    op.drop_table("audit_executions")
    op.drop_table("audit_chain_heads")
