"""Alembic environment of the store: run by :mod:`server.store.migrate`, never by ``alembic.ini``.

The caller hands over an open connection, inside the transaction that holds the migration
lock (``config.attributes["connection"]``), so stamping and upgrading join that transaction.
Batch mode (``render_as_batch``) makes autogenerate write ALTERs SQLite can run (it copies
the table), https://alembic.sqlalchemy.org/en/latest/batch.html.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo

from server.store import schema

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the store's migrations run through server.store.migrate (ota admin migrate), "
        "which passes a connection; there is no alembic.ini"
    )
applied: list[str] = config.attributes.setdefault("applied", [])


def _note_applied(
    ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any],
    run_args: Mapping[str, Any],
) -> None:
    """Remember each revision applied (for the report and ``ota admin migrate``)."""
    if step.is_upgrade and not step.is_stamp and step.up_revision_id is not None:
        applied.append(step.up_revision_id)


context.configure(
    connection=connection,
    target_metadata=schema.metadata,
    render_as_batch=True,
    compare_type=True,
    on_version_apply=_note_applied,
)
# The caller's transaction is open: Alembic joins it instead of beginning its own.
with context.begin_transaction():
    context.run_migrations()
