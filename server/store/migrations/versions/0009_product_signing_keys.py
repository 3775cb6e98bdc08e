"""Products' firmware signing keys in the store: ``product_signing_keys`` and
``product_key_statements``.

Before this revision each node kept the keys in its data directory
(``<data>/keys/product-<id>.ed25519`` and ``product-<id>.statements``), so the nodes of one
installation on a shared database could sign with different keys until the directory was
copied again. The key files are imported into these tables when a server or a key command
first meets them (server.devices.key_import); this revision only creates the tables.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 22:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create both tables (only when missing: a store built by ``create_all`` from a newer
    schema, as tests fabricate old stores, has them already)."""
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("product_signing_keys"):
        op.create_table(
            "product_signing_keys",
            sa.Column("product_id", sa.Integer(), nullable=False),
            sa.Column("key_id", sa.String(length=16), nullable=False),
            sa.Column("public_key", sa.LargeBinary(), nullable=False),
            sa.Column("sealed_private_key", sa.LargeBinary(), nullable=False),
            sa.Column("kek_id", sa.String(length=16), nullable=False),
            sa.Column("is_current", sa.Boolean(), nullable=True),
            sa.Column("withdrawn_sequence", sa.Integer(), nullable=True),
            sa.Column("created_at", sa.BigInteger(), nullable=False),
            sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("product_id", "key_id"),
            sa.UniqueConstraint("product_id", "is_current",
                                name="uq_product_signing_keys_current"),
        )
    if not inspector.has_table("product_key_statements"):
        op.create_table(
            "product_key_statements",
            sa.Column("product_id", sa.Integer(), nullable=False),
            sa.Column("sequence", sa.Integer(), autoincrement=False, nullable=False),
            sa.Column("statement", sa.LargeBinary(), nullable=False),
            sa.Column("created_at", sa.BigInteger(), nullable=False),
            sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("product_id", "sequence"),
        )


def downgrade() -> None:
    """Drop both tables. The keys rotated or created since the upgrade are then lost to
    older servers, which read ``<data>/keys``: export them first."""
    op.drop_table("product_key_statements")
    op.drop_table("product_signing_keys")
