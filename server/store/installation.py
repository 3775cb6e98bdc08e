"""Open an installation's store from its data directory and an optional database URL.

An installation is a data directory (its CA, server certificate, product signing keys and,
on SQLite, the firmware blobs under ``blobs/``) plus a database: the embedded SQLite file
``<data>/ota.db`` unless a database URL names another one (``--db-url`` / ``OTA_DB_URL``).
Every ``ota`` command and every server process opens its store through
:func:`open_installation_store`, so they all agree on where the state lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from server.private_files import create_private_file, make_private_dir, secure_data_dir
from server.store.blobs import SWEEP_GRACE_S
from server.store.db_blobs import CHUNK_CACHE_BYTES
from server.store.errors import StoreConfigError
from server.store.store import BLOB_DIRNAME, DB_FILENAME, Store

#: The environment variable every ``--db-url`` option reads when the option is not given.
DB_URL_ENV = "OTA_DB_URL"

#: Help text of the ``--db-url`` option of the commands that take ``--data``.
DB_URL_HELP = (
    "SQLAlchemy database URL of the installation's store (e.g. "
    "postgresql+psycopg://user@host/ota or sqlite:////var/lib/ota-db/ota.db); default: the "
    f"embedded SQLite file {DB_FILENAME} in --data. The keys and CA stay in --data; the "
    "firmware blobs are in --data on SQLite, in the database on PostgreSQL."
)


def effective_db_url(db_url: str | None) -> str | None:
    """``db_url`` with an empty or blank value read as "not given" (``OTA_DB_URL=`` set
    empty in a shell means the embedded store, not an invalid URL)."""
    if db_url is None or not db_url.strip():
        return None
    return db_url.strip()


def sqlite_database_path(data_dir: Path | str, db_url: str | None) -> Path | None:
    """The SQLite file holding the installation's database: ``<data>/ota.db``, or the file
    a ``sqlite:///`` URL names; None when the database is not SQLite (PostgreSQL)."""
    url = effective_db_url(db_url)
    if url is None:
        return Path(data_dir) / DB_FILENAME
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreConfigError(f"database URL {url!r} is not a valid SQLAlchemy URL") from exc
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.database in (None, "", ":memory:"):
        raise StoreConfigError("the SQLite store needs a file path (sqlite:///path/ota.db)")
    return Path(parsed.database)


def open_installation_store(
    data_dir: Path | str, db_url: str | None = None, *, pool_size: int = 1,
    blob_cache_bytes: int = CHUNK_CACHE_BYTES, blob_sweep_grace_s: float = SWEEP_GRACE_S,
) -> Store:
    """Open (creating on first use) the store of the installation in ``data_dir``: the
    database ``db_url`` names (None or blank: ``<data>/ota.db``) and its blobs (in
    ``<data>/blobs`` on SQLite, in the database on PostgreSQL: ``Store.open``). The data
    directory is made owner-only either way (it holds the installation's keys and CA).
    ``blob_cache_bytes`` and ``blob_sweep_grace_s``: see :meth:`Store.open`."""
    url = effective_db_url(db_url)
    if url is None:
        return Store.open_dir(data_dir, pool_size=pool_size, blob_cache_bytes=blob_cache_bytes,
                              blob_sweep_grace_s=blob_sweep_grace_s)
    root = secure_data_dir(data_dir)
    database = sqlite_database_path(root, url)
    if database is not None:
        # A SQLite file elsewhere is as private as the embedded one (store.py, open_dir):
        # its directory is created owner-only, the file 0600 before SQLite creates it.
        try:
            make_private_dir(database.parent)
            create_private_file(database)
        except OSError as exc:
            raise StoreConfigError(f"cannot create the SQLite store {database}: {exc}") \
                from exc
    return Store.open(url, root / BLOB_DIRNAME, pool_size=pool_size,
                      blob_cache_bytes=blob_cache_bytes, blob_sweep_grace_s=blob_sweep_grace_s)


@dataclass(frozen=True)
class Installation:
    """Where an installation lives: its data directory and its database URL (None: the
    embedded SQLite file in the data directory)."""

    data_dir: Path
    db_url: str | None = None

    @classmethod
    def of(cls, where: Path | str | Installation) -> Installation:
        """``where`` as an Installation (a bare directory: the embedded store)."""
        return where if isinstance(where, Installation) else cls(Path(where))

    def open_store(self, *, pool_size: int = 1) -> Store:
        """Open the installation's store (see :func:`open_installation_store`)."""
        return open_installation_store(self.data_dir, self.db_url, pool_size=pool_size)
