"""Session leases on devices and named leases of once-per-installation jobs (issue 16 item 3).

``devices.session_node`` and ``devices.session_lease_until`` make a device's session a lease
with an expiry: several nodes share the store, and a node that dies leaves leases that expire
instead of devices "online" forever. The ``leases`` table holds the named leases of jobs only
one node of the installation runs (rollout ticks, event log pruning, the sweeper of expired
session leases).

Devices marked online by a server older than this revision have a session owner but no
lease: no live session can renew one, so the sweeper takes them for expired (and a server on
the embedded store marks every device offline at its start anyway). The upgrade itself only
changes the schema.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 07:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the lease columns, their index and the leases table (each only when missing: a
    store built by ``create_all`` from a newer schema, as tests fabricate old stores, has
    them already)."""
    inspector = sa.inspect(op.get_bind())
    columns = {column["name"] for column in inspector.get_columns("devices")}
    indexes = {index["name"] for index in inspector.get_indexes("devices")}
    with op.batch_alter_table("devices") as batch:
        if "session_node" not in columns:
            batch.add_column(sa.Column("session_node", sa.String(length=64), nullable=True))
        if "session_lease_until" not in columns:
            batch.add_column(sa.Column("session_lease_until", sa.BigInteger(), nullable=True))
        if "ix_devices_session_node" not in indexes:
            batch.create_index("ix_devices_session_node", ["session_node"], unique=False)
    if not inspector.has_table("leases"):
        op.create_table(
            "leases",
            sa.Column("name", sa.String(length=64), nullable=False),
            sa.Column("holder", sa.String(length=96), nullable=False),
            sa.Column("expires_at", sa.BigInteger(), nullable=False),
            sa.Column("taken_at", sa.BigInteger(), nullable=False),
            sa.PrimaryKeyConstraint("name"),
        )


def downgrade() -> None:
    """Drop the leases table and the lease columns."""
    op.drop_table("leases")
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_session_node")
        batch.drop_column("session_lease_until")
        batch.drop_column("session_node")
