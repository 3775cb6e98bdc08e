"""The durable store: one database behind SQLAlchemy Core plus the blob directory.

All access goes through a transaction object (:class:`Tx`) from :meth:`Store.read` or
:meth:`Store.write`; a write commits when its ``with`` block ends without an exception and
the commit is durable when the block returns (SQLite: WAL + synchronous=FULL). Calls block:
the async layer runs them in worker threads (``trio.to_thread.run_sync`` under a
``CapacityLimiter``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema
from server.store.blobs import BlobStore
from server.store.engine import EngineSetup, create_store_engine
from server.store.errors import SchemaVersionError, StoreConflictError, StoreUnavailableError
from server.store.sqlite import WRITE_OPTION, integrity_check
from server.store.tx_auth import AuthQueries
from server.store.tx_firmware import FirmwareQueries
from server.store.tx_fleet import FleetQueries

DB_FILENAME = "ota.db"
BLOB_DIRNAME = "blobs"


@contextmanager
def _translated_errors() -> Iterator[None]:
    """Database errors as the project's errors: a uniqueness collision is a conflict (409),
    a locked or unreachable database is "unavailable" (503); both roll back."""
    try:
        yield
    except sa.exc.IntegrityError as exc:
        raise StoreConflictError(
            "the change collided with another one (a name or version is already taken); retry"
        ) from exc
    except sa.exc.OperationalError as exc:
        raise StoreUnavailableError(f"the database is unavailable: {exc.orig}") from exc


class Tx(FleetQueries, FirmwareQueries, AuthQueries):
    """One open transaction; every query method of the store lives on it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn


class Store:
    """The control plane's durable state: database (via SQLAlchemy Core) and blobs."""

    def __init__(self, setup: EngineSetup, blobs: BlobStore) -> None:
        self._setup = setup
        self.engine = setup.engine
        self.blobs = blobs
        # SQLite has one writer at a time: queue this process's writers here (fair, no
        # busy-timeout polling); other processes still wait on the busy timeout.
        self._write_lock: AbstractContextManager[object] = (
            threading.Lock() if setup.single_writer else nullcontext()
        )

    @classmethod
    def open(cls, url: str, blob_dir: Path | str, *, pool_size: int = 8) -> Store:
        """Open (creating on first use) the database at ``url`` and blobs in ``blob_dir``."""
        setup = create_store_engine(url, pool_size=pool_size)
        store = cls(setup, BlobStore(blob_dir))
        store._create_schema()
        return store

    @classmethod
    def open_dir(cls, data_dir: Path | str, *, pool_size: int = 8) -> Store:
        """Open the embedded store in ``data_dir``: ``ota.db`` plus ``blobs/``."""
        root = Path(data_dir)
        root.mkdir(parents=True, exist_ok=True)
        return cls.open(
            f"sqlite:///{(root / DB_FILENAME).resolve()}", root / BLOB_DIRNAME, pool_size=pool_size
        )

    @property
    def backend(self) -> str:
        """Database backend name ("sqlite", "postgresql", ...)."""
        return self._setup.backend

    def _create_schema(self) -> None:
        with self.write() as tx:
            schema.metadata.create_all(tx.conn)
            row = tx.conn.execute(
                sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
            ).first()
            if row is None:
                tx.conn.execute(
                    sa.insert(schema.meta).values(
                        key="schema_version", value=str(schema.SCHEMA_VERSION)
                    )
                )
            elif int(row[0]) > schema.SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"the database has schema version {row[0]}, newer than this server's "
                    f"{schema.SCHEMA_VERSION}; upgrade the server"
                )

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read transaction (a consistent snapshot)."""
        with _translated_errors(), self.engine.connect() as conn, conn.begin():
            yield Tx(conn)

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction: commits (durably) when the block exits without error."""
        with _translated_errors(), self._write_lock, self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                yield Tx(conn)

    def check(self) -> str:
        """Database integrity verdict: "ok" when sound (SQLite runs integrity_check)."""
        if self.backend == "sqlite":
            return integrity_check(self.engine)
        with self.read() as tx:
            tx.conn.execute(sa.select(1))
        return "ok"

    def sweep_blobs(self) -> list[str]:
        """Delete blobs no row refers to (left by a crash between blob write and commit).

        Run only while no upload is in progress (at start-up), since an upload writes its
        blob before committing the row that names it.
        """
        with self.read() as tx:
            referenced = tx.referenced_blobs()
        return self.blobs.sweep(referenced)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()
