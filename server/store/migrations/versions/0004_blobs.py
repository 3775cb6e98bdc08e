"""Blobs in the database: ``blobs`` and ``blob_chunks`` (server.store.db_blobs).

On PostgreSQL the store keeps firmware blobs in these tables, so the nodes of an installation
share nothing but the database; SQLite keeps its blob directory and leaves them empty. The
chunks' bytes are stored out of line and uncompressed on PostgreSQL (STORAGE EXTERNAL,
https://www.postgresql.org/docs/current/storage-toast.html): firmware does not compress, and
an uncompressed value is read without a decompression pass.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 07:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the blob tables."""
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("chunk_size", sa.Integer, nullable=False),
        sa.Column("stored_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "blob_chunks",
        sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), primary_key=True),
        sa.Column("n", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.text("ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL"))


def downgrade() -> None:
    """Drop the blob tables (their blobs with them)."""
    op.drop_table("blob_chunks")
    op.drop_table("blobs")
