"""The schema of the last pre-Alembic server (``meta.schema_version`` 8, commit 7d47bd3).

Written from Alembic's autogenerate output against ``schema.py`` at that commit, then
reviewed: index creation as plain ``op.create_index`` (not inside batch blocks), and the
``meta`` row those servers check (they refuse a store whose version is above theirs).
A store such a server wrote is not created by this revision but stamped with it, after
``server.store.migrate`` created what it lacked; see there.

Revision ID: 0001
Revises:
Create Date: 2026-12-07 06:07:08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from alembic.operations import Operations

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Bring the schema up to this revision."""
    create_schema(op)  # type: ignore[arg-type]  # the module proxies an Operations


def create_schema(ops: Operations) -> None:
    """The tables, indexes and meta row through ``ops``: Alembic's ``op`` for a new database;
    for a pre-Alembic store, operations that skip what it has (``server.store.migrate``)."""
    ops.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=True),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    ops.create_index("ix_audit_product", "audit_log", ["product_id", "id"], unique=False)

    ops.create_table(
        "deltas",
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("target_sha256", sa.String(length=64), nullable=False),
        sa.Column("patch_sha256", sa.String(length=64), nullable=False),
        sa.Column("patch_size", sa.Integer(), nullable=False),
        sa.Column("target_size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("base_sha256", "target_sha256"),
    )
    ops.create_table(
        "device_certificates",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("device_id", sa.String(length=24), nullable=False),
        sa.Column("not_after", sa.BigInteger(), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=True),
        sa.Column("first_seen_at", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.Column("revoked_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("sha256"),
    )
    ops.create_index(
        "ix_device_certificates_device", "device_certificates", ["device_id"], unique=False
    )
    ops.create_index(
        "ix_device_certificates_serial", "device_certificates", ["serial"], unique=False
    )

    ops.create_table(
        "device_revocations",
        sa.Column("device_id", sa.String(length=24), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    ops.create_table(
        "event_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("origin", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("product_id", sa.Integer(), nullable=True),
        sa.Column("device_id", sa.String(length=24), nullable=True),
        sa.Column("coreid", sa.String(length=64), nullable=False),
        sa.Column("ttl", sa.Integer(), nullable=False),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("published_at", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    meta = ops.create_table(
        "meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    # What pre-Alembic servers read: version 8 is theirs, so they open this store as one.
    ops.bulk_insert(meta, [{"key": "schema_version", "value": "8"}])
    ops.create_table(
        "oauth_clients",
        sa.Column("client_id", sa.String(length=100), nullable=False),
        sa.Column("secret_hash", sa.String(length=300), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("client_id"),
    )
    ops.create_table(
        "products",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("slug", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("platform_id", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("firmware_updates_forced", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("slug"),
    )
    ops.create_table(
        "system_modules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("platform_id", sa.Integer(), nullable=False),
        sa.Column("module_function", sa.Integer(), nullable=False),
        sa.Column("module_index", sa.Integer(), nullable=False),
        sa.Column("module_version", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("module_info", sa.JSON(), nullable=False),
        sa.Column("uploaded_by", sa.String(length=200), nullable=False),
        sa.Column("uploaded_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "platform_id",
            "module_function",
            "module_index",
            "module_version",
            name="uq_system_module",
        ),
    )
    ops.create_index(
        "ix_system_modules_platform_sha256",
        "system_modules",
        ["platform_id", "sha256"],
        unique=False,
    )

    ops.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("username", sa.String(length=200), nullable=False),
        sa.Column("password_hash", sa.String(length=300), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    ops.create_table(
        "api_users",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("friendly_name", sa.String(length=200), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id"),
    )
    ops.create_index("ix_api_users_product", "api_users", ["product_id"], unique=False)

    ops.create_table(
        "devices",
        sa.Column("id", sa.String(length=24), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("development", sa.Boolean(), nullable=False),
        sa.Column("desired_firmware_version", sa.Integer(), nullable=True),
        sa.Column("flash_requested", sa.Boolean(), nullable=False),
        sa.Column("firmware_updates_forced", sa.Boolean(), nullable=False),
        sa.Column("firmware_updates_enabled", sa.Boolean(), nullable=False),
        sa.Column("updates_pending", sa.Boolean(), nullable=False),
        sa.Column("reset_pending", sa.Boolean(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("session_owner", sa.String(length=96), nullable=True),
        sa.Column("certs_revoked", sa.Boolean(), nullable=False),
        sa.Column("last_ip_address", sa.String(length=64), nullable=True),
        sa.Column("last_handshake_at", sa.BigInteger(), nullable=True),
        sa.Column("last_heard_at", sa.BigInteger(), nullable=True),
        sa.Column("platform_id", sa.Integer(), nullable=True),
        sa.Column("firmware_version", sa.Integer(), nullable=True),
        sa.Column("system_version", sa.Integer(), nullable=True),
        sa.Column("modules", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    ops.create_index("ix_devices_product", "devices", ["product_id", "id"], unique=False)

    ops.create_table(
        "firmware",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("filename", sa.String(length=200), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("platform_id", sa.Integer(), nullable=False),
        sa.Column("module_function", sa.Integer(), nullable=False),
        sa.Column("module_index", sa.Integer(), nullable=False),
        sa.Column("module_version", sa.Integer(), nullable=False),
        sa.Column("module_info", sa.JSON(), nullable=False),
        sa.Column("uploaded_by", sa.String(length=200), nullable=False),
        sa.Column("uploaded_at", sa.BigInteger(), nullable=False),
        sa.Column("running_seen_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("product_id", "version", name="uq_firmware_product_version"),
    )
    ops.create_index(
        "ix_firmware_product_sha256", "firmware", ["product_id", "sha256"], unique=False
    )

    ops.create_table(
        "firmware_transfer_bytes",
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("bytes_sent", sa.BigInteger(), nullable=False),
        sa.Column("bytes_full", sa.BigInteger(), nullable=False),
        sa.Column("delta_transfers", sa.Integer(), nullable=False),
        sa.Column("full_transfers", sa.Integer(), nullable=False),
        sa.Column("compressed_transfers", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("product_id", "version"),
    )
    ops.create_table(
        "groups",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("color", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("product_id", "name", name="uq_groups_product_name"),
    )
    ops.create_table(
        "product_members",
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("invited_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("product_id", "user_id"),
    )
    ops.create_index("ix_product_members_user", "product_members", ["user_id"], unique=False)

    ops.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("immediate", sa.Boolean(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("criteria", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("state_data", sa.JSON(), nullable=False),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    ops.create_index(
        "ix_rollouts_product_version", "rollouts", ["product_id", "version"], unique=False
    )

    ops.create_table(
        "tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("client_id", sa.String(length=100), nullable=True),
        sa.Column("pair_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    ops.create_table(
        "device_flashes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=24), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(length=200), nullable=False),
        sa.Column("module_info", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("requested_at", sa.BigInteger(), nullable=False),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    ops.create_index(
        "ix_device_flashes_device", "device_flashes", ["device_id", "status"], unique=False
    )

    ops.create_table(
        "device_groups",
        sa.Column("device_id", sa.String(length=24), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id", "group_id"),
    )
    ops.create_index("ix_device_groups_group", "device_groups", ["group_id"], unique=False)

    ops.create_table(
        "device_ota_memory",
        sa.Column("device_id", sa.String(length=24), nullable=False),
        sa.Column("updating_sha256", sa.String(length=64), nullable=True),
        sa.Column("delivered_sha256", sa.String(length=64), nullable=True),
        sa.Column("delivered_final", sa.Boolean(), nullable=False),
        sa.Column("delivered_awaited", sa.Boolean(), nullable=False),
        sa.Column("refused", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id"),
    )
    ops.create_table(
        "device_updates",
        sa.Column("device_id", sa.String(length=24), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("transfer", sa.String(length=8), nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id"),
    )
    ops.create_table(
        "maintenance_windows",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=True),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("duration_minutes", sa.Integer(), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("product_id", "scope", name="uq_maintenance_windows_product_scope"),
    )
    ops.create_table(
        "releases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("intelligent", sa.Boolean(), nullable=False),
        sa.Column("released_at", sa.BigInteger(), nullable=False),
        sa.Column("released_by", sa.String(length=200), nullable=False),
        sa.Column("devices_started", sa.Integer(), nullable=False),
        sa.Column("devices_succeeded", sa.Integer(), nullable=False),
        sa.Column("devices_failed", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("product_id", "scope", name="uq_releases_product_scope"),
    )
    ops.create_table(
        "rollout_device_outcomes",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=24), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=24), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("held_until", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    ops.create_index(
        "ix_rollout_device_outcomes_device", "rollout_device_outcomes", ["device_id"], unique=False
    )

    ops.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    ops.create_index(
        "ix_rollout_events_rollout", "rollout_events", ["rollout_id", "id"], unique=False
    )


def downgrade() -> None:
    """Undo :func:`upgrade`."""
    op.drop_index("ix_rollout_events_rollout", table_name="rollout_events")
    op.drop_table("rollout_events")
    op.drop_index("ix_rollout_device_outcomes_device", table_name="rollout_device_outcomes")
    op.drop_table("rollout_device_outcomes")
    op.drop_table("releases")
    op.drop_table("maintenance_windows")
    op.drop_table("device_updates")
    op.drop_table("device_ota_memory")
    op.drop_index("ix_device_groups_group", table_name="device_groups")
    op.drop_table("device_groups")
    op.drop_index("ix_device_flashes_device", table_name="device_flashes")
    op.drop_table("device_flashes")
    op.drop_table("tokens")
    op.drop_index("ix_rollouts_product_version", table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_index("ix_product_members_user", table_name="product_members")
    op.drop_table("product_members")
    op.drop_table("groups")
    op.drop_table("firmware_transfer_bytes")
    op.drop_index("ix_firmware_product_sha256", table_name="firmware")
    op.drop_table("firmware")
    op.drop_index("ix_devices_product", table_name="devices")
    op.drop_table("devices")
    op.drop_index("ix_api_users_product", table_name="api_users")
    op.drop_table("api_users")
    op.drop_table("users")
    op.drop_index("ix_system_modules_platform_sha256", table_name="system_modules")
    op.drop_table("system_modules")
    op.drop_table("products")
    op.drop_table("oauth_clients")
    op.drop_table("meta")
    op.drop_table("event_log")
    op.drop_table("device_revocations")
    op.drop_index("ix_device_certificates_serial", table_name="device_certificates")
    op.drop_index("ix_device_certificates_device", table_name="device_certificates")
    op.drop_table("device_certificates")
    op.drop_table("deltas")
    op.drop_index("ix_audit_product", table_name="audit_log")
    op.drop_table("audit_log")
