"""PostgreSQL engine setup (psycopg 3): the only place with PostgreSQL-specific SQL.

The store's code was written for SQLite, where one writer runs at a time: a write
transaction's reads and writes see no other writer's changes until it commits, so
read-then-write steps (update-else-insert, counters, "is the name free?") never race.
PostgreSQL runs writers concurrently, and at its default READ COMMITTED level those steps
could lose updates or collide on a unique key. Rather than retrying whole transactions
(a ``with store.write()`` block cannot be re-run), every write transaction first takes one
transaction-level advisory lock, ``pg_advisory_xact_lock(WRITE_LOCK_KEY)``
(https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS), so writers
of every process and node sharing the database run one at a time, as on SQLite:

* no lost update and no unique-key race between writers: each sees every earlier writer's
  committed changes, since READ COMMITTED takes a fresh snapshot per statement, after the
  lock was granted;
* no deadlock and no serialization failure between store writers: each takes that one lock
  before any other, and nothing runs at a level that can fail to serialize;
* reads never wait for it: they run at REPEATABLE READ (one consistent snapshot for the
  whole read transaction, as SQLite's read transactions have; a read-only transaction at
  this level never fails to serialize), and READ ONLY, so a write slipped into a read
  transaction, which would bypass the writers' lock, fails at once instead of racing.

A writer waits at most ``LOCK_TIMEOUT_MS`` for a lock (the advisory one included), then
fails with "lock timeout", which the store reports as unavailable (503), like SQLite's busy
timeout (``server.store.sqlite.BUSY_TIMEOUT_MS``). An operator changes it, as any server
setting of the connection, in the database URL: ``...?options=-c%20lock_timeout%3D10s``
(libpq's ``options``; https://www.postgresql.org/docs/current/libpq-connect.html).
"""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import IsolationLevel
from psycopg.pq import TransactionStatus
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from server.store.sqlite import WRITE_OPTION
from server.store.transaction_state import TransactionState

#: Key of the advisory lock every write transaction holds (any fixed 64-bit number: this
#: one is the first 8 bytes of sha256(b"otacloud store writer") as a signed big-endian
#: integer, unlikely to be another application's key in a shared database).
WRITE_LOCK_KEY = -3316748680651837904

#: How long a statement waits for a lock (the writers' advisory lock included) before it
#: fails with "lock timeout" (milliseconds; PostgreSQL's lock_timeout).
LOCK_TIMEOUT_MS = 30_000

#: Most operations of one group-commit batch (server/store/group_commit.py). Each runs in
#: its own savepoint, a subtransaction with its own transaction id once it writes; past 64
#: of them in one transaction (PGPROC_MAX_CACHED_SUBXIDS) the snapshots of every concurrent
#: session "overflow" and must look subtransactions up in pg_subtrans, which slows the
#: whole database down (https://www.postgresql.org/docs/current/subxacts.html).
MAX_WRITE_BATCH = 64

_TAKE_WRITE_LOCK = f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"

#: libpq connection parameters of every connection the store makes (the pool's and the
#: event relay's listening one), each used unless the database URL sets it
#: (``...?tcp_user_timeout=10000``; https://www.postgresql.org/docs/current/libpq-connect.html).
#: They bound how long a node takes to notice that its path to the database died silently
#: (a network cut, a host gone: no FIN, no RST), instead of waiting on the socket forever:
#:
#: * ``connect_timeout``: seconds a connection attempt (TCP and the startup exchange) may
#:   take;
#: * ``tcp_user_timeout``: milliseconds sent data may stay unacknowledged before the
#:   kernel drops the connection (Linux TCP_USER_TIMEOUT, RFC 5482): a statement sent into
#:   a dead path fails after it, whatever the statement (a healthy server acknowledges at
#:   once, even while the statement waits for a lock, so no legitimate wait is cut short);
#: * TCP keep-alive: an idle connection (pooled, or the relay's LISTEN) whose peer vanished
#:   is found dead after about idle + interval * count seconds (the user timeout, when
#:   longer, wins: Linux keeps probing until it elapsed).
#:
#: Unix-domain sockets ignore the TCP ones (they cannot be cut silently). A path that
#: acknowledges but never answers (a TCP proxy whose far side died) is not bounded by them:
#: a statement sent into it waits until the path is back (a new connection's attempt still
#: ends after ``connect_timeout``).
CONNECTION_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "tcp_user_timeout": 30_000,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def connection_defaults(url: sa.URL) -> dict[str, int]:
    """:data:`CONNECTION_DEFAULTS` but those the database URL sets itself."""
    return {name: value for name, value in CONNECTION_DEFAULTS.items()
            if name not in url.query}


