"""64-bit ids for the append-only logs (audit_log, event_log, rollout_events) on PostgreSQL.

A 32-bit serial runs out after 2**31 rows: the event log, which every node appends to, would
reach that in about 25 days at 1,000 events/s. On SQLite nothing changes: an INTEGER PRIMARY
KEY is the table's 64-bit rowid already (schema.py gives it that exact type there).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 07:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LOG_TABLES = ("audit_log", "event_log", "rollout_events")


def upgrade() -> None:
    """Widen the ids (and their sequences) on PostgreSQL."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in LOG_TABLES:
        op.alter_column(table, "id", existing_type=sa.Integer(), type_=sa.BigInteger(),
                        existing_nullable=False)
        # A serial's sequence is created AS integer (max 2**31-1): widen it too.
        op.execute(sa.text(f"ALTER SEQUENCE IF EXISTS {table}_id_seq AS bigint"))
