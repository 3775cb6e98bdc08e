"""Schema migrations of the store: Alembic revisions in ``server/store/migrations``, for SQLite
and PostgreSQL alike, run in place when a server (or ``ota admin migrate``) opens the store.

How a database is brought to the head revision (:func:`upgrade`), in ONE transaction that
first takes the migration lock, so several nodes starting at once never migrate together and
the later ones find the schema current:

- PostgreSQL: ``pg_advisory_xact_lock`` (held until the transaction ends,
  https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-ADVISORY-LOCKS);
- SQLite: ``BEGIN IMMEDIATE``, the database's write lock (https://sqlite.org/lang_transaction.html).

Then, by what the database holds:

- nothing: ``upgrade head`` (revision 0001 creates the tables);
- a store of a pre-Alembic server (a ``meta`` table with ``schema_version`` 1..8 and no
  ``alembic_version``): the tables and indexes it lacks are created as revision 0001 has them,
  the hand-written steps of those servers (:func:`_legacy_steps`) bring it to version 8, then
  it is stamped 0001 and upgraded to head;
- a revision this code does not know, or a ``schema_version`` above
  :data:`~server.store.schema.SCHEMA_VERSION`: refused (:class:`SchemaVersionError`), since
  a newer server wrote it.

SQLite cannot ALTER most things: a batch-mode revision copies the table and drops the old
one, and with foreign keys on that DROP would run the ``ON DELETE CASCADE`` actions
(https://sqlite.org/foreignkeys.html#fk_schemacommands). So while revisions run, foreign keys
are off on that connection and ``PRAGMA foreign_key_check`` must find nothing before the
commit (the procedure of https://sqlite.org/lang_altertable.html#otheralter).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from server.store import schema
from server.store.errors import SchemaVersionError, StoreError
from server.store.sqlite import WRITE_OPTION

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

log = logging.getLogger("ota.store")
# Alembic says "Context impl SQLiteImpl." and the like at INFO on every open; the store
# logs what it did itself (below), so only Alembic's warnings reach the server's log.
logging.getLogger("alembic").setLevel(logging.WARNING)

#: The revision that is the schema of the last pre-Alembic server (``schema_version`` 8).
BASELINE_REVISION = "0001"

#: ``meta.schema_version`` the pre-Alembic servers' own upgrade steps end at.
LEGACY_FINAL = 8

#: Key of the PostgreSQL advisory lock the upgrade holds (any constant bigint shared by every
#: node; this one is b"otaschem" read as a big-endian integer).
PG_MIGRATION_LOCK_KEY = int.from_bytes(b"otaschem", "big") - 2**63


class MigrationError(StoreError):
    """A migration could not run; nothing was changed (the transaction rolled back)."""


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database stands against this code's migrations."""

    #: Revisions stamped in ``alembic_version`` (empty: none, fresh or pre-Alembic).
    current: tuple[str, ...]
    #: This code's head revision.
    head: str
    #: ``meta.schema_version`` (None: no meta table or row), the version pre-Alembic servers
    #: check: 8 once migrated, higher after a revision older servers must not open.
    meta_version: int | None
    #: True when the database has none of the store's tables.
    empty: bool

    @property
    def legacy_version(self) -> int | None:
        """The schema version of a pre-Alembic store (no revision stamped yet), else None."""
        return None if self.current else self.meta_version

    @property
    def pending(self) -> bool:
        """True when :func:`upgrade` would change the database."""
        legacy_steps_due = self.meta_version is not None and self.meta_version < LEGACY_FINAL
        return self.current != (self.head,) or legacy_steps_due

    def describe_current(self) -> str:
        """The current state in words (for ``ota admin migrate``)."""
        if self.empty:
            return "none (no store yet)"
        if not self.current:
            return f"none (a pre-Alembic store, schema version {self.legacy_version})"
        return ", ".join(self.current)


@dataclass
class MigrationReport:
    """What :func:`upgrade` found and did."""

    before: SchemaStatus
    #: Revisions applied, oldest first (empty when the schema was current).
    applied: list[str] = field(default_factory=list)
    #: The pre-Alembic ``schema_version`` the legacy steps started from (None: not run).
    legacy_from: int | None = None

    def describe(self) -> str:
        """What was done, in words (for the log and ``ota admin migrate``)."""
        done = []
        if self.legacy_from is not None:
            done.append(f"pre-Alembic steps from schema version {self.legacy_from} to "
                        f"{LEGACY_FINAL}")
        if not self.before.current and not self.before.empty:
            done.append(f"stamped revision {BASELINE_REVISION} on the pre-Alembic store")
        if self.applied:
            done.append("applied revision(s) " + ", ".join(self.applied))
        return "; ".join(done) or "nothing to do"


@functools.cache
def script_directory() -> ScriptDirectory:
    """The packaged revisions (parsed once per process)."""
    return ScriptDirectory.from_config(_config())


def _config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code (no alembic.ini): the packaged scripts and, to
    run them on, ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """This code's head revision (one line of history: a branch is a mistake)."""
    heads = script_directory().get_heads()
    if len(heads) != 1:
        raise MigrationError(
            f"the packaged migrations have {len(heads)} heads ({', '.join(heads)}); "
            "merge them with a revision that names both as down_revision"
        )
    return heads[0]