def create_postgresql_engine(url: sa.URL, *, pool_size: int) -> Engine:
    """An engine for a PostgreSQL database (psycopg 3) whose write transactions are
    serialised on an advisory lock and whose read transactions are snapshots (module doc)."""
    options = f"-c lock_timeout={LOCK_TIMEOUT_MS}"
    given = url.query.get("options")
    if given:  # the operator's own (?options=-c lock_timeout=5s ...) come last and win
        options = f"{options} {given if isinstance(given, str) else ' '.join(given)}"
        url = url.difference_update_query(["options"])
    engine = sa.create_engine(
        url,
        connect_args={"options": options, **connection_defaults(url)},
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=60,
        # A restarted or failed-over database leaves dead connections in the pool: each
        # checkout checks its connection first and replaces a dead one.
        pool_pre_ping=True,
    )

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        dbapi_connection = conn.connection.dbapi_connection
        if dbapi_connection is None:  # invalidated: let SQLAlchemy raise why
            conn.exec_driver_sql(_TAKE_WRITE_LOCK if write else "SELECT 1")
            return
        # psycopg begins the transaction at its first statement, with these settings
        # (BEGIN ISOLATION LEVEL ... READ ONLY): setting them costs no round trip.
        dbapi_connection.isolation_level = (
            IsolationLevel.READ_COMMITTED if write else IsolationLevel.REPEATABLE_READ
        )
        dbapi_connection.read_only = not write
        if not write:
            return
        # Straight to the driver (one round trip; see sqlite.py for why). SQLAlchemy does
        # not wrap what a "begin" hook raises: wrap the driver's error as it would, for the
        # store's error translation (a lock timeout is "unavailable").
        try:
            dbapi_connection.execute(_TAKE_WRITE_LOCK)
        except psycopg.Error as exc:
            raise sa.exc.DBAPIError.instance(
                _TAKE_WRITE_LOCK, None, exc, psycopg.Error
            ) from exc

    return engine


def transaction_state(dbapi_connection: Any) -> TransactionState:
    """Where the psycopg connection's transaction stands (libpq's transaction status)."""
    status = dbapi_connection.info.transaction_status
    if status in (TransactionStatus.INTRANS, TransactionStatus.ACTIVE):
        return TransactionState.OPEN
    if status == TransactionStatus.INERROR:
        return TransactionState.FAILED
    if status == TransactionStatus.IDLE:
        return TransactionState.IDLE
    return TransactionState.LOST  # UNKNOWN: the connection broke


def advance_sequences(conn: Connection, metadata: sa.MetaData) -> dict[str, int]:
    """Move each table's id sequence past the table's highest id; return the next id of
    each table.

    PostgreSQL's ``SERIAL``/identity ids come from a sequence that rows inserted with
    explicit ids (a restore, rows copied from a SQLite store) do not advance: the next
    ordinary INSERT would then collide with a copied row. SQLite needs no such step (it
    takes max(rowid) + 1, or the ``sqlite_sequence`` row for AUTOINCREMENT tables)."""
    quote = conn.dialect.identifier_preparer.quote
    next_ids: dict[str, int] = {}
    for table in metadata.sorted_tables:
        column = table.autoincrement_column
        if column is None:
            continue
        sequence = conn.execute(
            sa.select(sa.func.pg_get_serial_sequence(quote(table.name), column.name))
        ).scalar_one()
        if sequence is None:  # not backed by a sequence (created by other means)
            continue
        highest = conn.execute(sa.select(sa.func.max(column))).scalar()
        next_id = int(highest or 0) + 1
        # is_called=false: nextval() returns exactly next_id.
        conn.execute(sa.select(sa.func.setval(sequence, next_id, False)))
        next_ids[table.name] = next_id
    return next_ids
