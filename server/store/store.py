"""The durable store: one database behind SQLAlchemy Core plus the blobs.

Blobs (``Store.blobs``, the :class:`~server.store.blobs.Blobs` interface) live in the blob
directory with SQLite and in the database itself with PostgreSQL
(:class:`~server.store.db_blobs.DatabaseBlobStore`), so the nodes of one installation share
nothing but the database. A PostgreSQL installation whose blobs were in ``<data>/blobs``
(before they moved into the database) has them copied in whenever the store opens and finds
the directory (idempotent: blobs already held are skipped).

All access goes through a transaction object (:class:`Tx`) from :meth:`Store.read` or
:meth:`Store.write`; a write commits when its ``with`` block ends without an exception and
the commit is durable when the block returns (SQLite: WAL + synchronous=FULL). Calls block:
the async layer runs them in worker threads (``trio.to_thread.run_sync`` under a
``CapacityLimiter``).

Hot small writes (device sessions) can instead share one transaction: :meth:`Store.write_batch`
runs many operations in one durable transaction, each inside its own SAVEPOINT, and
:attr:`Store.group_commit` (a :class:`~server.store.group_commit.GroupCommitter`) gathers
concurrent async callers into such batches (one fsync for many changes).

Several processes may share one SQLite file: each process serialises its own writers on a
lock, and the connections carry a busy timeout (``server.store.sqlite.BUSY_TIMEOUT_MS``, set
both as the driver's ``timeout`` and as ``PRAGMA busy_timeout``) so a writer of another
process waits for the write lock instead of failing with "database is locked"
(https://sqlite.org/c3ref/busy_timeout.html).

On PostgreSQL (``postgresql+psycopg://...``) the writers of every process and node sharing
the database queue on one advisory lock, so the same code keeps SQLite's one-writer
semantics there; reads are snapshots and never wait (``server.store.postgresql``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.metrics import STORE_COMMIT_SECONDS
from server.private_files import create_private_file, secure_data_dir
from server.store import migrate
from server.store.blobs import SWEEP_GRACE_S, Blobs, BlobStore
from server.store.db_blobs import CHUNK_CACHE_BYTES, DatabaseBlobStore
from server.store.engine import EngineSetup, create_store_engine
from server.store.errors import (
    StoreConflictError,
    StoreUnavailableError,
    StoreValueError,
)
from server.store.group_commit import BatchOp, GroupCommitter, GroupReader
from server.store.sqlite import WRITE_OPTION, integrity_check
from server.store.transaction_state import TransactionState
from server.store.tx_auth import AuthQueries
from server.store.tx_certs import CertificateQueries
from server.store.tx_firmware import FirmwareQueries
from server.store.tx_keys import KeyQueries
from server.store.tx_many_devices import ManyDeviceQueries
from server.store.tx_ota import OtaMemoryQueries
from server.store.tx_release_progress import ReleaseProgressQueries
from server.store.tx_rollouts import RolloutQueries

DB_FILENAME = "ota.db"
BLOB_DIRNAME = "blobs"

log = logging.getLogger("ota.store")


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
    except sa.exc.DataError as exc:  # PostgreSQL: too long, out of range, a NUL character
        detail = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
        raise StoreValueError(
            f"a value does not fit the database ({detail}); nothing was saved"
        ) from exc


class Tx(
    ManyDeviceQueries, FirmwareQueries, AuthQueries, OtaMemoryQueries, CertificateQueries,
    RolloutQueries, ReleaseProgressQueries, KeyQueries,
):
    """One open transaction; every query method of the store lives on it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn


#: Transaction states in which a batch op's savepoint still exists.
_SAVEPOINT_KEPT = (TransactionState.OPEN, TransactionState.FAILED)


class TransactionLostError(StoreUnavailableError):
    """The database abandoned a transaction after an error (SQLite rolls the whole
    transaction back on some errors, e.g. SQLITE_FULL or SQLITE_IOERR; PostgreSQL refuses
    every statement of a transaction after a failed one); nothing of it committed."""


