"""What a store written by a server from before Alembic lacks: the tables that revisions
after the baseline (0001, schema version 8) create. Tests that fabricate such a store from
a current one (dropping ``alembic_version``) drop these too, since no pre-Alembic server
ever had them and the upgrade creates them."""

from __future__ import annotations

import functools

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from server.store import migrate, schema


@functools.cache
def tables_after_baseline() -> tuple[str, ...]:
    """Tables of ``schema.py`` the baseline revision does not create, children first."""
    engine = sa.create_engine("sqlite://")
    try:
        with engine.begin() as conn:
            with Operations.context(MigrationContext.configure(conn)):
                migrate.script_directory().get_revision(
                    migrate.BASELINE_REVISION).module.upgrade()
            baseline = set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    return tuple(table.name for table in reversed(schema.metadata.sorted_tables)
                 if table.name not in baseline)


def drop_tables_after_baseline(conn: Connection) -> None:
    """Drop from a store the tables no pre-Alembic server had."""
    for table in tables_after_baseline():
        conn.exec_driver_sql(f"DROP TABLE {table}")