def status(conn: Connection) -> SchemaStatus:
    """Where the database behind ``conn`` stands (reads only)."""
    tables = set(sa.inspect(conn).get_table_names())
    current = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
    meta_version: int | None = None
    if "meta" in tables:
        value = conn.execute(
            sa.text("SELECT value FROM meta WHERE key = 'schema_version'")
        ).scalar()
        meta_version = None if value is None else _schema_version(value)
    ours = {table.name for table in schema.metadata.sorted_tables}
    return SchemaStatus(current, head_revision(), meta_version, empty=not (tables & ours))


def _schema_version(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise SchemaVersionError(
            f"the store's meta.schema_version is {value!r}, not a number: this is not a "
            "store an otacloud server wrote"
        ) from None


def check_compatible(found: SchemaStatus) -> None:
    """Refuse a database written by a newer server (or not by this project)."""
    script = script_directory()
    for revision in found.current:
        try:
            known = script.get_revision(revision)
        except Exception:  # alembic raises its own error types for unknown ids
            known = None
        if known is None:
            raise SchemaVersionError(
                f"the database is at schema revision {revision}, which this server does not "
                f"know (its newest is {found.head}): a newer otacloud wrote it; upgrade the "
                "server"
            )
    if found.meta_version is not None and found.meta_version > schema.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the database has schema version {found.meta_version}, newer than this "
            f"server's {schema.SCHEMA_VERSION}; upgrade the server"
        )
    if not found.current and found.legacy_version is None and not found.empty:
        raise MigrationError(
            "the database holds some of the store's tables but neither an alembic_version "
            "nor a meta table: it was not written by an otacloud server; give an empty "
            "database"
        )


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in the transaction that holds the migration lock (see the module doc);
    commits when the block ends without an exception."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE
        if sqlite:
            _pragma(conn, "PRAGMA foreign_keys=OFF")  # outside a transaction, or a no-op
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_MIGRATION_LOCK_KEY)))
                yield conn
        finally:
            if sqlite:
                _pragma(conn, "PRAGMA foreign_keys=ON")  # the pooled connection as it was


def _pragma(conn: Connection, statement: str) -> None:
    """Run a PRAGMA straight on the driver: through SQLAlchemy it would begin a transaction,
    and foreign_keys cannot change inside one."""
    dbapi_connection = conn.connection.dbapi_connection
    if dbapi_connection is not None:
        dbapi_connection.execute(statement)


def _broken_references(conn: Connection) -> set[tuple[Any, ...]]:
    """Rows whose foreign key points at nothing (SQLite's ``PRAGMA foreign_key_check``)."""
    return {tuple(row) for row in conn.exec_driver_sql("PRAGMA foreign_key_check")}


def _check_foreign_keys(conn: Connection, broken_before: set[tuple[Any, ...]]) -> None:
    """Fail (rolling back) if the revisions, run with foreign keys off, broke a reference."""
    broken = sorted(_broken_references(conn) - broken_before, key=repr)
    if broken:
        shown = "; ".join(f"{row[0]} row {row[1]} -> {row[2]}" for row in broken[:5])
        raise MigrationError(
            f"a migration left {len(broken)} row(s) pointing at rows that do not exist "
            f"({shown}); nothing was changed. Report this with the migration's name"
        )


def upgrade(engine: Engine) -> MigrationReport:
    """Bring the database behind ``engine`` to the head revision (see the module doc)."""
    with _migration_transaction(engine) as conn:
        sqlite = conn.dialect.name == "sqlite"
        # A full scan, so only when something is to run; rows broken before (none, unless
        # written without foreign keys) are not the migration's doing.
        broken_before = _broken_references(conn) if sqlite and status(conn).pending else None
        report = upgrade_connection(conn)
        if broken_before is not None:
            _check_foreign_keys(conn, broken_before)
        return report


def upgrade_connection(conn: Connection) -> MigrationReport:
    """:func:`upgrade` on a connection already in a locked transaction (the caller's)."""
    found = status(conn)
    check_compatible(found)
    report = MigrationReport(found)
    if not found.pending:
        return report  # the common case: three small reads
    config = _config(conn)
    if not found.current and not found.empty:  # a pre-Alembic server's store
        _create_missing(conn, _revision_module(BASELINE_REVISION))
    if found.meta_version is not None and found.meta_version < LEGACY_FINAL:
        report.legacy_from = found.meta_version
        _legacy_steps(conn, found.meta_version)
    if not found.current and not found.empty:
        command.stamp(config, BASELINE_REVISION)
    if found.current != (found.head,):
        command.upgrade(config, "head")
    report.applied = list(config.attributes.get("applied", []))
    log.info("store schema upgraded from %s to revision %s: %s",
             found.describe_current(), found.head, report.describe())
    return report


def _revision_module(revision: str) -> ModuleType:
    script = script_directory().get_revision(revision)
    assert script is not None, revision
    return script.module


