"""SQLite engine setup: the only place with SQLite-specific SQL.

The embedded store is one SQLite file in WAL mode with ``synchronous=FULL``: every commit is
fsynced to the WAL before it returns, so a transaction that returned (and so an HTTP request
that was answered) survives SIGKILL and power loss (https://sqlite.org/pragma.html#pragma_synchronous,
https://sqlite.org/wal.html). Write transactions start with ``BEGIN IMMEDIATE`` so that two
writers queue on the busy timeout instead of failing with SQLITE_BUSY when a deferred read
transaction tries to upgrade (https://sqlite.org/lang_transaction.html).

Entering WAL mode is the one statement the busy timeout does not cover: on a database still
in rollback-journal mode (a fresh file), ``PRAGMA journal_mode=WAL`` reads the header under a
SHARED lock, then upgrades to a write to set the file format to 2, and SQLite returns
SQLITE_BUSY at once, without calling the busy handler, when another connection holds the
write lock (a reader upgrading to a writer would otherwise deadlock;
https://sqlite.org/c3ref/busy_handler.html). Several processes or nodes opening one fresh
file at once hit that, so :func:`enter_wal` retries it until the busy timeout has passed.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from server.store.errors import StoreConfigError
from server.store.transaction_state import TransactionState

log = logging.getLogger("ota.store")

#: Execution option a write transaction sets before it begins (read by each backend's
#: "begin" hook: here and in server.store.postgresql).
WRITE_OPTION = "ota_write"

#: How long a writer waits for another writer's lock before SQLITE_BUSY (milliseconds).
BUSY_TIMEOUT_MS = 30_000

#: Pauses between tries of ``PRAGMA journal_mode=WAL`` while another connection holds the
#: write lock (seconds; the last repeats), as SQLite's own busy handler backs off.
_WAL_RETRY_DELAYS_S = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.05, 0.1)


def enter_wal(dbapi_connection: sqlite3.Connection, *, timeout_s: float) -> None:
    """Put the database in WAL mode (a no-op when it is), retrying while another connection
    holds the write lock, for up to ``timeout_s`` (see the module doc: SQLite does not call
    the busy handler here). Raises the driver's SQLITE_BUSY error after ``timeout_s``, and
    :class:`StoreConfigError` when the file system cannot hold a WAL database."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        try:
            mode = dbapi_connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            # SQLITE_BUSY and its extended codes (the low byte is the primary code,
            # https://sqlite.org/rescode.html); any other error is not a lock to wait out.
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            delay = _WAL_RETRY_DELAYS_S[min(attempt, len(_WAL_RETRY_DELAYS_S) - 1)]
            if time.monotonic() + delay > deadline:
                raise
            attempt += 1
            log.debug("entering WAL mode: the database is locked by another connection "
                      "(try %d); retrying in %.3f s", attempt, delay)
            time.sleep(delay)
    if str(mode).lower() != "wal":
        # WAL needs shared memory, which e.g. network file systems lack
        # (https://sqlite.org/wal.html, "Disadvantages").
        raise StoreConfigError(
            f"SQLite could not put the database in WAL mode (it stays in {mode!r} mode): "
            "the store needs a local file system that supports shared memory; put the "
            "data directory on a local disk"
        )


def create_sqlite_engine(url: sa.URL, *, pool_size: int) -> Engine:
    """An engine for a SQLite file with WAL, synchronous=FULL, foreign keys and busy timeout."""
    engine = sa.create_engine(
        url,
        # Connections move between worker threads (trio.to_thread), one thread at a time.
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=60,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy's "begin" hook below (pysqlite otherwise
        # starts transactions lazily, only before DML).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            enter_wal(dbapi_connection, timeout_s=BUSY_TIMEOUT_MS / 1000)
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        statement = "BEGIN IMMEDIATE" if immediate else "BEGIN"
        dbapi_connection = conn.connection.dbapi_connection
        if dbapi_connection is None:  # invalidated: let SQLAlchemy raise why
            conn.exec_driver_sql(statement)
            return
        # Straight to the driver: through exec_driver_sql a BEGIN costs ~15-25 us more, as
        # much as a small read. SQLAlchemy does not wrap what a "begin" hook raises, so the
        # driver's errors (SQLITE_BUSY after the busy timeout) are wrapped here as it would
        # (sa.exc.OperationalError with ``orig``), for the store's error translation.
        try:
            dbapi_connection.execute(statement)
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc

    return engine


def transaction_state(dbapi_connection: Any) -> TransactionState:
    """Where the sqlite3 connection's transaction stands: SQLite keeps a transaction usable
    after a failed statement, or ends it altogether (``in_transaction`` turns False)."""
    return TransactionState.OPEN if dbapi_connection.in_transaction else TransactionState.LOST


def integrity_check(engine: Engine) -> str:
    """Run ``PRAGMA integrity_check`` and return its verdict ("ok" when sound)."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("PRAGMA integrity_check").fetchall()
    return "; ".join(str(row[0]) for row in rows)
