"""The console's device list and device page: each device's last update outcome, and the
indexes of the version filter and of a device's audit history.

``devices.last_update_status`` / ``last_update_error`` / ``last_update_at`` record how the
device's last update ended ("started", "succeeded", "failed" with the device's reason), so
that "failed" is a filter of the device list (server.store.device_status) and the device
page shows the reason. Devices from before this revision have none (NULL).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns and the indexes (each only when missing: a store built by
    ``create_all`` from a newer schema, as tests fabricate old stores, has them already)."""
    inspector = sa.inspect(op.get_bind())
    columns = {column["name"] for column in inspector.get_columns("devices")}
    indexes = {index["name"] for index in inspector.get_indexes("devices")}
    with op.batch_alter_table("devices") as batch:
        if "last_update_status" not in columns:
            batch.add_column(sa.Column("last_update_status", sa.String(16), nullable=True))
        if "last_update_error" not in columns:
            batch.add_column(sa.Column("last_update_error", sa.Text(), nullable=True))
        if "last_update_at" not in columns:
            batch.add_column(sa.Column("last_update_at", sa.BigInteger(), nullable=True))
        if "ix_devices_product_version" not in indexes:
            batch.create_index("ix_devices_product_version", ["product_id", "firmware_version"],
                               unique=False)
    if "ix_audit_target" not in {index["name"] for index in inspector.get_indexes("audit_log")}:
        op.create_index("ix_audit_target", "audit_log", ["target", "id"], unique=False)


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_audit_target", table_name="audit_log")
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_product_version")
        batch.drop_column("last_update_at")
        batch.drop_column("last_update_error")
        batch.drop_column("last_update_status")
