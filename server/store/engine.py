"""Create the SQLAlchemy engine for a store URL: SQLite (the embedded store) or PostgreSQL
(psycopg 3).

Everything outside :mod:`server.store.sqlite` and :mod:`server.store.postgresql` is portable
SQLAlchemy Core; backend quirks (pragmas, transaction start, writer serialisation, how a
driver reports its transaction) live in one module per backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.store import postgresql, sqlite
from server.store.errors import StoreConfigError
from server.store.transaction_state import TransactionState

#: The database backends the store runs on, and the driver each must be used with.
SUPPORTED = {"sqlite": "pysqlite", "postgresql": "psycopg"}


@dataclass(frozen=True)
class EngineSetup:
    """An engine plus what the store must know about its backend."""

    engine: Engine
    #: True when only one writer may run at a time: the store then serialises its own
    #: writers on a process lock taken before a connection is checked out, so writers
    #: waiting for the database's lock (SQLite's write lock with its busy timeout;
    #: PostgreSQL's writers' advisory lock, server.store.postgresql) hold one pooled
    #: connection between them, and readers never wait for a free connection behind them.
    single_writer: bool
    backend: str
    #: Where a DBAPI connection's transaction stands (after an error in it, and before a
    #: commit): see server.store.transaction_state.
    transaction_state: Callable[[Any], TransactionState]
    #: Most operations one group-commit transaction runs, each in its own savepoint.
    max_write_batch: int = 512


def create_store_engine(url: str, *, pool_size: int = 8) -> EngineSetup:
    """Build the engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreConfigError(f"database URL {url!r} is not a valid SQLAlchemy URL") from exc
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise StoreConfigError("the SQLite store needs a file path (sqlite:///path/ota.db)")
        engine = sqlite.create_sqlite_engine(parsed, pool_size=pool_size)
        return EngineSetup(engine, True, backend, sqlite.transaction_state)
    if backend == "postgresql":
        if "+" not in parsed.drivername:  # libpq's own form, postgresql://...: psycopg 3
            # (SQLAlchemy 2.0 would pick psycopg2 here, 2.1 picks psycopg).
            parsed = parsed.set(drivername=f"postgresql+{SUPPORTED[backend]}")
        elif driver != SUPPORTED[backend]:
            raise StoreConfigError(
                f"database URL '{parsed!r}' uses the {driver} driver; the "
                "store speaks to PostgreSQL through psycopg 3: postgresql+psycopg://USER"
                ":PASSWORD@HOST:PORT/DATABASE"
            )
        engine = postgresql.create_postgresql_engine(parsed, pool_size=pool_size)
        return EngineSetup(engine, True, backend, postgresql.transaction_state,
                           max_write_batch=postgresql.MAX_WRITE_BATCH)
    raise StoreConfigError(
        f"database URL '{parsed!r}': the store runs on SQLite "
        "(sqlite:///path/ota.db) or PostgreSQL (postgresql+psycopg://...), not on "
        f"{backend}"
    )