class _CreateMissing(Operations):
    """Alembic operations that create only the tables and indexes a database lacks: a
    pre-Alembic server created its tables with ``create_all``, which skips existing ones, so
    a store of an older version lacks the tables added since (and their indexes)."""

    def create_table(self, table_name: str, *columns: Any, **kw: Any) -> Any:
        """Create ``table_name`` unless it exists."""
        if sa.inspect(self.get_bind()).has_table(table_name):
            return None
        return super().create_table(table_name, *columns, **kw)

    def create_index(
        self, index_name: str | None, table_name: str, columns: Any, **kw: Any
    ) -> Any:
        """Create the index unless one of that name exists on the table."""
        existing = {ix["name"] for ix in sa.inspect(self.get_bind()).get_indexes(table_name)}
        if index_name in existing:
            return None
        return super().create_index(index_name, table_name, columns, **kw)

    def bulk_insert(self, table: Any, rows: Any, **kw: Any) -> None:
        """Nothing: an existing store has its own rows (its ``meta`` row)."""


def _create_missing(conn: Connection, baseline: ModuleType) -> None:
    baseline.create_schema(_CreateMissing(MigrationContext.configure(conn)))


def _legacy_steps(conn: Connection, version: int) -> None:
    """The pre-Alembic servers' upgrades from ``version`` to 8, in plain portable SQL
    (frozen: they describe those servers' tables, not today's ``schema.py``). Each step is
    guarded by what the database holds, so a half-known store is safe to run them on."""

    def columns(table: str) -> set[str]:
        return {c["name"] for c in sa.inspect(conn).get_columns(table)}

    if version < 2 and "compressed_transfers" not in columns("firmware_transfer_bytes"):
        # v2: full images sent zstd-compressed are counted on their own
        conn.execute(sa.text(
            "ALTER TABLE firmware_transfer_bytes "
            "ADD COLUMN compressed_transfers INTEGER NOT NULL DEFAULT 0"))
    if version < 3 and "session_owner" not in columns("devices"):
        # v3: presence is owned by the session that set it
        conn.execute(sa.text("ALTER TABLE devices ADD COLUMN session_owner VARCHAR(96)"))
    if version < 7:  # v7: relayed events say who published them; firmware found by image
        # A row without a source is never trusted as the cloud's (rows live ~2 minutes).
        if "source" not in columns("event_log"):
            conn.execute(sa.text(
                "ALTER TABLE event_log ADD COLUMN source VARCHAR(16) NOT NULL DEFAULT 'device'"))
        conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_firmware_product_sha256 "
                             "ON firmware (product_id, sha256)"))
        conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_system_modules_platform_sha256 "
                             "ON system_modules (platform_id, sha256)"))
    if version < 8:  # v8: revocation is per certificate
        # Devices an older server revoked (a flag on the row) stay revoked: only a
        # certificate issued from now on (re-provisioning) or a reinstate brings them back.
        conn.execute(
            sa.text(
                "INSERT INTO device_revocations (device_id, revoked_at, revoked_by) "
                "SELECT id, updated_at, 'schema migration' FROM devices "
                "WHERE certs_revoked = :revoked AND id NOT IN "
                "(SELECT device_id FROM device_revocations)"
            ).bindparams(sa.bindparam("revoked", True, type_=sa.Boolean))
        )
    conn.execute(sa.text("UPDATE meta SET value = :v WHERE key = 'schema_version'"),
                 {"v": str(LEGACY_FINAL)})


def status_of(engine: Engine) -> SchemaStatus:
    """:func:`status` on a fresh connection of ``engine`` (reads only)."""
    with engine.connect() as conn:
        return status(conn)


def new_revision(message: str, rev_id: str | None = None) -> Path:
    """Write a revision holding the difference between ``schema.py`` and the migrations
    (Alembic autogenerate against a scratch SQLite database at head); returns its path.
    Review it before committing: autogenerate misses renames and data moves."""
    with tempfile.TemporaryDirectory() as scratch:
        engine = sa.create_engine(f"sqlite:///{Path(scratch) / 'scratch.db'}")
        try:
            with engine.begin() as conn:
                config = _config(conn)
                command.upgrade(config, "head")
                script = command.revision(config, message=message, autogenerate=True,
                                          rev_id=rev_id)
        finally:
            engine.dispose()
    scripts = script if isinstance(script, list) else [script]
    assert scripts and scripts[0] is not None
    return Path(scripts[0].path)


def main(argv: list[str] | None = None) -> int:
    """``python -m server.store.migrate revision -m MESSAGE [--rev-id ID]``."""
    parser = argparse.ArgumentParser(prog="python -m server.store.migrate")
    sub = parser.add_subparsers(dest="command", required=True)
    revision = sub.add_parser("revision", help="write a new revision from schema.py's changes")
    revision.add_argument("-m", "--message", required=True)
    revision.add_argument("--rev-id", help="revision id (default: the next number, 0002...)")
    args = parser.parse_args(argv)
    rev_id = args.rev_id or f"{len(list(script_directory().walk_revisions())) + 1:04d}"
    path = new_revision(args.message, rev_id)
    print(f"wrote {path}; review it, then run the tests (tests/test_migrations.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