def _driver_statement(conn: Connection, statement: str) -> None:
    """Run a statement without parameters or rows straight on the DBAPI connection (a batch
    op's SAVEPOINT, RELEASE and ROLLBACK TO): through SQLAlchemy's ``exec_driver_sql`` such
    a pair costs ~58 us here, through the driver's cursor ~2 us, and a batch issues one pair
    per op. SQLAlchemy tracks nothing of these savepoints either way (plain SQL, not
    ``begin_nested``). Driver errors become :class:`StoreUnavailableError`."""
    dbapi_connection = conn.connection.dbapi_connection
    if dbapi_connection is None:  # an invalidated connection: SQLAlchemy says why
        conn.exec_driver_sql(statement)
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise StoreUnavailableError(f"the database is unavailable: {exc}") from exc
    finally:
        cursor.close()


class Store:
    """The control plane's durable state: database (via SQLAlchemy Core) and blobs."""

    def __init__(self, setup: EngineSetup, blobs: Blobs | None = None, *,
                 blob_cache_bytes: int = CHUNK_CACHE_BYTES,
                 blob_sweep_grace_s: float = SWEEP_GRACE_S) -> None:
        """``blobs`` None: the blobs live in this database (:class:`DatabaseBlobStore`,
        keeping up to ``blob_cache_bytes`` of verified chunks in memory)."""
        self._setup = setup
        self.engine = setup.engine
        self.blobs: Blobs = blobs if blobs is not None else DatabaseBlobStore(
            self._blob_read, self._blob_write, lambda conn: Tx(conn).referenced_blobs(),
            cache_bytes=blob_cache_bytes,
        )
        #: How old an unreferenced blob must be before :meth:`sweep_blobs` deletes it.
        self.blob_sweep_grace_s = blob_sweep_grace_s
        # One writer at a time (SQLite; PostgreSQL's advisory lock): queue this process's
        # writers here (fair, no busy-timeout polling, one pooled connection waiting for
        # the database's lock); other processes wait on the database's own lock.
        self._write_lock: AbstractContextManager[object] = (
            threading.Lock() if setup.single_writer else nullcontext()
        )
        #: What opening the store found and migrated (set by ``open``).
        self.migration: migrate.MigrationReport | None = None
        #: Batches concurrent async writers into shared transactions (see group_commit.py).
        self.group_commit = GroupCommitter(self, max_batch=setup.max_write_batch)
        #: Batches concurrent async readers into shared read transactions (one
        #: worker-thread hop for many small reads; see GroupReader).
        self.group_read = GroupReader(self)

    @classmethod
    def open(cls, url: str, blob_dir: Path | str, *, pool_size: int = 8,
             blobs_in_database: bool | None = None,
             blob_cache_bytes: int = CHUNK_CACHE_BYTES,
             blob_sweep_grace_s: float = SWEEP_GRACE_S) -> Store:
        """Open (creating on first use) the database at ``url`` and its blobs: in
        ``blob_dir`` on SQLite, in the database on PostgreSQL (``blobs_in_database``
        chooses otherwise). With the blobs in the database, the blobs of an existing
        ``blob_dir`` (an older release's) are copied in (idempotent; the files stay), and
        up to ``blob_cache_bytes`` of verified chunks are kept in memory.
        ``blob_sweep_grace_s``: the default grace of :meth:`sweep_blobs`."""
        setup = create_store_engine(url, pool_size=pool_size)
        in_database = (setup.backend == "postgresql" if blobs_in_database is None
                       else blobs_in_database)
        try:
            store = cls(setup, None if in_database else BlobStore(blob_dir),
                        blob_cache_bytes=blob_cache_bytes,
                        blob_sweep_grace_s=blob_sweep_grace_s)
        except BaseException:
            setup.engine.dispose()
            raise
        try:
            store._create_schema()
            if isinstance(store.blobs, DatabaseBlobStore) and Path(blob_dir).is_dir():
                store._import_blob_directory(store.blobs, Path(blob_dir))
        except BaseException:
            store.close()
            raise
        return store

    @staticmethod
    def _import_blob_directory(blobs: DatabaseBlobStore, blob_dir: Path) -> None:
        """Copy the blobs of an older release's ``<data>/blobs`` into the database."""
        result = blobs.import_directory(BlobStore(blob_dir))
        if result.copied:
            log.info("copied %d blobs from %s into the database (the files stay; once "
                     "every node runs this release the directory may be removed)",
                     len(result.copied), blob_dir)
        if result.corrupt:
            log.error("%d blob files in %s no longer match their SHA-256 and were not copied "
                      "into the database (e.g. %s): restore them from a backup or upload "
                      "those images again", len(result.corrupt), blob_dir, result.corrupt[0])

    @contextmanager
    def _blob_read(self) -> Iterator[Connection]:
        with self.read() as tx:
            yield tx.conn

    @contextmanager
    def _blob_write(self) -> Iterator[Connection]:
        with self.write() as tx:
            yield tx.conn

    @classmethod
    def open_dir(cls, data_dir: Path | str, *, pool_size: int = 8,
                 blob_cache_bytes: int = CHUNK_CACHE_BYTES,
                 blob_sweep_grace_s: float = SWEEP_GRACE_S) -> Store:
        """Open the embedded store in ``data_dir``: ``ota.db`` plus ``blobs/``.

        The data directory is made owner-only first (0700 directories, 0600 files; an
        older release's 0755/0644 data directory is tightened, with a warning), and the
        database file is created 0600 before SQLite opens it, so its ``-wal`` and ``-shm``
        files, which take the database's mode, are private too.
        """
        root = secure_data_dir(data_dir)
        database = root / DB_FILENAME
        create_private_file(database)
        return cls.open(f"sqlite:///{database.resolve()}", root / BLOB_DIRNAME,
                        pool_size=pool_size, blob_cache_bytes=blob_cache_bytes,
                        blob_sweep_grace_s=blob_sweep_grace_s)

    @property
    def backend(self) -> str:
        """Database backend name ("sqlite", "postgresql", ...)."""
        return self._setup.backend

    def _create_schema(self) -> None:
        """Bring the database to this code's head schema revision in place (Alembic; a
        pre-Alembic store is upgraded first): see :mod:`server.store.migrate`."""
        with _translated_errors():
            self.migration = migrate.upgrade(self.engine)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read transaction (a consistent snapshot)."""
        with _translated_errors(), self.engine.connect() as conn, conn.begin():
            yield Tx(conn)

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction: commits (durably) when the block exits without error.

        Writers run one at a time, as SQLite allows (PostgreSQL: server.store.postgresql).
        A block that exits normally although the database abandoned its transaction (a
        statement failed and its error was caught inside the block) raises
        :class:`TransactionLostError` instead of committing: PostgreSQL would silently roll
        back such a COMMIT, and SQLite would have autocommitted the statements after it."""
        with _translated_errors(), self._write_lock, self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            began = time.perf_counter()
            with conn.begin():
                yield Tx(conn)
                state = self._transaction_state(conn)
                if state is not TransactionState.OPEN:
                    raise TransactionLostError(
                        f"the write transaction was {state.value} after an error inside it "
                        "(the error was caught and the block went on); nothing was saved, retry"
                    )
            STORE_COMMIT_SECONDS.observe(time.perf_counter() - began)  # committed

    def _transaction_state(self, conn: Connection) -> TransactionState:
        """Where ``conn``'s transaction stands, as its driver reports it."""
        if conn.invalidated:
            # The connection broke inside the transaction (a database restart or crash
            # terminated its session, a network cut): SQLAlchemy invalidated it, and
            # ``conn.connection`` would raise PendingRollbackError, not a store error.
            return TransactionState.LOST
        dbapi_connection = conn.connection.dbapi_connection
        if dbapi_connection is None:  # invalidated (connection lost)
            return TransactionState.LOST
        return self._setup.transaction_state(dbapi_connection)

    def write_batch(self, ops: Sequence[BatchOp[Any]], *, time_budget: float | None = None) -> None:
        """Run ``ops`` in order in ONE write transaction (one durable commit), each inside
        its own SAVEPOINT: an op that raises has only its own changes rolled back and its
        exception stored in ``op.error`` (database errors translated as in :meth:`write`);
        the others' changes commit together when the batch ends.

        With ``time_budget`` (seconds), no further op starts once that much time has passed
        since the transaction began (at least one op runs), so the write lock is not held
        for long; the ops left over keep ``ran == False`` for the caller to run later.

        Raises (and nothing commits) when the transaction itself fails: it cannot begin or
        commit, or the database abandoned it after an error (:class:`TransactionLostError`).
        Ops that had not run yet keep ``ran == False``.
        """
        with self.write() as tx:
            started = time.monotonic()
            conn = tx.conn
            for index, op in enumerate(ops):
                if index and time_budget is not None and time.monotonic() - started >= time_budget:
                    break
                op.ran = True
                # SAVEPOINT works here because the SQLite engine takes transaction control
                # from pysqlite (isolation_level=None, BEGIN in the "begin" hook); PostgreSQL
                # supports it natively. Plain SQL, not begin_nested(): SQLAlchemy's nested
                # transaction objects cost ~0.25 ms per op, more than a whole thin write.
                _driver_statement(conn, "SAVEPOINT batch_op")
                try:
                    with _translated_errors():
                        op.value = op.fn(tx)
                except Exception as exc:  # the op's own failure: only it is rolled back
                    op.error = exc
                    # Also what makes a PostgreSQL transaction usable again after a
                    # failed statement (state FAILED until then). LOST or IDLE: the
                    # savepoint went with the transaction (raised on below).
                    if self._transaction_state(conn) in _SAVEPOINT_KEPT:
                        _driver_statement(conn, "ROLLBACK TO SAVEPOINT batch_op")
                if self._transaction_state(conn) is TransactionState.OPEN:
                    _driver_statement(conn, "RELEASE SAVEPOINT batch_op")
                # SQLite rolls back the whole transaction on some errors
                # (https://sqlite.org/lang_transaction.html, "Response To Errors Within A
                # Transaction"); later statements would then autocommit one by one.
                if self._transaction_state(conn) is not TransactionState.OPEN:
                    raise TransactionLostError(
                        "the database rolled back the batch transaction after an error "
                        f"({op.error or 'an operation ended it'}); nothing was saved, retry"
                    )

    def read_batch(self, ops: Sequence[BatchOp[Any]], *, time_budget: float | None = None) -> None:
        """Run read-only ``ops`` in order in ONE read transaction (one snapshot, taken after
        all of them were queued): an op that raises has its exception (translated as in
        :meth:`read`) stored in ``op.error`` and the others go on. ``time_budget`` as in
        :meth:`write_batch`.

        A read whose failed statement leaves the transaction unusable (PostgreSQL refuses
        every later statement of it) ends the batch there: the ops after it keep
        ``ran == False`` and run in the caller's next batch. Raises when the transaction
        itself fails (cannot begin, or the database ended it: :class:`TransactionLostError`)."""
        with self.read() as tx:
            started = time.monotonic()
            for index, op in enumerate(ops):
                if index and time_budget is not None and time.monotonic() - started >= time_budget:
                    break
                op.ran = True
                try:
                    with _translated_errors():
                        op.value = op.fn(tx)
                except Exception as exc:  # the op's own failure: the others go on
                    op.error = exc
                # IDLE (PostgreSQL: none began yet, or an op ended it) is fine: the next
                # read begins a new snapshot, which still sees every change committed
                # before its caller asked.
                state = self._transaction_state(tx.conn)
                if state is TransactionState.FAILED:
                    break  # its snapshot is spent: the rest get a fresh transaction
                if state is TransactionState.LOST:  # later reads would not share the snapshot
                    raise TransactionLostError(
                        "the database ended the shared read transaction after an error "
                        f"({op.error or 'an operation ended it'}); retry"
                    )

    def check(self) -> str:
        """Database integrity verdict: "ok" when sound (SQLite runs integrity_check)."""
        if self.backend == "sqlite":
            return integrity_check(self.engine)
        with self.read() as tx:
            tx.conn.execute(sa.select(1))
        return "ok"

    def ping(self) -> None:
        """Reach the database once (a read of nothing); :class:`StoreUnavailableError`
        when it cannot be reached."""
        with self.read() as tx:
            tx.conn.execute(sa.select(1))

    def sweep_blobs(self, *, grace_s: float | None = None) -> list[str]:
        """Delete blobs no row refers to (left by a crash between blob write and commit, or
        by a deleted firmware) that were stored more than ``grace_s`` seconds ago (None:
        :attr:`blob_sweep_grace_s`, the server's ``blob_sweep_grace``).

        Safe while uploads run, on this node or another: an upload stores its blob (or
        refreshes the stored time of one already there) before it commits the row that
        names it, and a blob younger than the grace period is never deleted.
        """
        with self.read() as tx:
            referenced = tx.referenced_blobs()
        grace = self.blob_sweep_grace_s if grace_s is None else grace_s
        return self.blobs.sweep(referenced, grace_s=grace)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

