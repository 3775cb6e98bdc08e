"""How each device update ended: the ``device_update_results`` table (issue 17).

A release's live view shows its failures with their reasons and its update-latency curve
(time from the release to each device's success); the server records one row per success or
failure from this revision on. Updates that ended before it have no rows: their devices
count as updated (they report the version) but add no latency point.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table and its indexes (only when missing: a store built by ``create_all``
    from a newer schema, as tests fabricate old stores, has it already)."""
    if sa.inspect(op.get_bind()).has_table("device_update_results"):
        return
    op.create_table(
        "device_update_results",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=24), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("result", sa.String(length=8), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("transfer", sa.String(length=8), nullable=True),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("finished_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_device_update_results_version", "device_update_results",
                    ["product_id", "version", "device_id"], unique=False)
    op.create_index("ix_device_update_results_device", "device_update_results",
                    ["device_id", "id"], unique=False)


def downgrade() -> None:
    """Drop the table (its indexes go with it)."""
    op.drop_index("ix_device_update_results_device", table_name="device_update_results")
    op.drop_index("ix_device_update_results_version", table_name="device_update_results")
    op.drop_table("device_update_results")
