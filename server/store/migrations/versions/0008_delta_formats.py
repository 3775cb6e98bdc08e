"""Delta patches per format version: ``deltas.format_version`` joins the primary key.

A device's Hello names the newest delta patch format its applier reads (``delta_format``;
otacore.messages.Hello), and the server makes each pair's patch for the newest format both
it and the device allow. Devices of one fleet may run appliers of different versions, so one
pair may have a patch per format version; before this revision it had one. Rows from before
are taken as made for version 4, the newest format before devices named theirs (the patch
may be older, which every version 4 applier reads; server.devices.deltas checks the patch's
own header before it sends one).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 19:15:00
"""

from __future__ import annotations

import warnings

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_PAIR = ["base_sha256", "target_sha256"]


def upgrade() -> None:
    """Add the column and widen the primary key (only when missing: a store built by
    ``create_all`` from a newer schema, as tests fabricate old stores, has it already)."""
    bind = op.get_bind()
    if "format_version" in {c["name"] for c in sa.inspect(bind).get_columns("deltas")}:
        return
    column = sa.Column("format_version", sa.Integer(), nullable=False, server_default="4")
    if bind.dialect.name == "postgresql":
        op.add_column("deltas", column)
        op.drop_constraint("deltas_pkey", "deltas", type_="primary")
        op.create_primary_key("deltas_pkey", "deltas", [*_PAIR, "format_version"])
        return
    # SQLite cannot alter a primary key: batch mode rebuilds the table (a copy of its rows).
    # Alembic warns that the rebuilt table's key differs from the reflected one, which is
    # the point of the rebuild.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*specifies columns .* as primary_key=True")
        with op.batch_alter_table("deltas", recreate="always") as batch:
            batch.add_column(column)
            batch.create_primary_key("pk_deltas", [*_PAIR, "format_version"])


def downgrade() -> None:
    """Keep one patch per pair (the newest format's) and drop the column."""
    bind = op.get_bind()
    op.execute(sa.text(
        "DELETE FROM deltas WHERE format_version < (SELECT MAX(d.format_version) FROM deltas d "
        "WHERE d.base_sha256 = deltas.base_sha256 AND d.target_sha256 = deltas.target_sha256)"
    ))
    if bind.dialect.name == "postgresql":
        op.drop_constraint("deltas_pkey", "deltas", type_="primary")
        op.create_primary_key("deltas_pkey", "deltas", _PAIR)
        op.drop_column("deltas", "format_version")
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*specifies columns .* as primary_key=True")
        with op.batch_alter_table("deltas", recreate="always") as batch:
            batch.drop_column("format_version")
            batch.create_primary_key("pk_deltas", _PAIR)
