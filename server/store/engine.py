"""Create the SQLAlchemy engine for a store URL (SQLite today; PostgreSQL plugs in here).

Everything outside :mod:`server.store.sqlite` is portable SQLAlchemy Core; backend quirks
(pragmas, transaction start) live in one setup function per backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.store import sqlite
from server.store.errors import StoreConfigError


@dataclass(frozen=True)
class EngineSetup:
    """An engine plus what the store must know about its backend."""

    engine: Engine
    #: True when only one writer may run at a time (SQLite): the store then serialises
    #: its own writers on a lock rather than spinning on the database's busy timeout.
    single_writer: bool
    backend: str


def create_store_engine(url: str, *, pool_size: int = 8) -> EngineSetup:
    """Build the engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreConfigError(f"database URL {url!r} is not a valid SQLAlchemy URL") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise StoreConfigError("the SQLite store needs a file path (sqlite:///path/ota.db)")
        return EngineSetup(sqlite.create_sqlite_engine(parsed, pool_size=pool_size), True, backend)
    engine = sa.create_engine(parsed, pool_size=pool_size, max_overflow=0, pool_pre_ping=True)
    return EngineSetup(engine, False, backend)
