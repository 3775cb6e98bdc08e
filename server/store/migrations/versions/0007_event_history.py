"""The stored event history: the ``event_history`` table (issue 17).

The console's device page and events page show a device's and a product's recent events
after a reload; the relay's ``event_log`` keeps them only for minutes. Events published
before this revision are not in the history.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 10:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table and its indexes (only when missing: a store built by ``create_all``
    from a newer schema, as tests fabricate old stores, has it already)."""
    if sa.inspect(op.get_bind()).has_table("event_history"):
        return
    op.create_table(
        "event_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("data_cut", sa.Boolean(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=True),
        sa.Column("device_id", sa.String(length=24), nullable=True),
        sa.Column("coreid", sa.String(length=64), nullable=False),
        sa.Column("ttl", sa.Integer(), nullable=False),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("published_at", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_event_history_device", "event_history", ["device_id", "product_id", "id"],
                    unique=False)
    op.create_index("ix_event_history_product", "event_history", ["product_id", "id"],
                    unique=False)
    op.create_index("ix_event_history_published", "event_history", ["published_at"],
                    unique=False)


def downgrade() -> None:
    """Drop the table (its indexes go with it)."""
    op.drop_index("ix_event_history_published", table_name="event_history")
    op.drop_index("ix_event_history_product", table_name="event_history")
    op.drop_index("ix_event_history_device", table_name="event_history")
    op.drop_table("event_history")
