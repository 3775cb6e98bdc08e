"""Each server process renews its session leases reading only its own rows: index
``ix_devices_session_node_owner`` on ``devices (session_node, session_owner)`` replaces
``ix_devices_session_node``, and on PostgreSQL ``devices.session_owner`` is ordered by bytes
(collation "C").

Since every process of a node (main and each ``--workers`` worker) renews only its own
sessions' leases, by node and by the owner's "<process origin>/" prefix, the index on the
node alone made each of a node's K processes read every row the node holds, K times the
node's sessions per renewal period. A process now reads the owner range ``["<origin>/",
"<origin>0")`` of the new index (server.store.tx_fleet.session_owner_range), which needs
the owners in byte order: SQLite's default BINARY collation is; a PostgreSQL database's
default collation may not be (a language collation can ignore the "/"), hence "C" on that
column, which names opaque tokens and is only compared for equality elsewhere.

On PostgreSQL the collation change rewrites no rows (only the column's catalogue entry; no
index held the column yet); building the index reads the table once and holds off writes to
``devices`` meanwhile (the whole revision took 0.3 s on 200,000 devices here, on either
backend: bench/store/renewal_scan.py). On SQLite only the indexes change.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 23:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

NEW_INDEX = "ix_devices_session_node_owner"
OLD_INDEX = "ix_devices_session_node"


def _set_owner_collation(collation: str) -> None:
    """PostgreSQL only: ``devices.session_owner`` in ``collation`` (its type unchanged)."""
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("devices", "session_owner",
                        type_=sa.String(length=96, collation=collation),
                        existing_type=sa.String(length=96), existing_nullable=True)


def upgrade() -> None:
    """Owners in byte order, then the new index for the old one (each only when needed: a
    store built by ``create_all`` from a newer schema, as tests fabricate old stores, has
    the new index already and not the old)."""
    indexes = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("devices")}
    _set_owner_collation("C")  # before the index, which takes the column's collation
    if NEW_INDEX not in indexes:
        op.create_index(NEW_INDEX, "devices", ["session_node", "session_owner"], unique=False)
    if OLD_INDEX in indexes:
        op.drop_index(OLD_INDEX, table_name="devices")


def downgrade() -> None:
    """The index on the node alone again, and the database's default collation."""
    op.create_index(OLD_INDEX, "devices", ["session_node"], unique=False)
    op.drop_index(NEW_INDEX, table_name="devices")
    _set_owner_collation("default")
