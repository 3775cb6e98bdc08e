"""``ota admin backup``: a consistent copy of an installation with the embedded store,
taken while its server runs.

1. **Pin the blobs.** Every blob in ``<data>/blobs`` is hard-linked into a pin directory
   beside it (copied where links are impossible). A pin keeps the blob's bytes reachable
   even if the server deletes the blob (a deleted firmware, a sweep) while the backup runs;
   blobs are immutable once named (written to a temporary file, then renamed: blobs.py).
2. **Copy the database** with SQLite's online backup API, ``step_pages`` pages per step.
   Each step is a short read transaction; in WAL mode a reader never blocks the writers
   (https://sqlite.org/wal.html, "Concurrency"). A write by another connection restarts the
   copy at its next step (https://sqlite.org/c3ref/backup_finish.html); after
   ``max_restarts`` restarts the rest is copied in one step (one read transaction, still no
   writer blocked), so a busy server cannot starve the backup.
3. **Copy the blobs the database copy refers to** from their pins (a blob uploaded after
   the pins were made is pinned then), each verified by its SHA-256 as it is copied. A
   referenced blob that cannot be found is an error, never a silent gap: the whole backup
   is tried again (``blob_attempts`` times: the firmware may have been deleted between the
   copy and the pin), then BackupBlobError names the blobs.
4. **Copy the data directory's other files** (CA, server certificate, the key-encryption
   key of the signing keys, which are in the database copy).
5. **Write the manifest**, fsync the tree and rename it from its temporary name to DEST:
   a crash at any moment leaves no directory named DEST, only ``.DEST.partial-*``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from server.data_lock import LOCK_FILENAME
from server.private_files import create_private_file, make_private_dir, write_private_file
from server.store.backup_files import (
    BLOBS_DIR,
    DATA_DIR,
    DATABASE_NAME,
    MANIFEST_NAME,
    BackupBlobError,
    BackupError,
    BackupUnsupportedError,
    FileEntry,
    Manifest,
    copy_hashed,
    fsync_dir,
    fsync_tree,
    hash_file,
)
from server.store.blobs import check_sha256_name
from server.store.installation import effective_db_url, sqlite_database_path
from server.store.sqlite import BUSY_TIMEOUT_MS
from server.store.store import BLOB_DIRNAME, DB_FILENAME, Tx

log = logging.getLogger("ota.backup")

#: Pages the online backup copies per step (4 MiB at SQLite's default 4 KiB page).
DEFAULT_STEP_PAGES = 1024
#: Restarts of the stepped copy (writes by the server) before the rest goes in one step.
DEFAULT_MAX_RESTARTS = 3
#: Whole-backup attempts when a referenced blob vanished meanwhile.
BLOB_ATTEMPTS = 3
#: Prefix of the pin directories (in the data directory) and of unfinished backups.
PIN_PREFIX = ".backup-pins-"
PARTIAL_MARK = ".partial-"
#: The lock file running backups hold shared in the data directory (see _claim_pin_area).
PINS_LOCK = ".backup-pins.lock"

#: Entries of the data directory that are not copied into ``data/``: the database and its
#: journal files, the blobs (copied apart, by reference) and the server's lock.
_NOT_DATA = {BLOB_DIRNAME, LOCK_FILENAME, PINS_LOCK, DB_FILENAME, f"{DB_FILENAME}-wal",
             f"{DB_FILENAME}-shm", f"{DB_FILENAME}-journal"}

#: pysqlite's step status codes (the progress callback's first argument).
_SQLITE_OK, _SQLITE_DONE = 0, 101


class _TooManyRestarts(Exception):
    """Raised from the progress callback to stop the stepped copy."""


def backup_installation(
    data_dir: Path | str,
    dest: Path | str,
    *,
    db_url: str | None = None,
    step_pages: int = DEFAULT_STEP_PAGES,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    blob_attempts: int = BLOB_ATTEMPTS,
) -> Manifest:
    """Back up the installation in ``data_dir`` (with ``db_url``: None or a ``sqlite:///``
    URL) into the new directory ``dest``; safe while its server runs. Returns the manifest.

    Raises BackupUnsupportedError for a PostgreSQL installation (pg_dump backs that up),
    BackupError when ``dest`` exists or the data directory holds no store, and
    BackupBlobError when a blob the database refers to is missing or corrupt.
    """
    data_dir, dest = Path(data_dir), Path(dest)
    if step_pages < 1 and step_pages != -1:
        raise BackupError(f"step_pages must be a positive number of pages (or -1: all at "
                          f"once), not {step_pages}")
    database = sqlite_database_path(data_dir, db_url)
    if database is None:
        raise BackupUnsupportedError(
            "ota admin backup copies the embedded SQLite store; this installation's database "
            f"is {_backend(db_url)}: back it up with pg_dump (e.g. pg_dump -Fc -f ota.dump "
            "DBNAME; pg_restore brings it back) and copy the data directory (keys, CA, "
            "certificates) beside the dump; see the README's Backups section"
        )
    if not data_dir.is_dir():
        raise BackupError(f"{data_dir} is not a data directory (it does not exist)")
    if not database.is_file():
        raise BackupError(f"{data_dir} holds no store ({database} does not exist); is "
                          "--data (or --db-url) right?")
    if dest.exists() or dest.is_symlink():
        raise BackupError(f"{dest} exists; a backup goes to a new directory (give another "
                          "name, or remove the old one)")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest.parent} does not exist; create it first")
    for attempt in range(1, blob_attempts + 1):
        try:
            return _backup_once(data_dir, database, dest, step_pages, max_restarts)
        except _BlobsVanished as vanished:
            if attempt == blob_attempts:
                raise BackupBlobError(
                    f"the database refers to {len(vanished.names)} blobs missing from "
                    f"{data_dir / BLOB_DIRNAME} ({', '.join(vanished.names[:3])}); after "
                    f"{blob_attempts} attempts they are still missing: the installation has "
                    "lost them (restore them from an older backup, or delete the firmware "
                    "that names them), no backup was written"
                ) from None
            log.info("backup attempt %d: %d referenced blobs vanished meanwhile (a firmware "
                     "deleted?); trying again", attempt, len(vanished.names))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


class _BlobsVanished(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"{len(names)} referenced blobs missing")
        self.names = names


def _backend(db_url: str | None) -> str:
    url = effective_db_url(db_url) or ""
    try:
        return sa.make_url(url).get_backend_name()
    except sa.exc.ArgumentError:  # pragma: no cover - sqlite_database_path parsed it
        return "not SQLite"


def _backup_once(data_dir: Path, database: Path, dest: Path, step_pages: int,
                 max_restarts: int) -> Manifest:
    token = secrets.token_hex(4)
    staging = dest.parent / f".{dest.name}{PARTIAL_MARK}{token}"
    pins = data_dir / f"{PIN_PREFIX}{token}"
    pin_lock: int | None = None
    try:
        make_private_dir(staging)
        try:
            pin_lock = _claim_pin_area(data_dir)
            make_private_dir(pins)
        except PermissionError:  # a data directory this user may only read: pin by copying
            pins = staging / f"{PIN_PREFIX}{token}"
            make_private_dir(pins)
        _pin_blobs(data_dir / BLOB_DIRNAME, pins)
        files: dict[str, FileEntry] = {}
        copy = staging / DATABASE_NAME
        restarts = _copy_database(database, copy, step_pages, max_restarts)
        schema_version, alembic_revision = _schema_revision(copy)
        referenced = _referenced_blobs(copy)
        _copy_blobs(referenced, data_dir / BLOB_DIRNAME, pins, staging, files)
        shutil.rmtree(pins, ignore_errors=True)  # the copies are made: let the links go
        files[DATABASE_NAME] = hash_file(copy)
        _copy_data_files(data_dir, database, staging, files)
        manifest = Manifest(
            created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            source=str(data_dir.resolve()),
            schema_version=schema_version,
            alembic_revision=alembic_revision,
            copy_restarts=restarts,
            files=files,
        )
        write_private_file(staging / MANIFEST_NAME,
                           json.dumps(manifest.to_json(), indent=1).encode() + b"\n")
        fsync_tree(staging)
        if dest.exists():
            raise BackupError(f"{dest} appeared while the backup ran; no backup was "
                              "written, give another name")
        os.rename(staging, dest)
        fsync_dir(dest.parent)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(pins, ignore_errors=True)
        if pin_lock is not None:
            os.close(pin_lock)


def _live_blobs(blob_root: Path) -> list[tuple[str, Path]]:
    """Every blob file in a live blob directory (never its ``tmp``: uploads in progress)."""
    found: list[tuple[str, Path]] = []
    if not blob_root.is_dir():
        return found
    for shard in blob_root.iterdir():
        if len(shard.name) != 2 or not shard.is_dir():
            continue
        for entry in shard.iterdir():
            try:
                found.append((check_sha256_name(entry.name), entry))
            except ValueError:
                continue
    return found


def _pin(source: Path, pin: Path) -> bool:
    """Hard-link (or, across file systems, copy) one blob to its pin; False when the blob
    is gone."""
    make_private_dir(pin.parent)
    try:
        os.link(source, pin)
    except FileNotFoundError:
        return False
    except FileExistsError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        try:
            copy_hashed(source, pin)
        except FileNotFoundError:
            return False
    return True


def _claim_pin_area(data_dir: Path) -> int:
    """Hold ``.backup-pins.lock`` shared while this backup's pins exist (returns the
    descriptor). Pin directories left by a backup that died (killed, power lost) would keep
    deleted blobs' space in use forever: when no other backup holds the lock, they are
    removed first. A backup running now holds it shared, so its pins are left alone."""
    fd = os.open(data_dir / PINS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
    else:  # no backup runs: every pin directory is a dead one's
        for stale in data_dir.glob(f"{PIN_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    fcntl.flock(fd, fcntl.LOCK_SH)  # this backup's pins exist only under it
    return fd


def _pin_blobs(blob_root: Path, pins: Path) -> None:
    for name, path in _live_blobs(blob_root):
        _pin(path, pins / name[:2] / name)


def _copy_database(source: Path, target: Path, step_pages: int, max_restarts: int,
                   after_step: Callable[[], None] | None = None) -> int:
    """Copy the SQLite database with the online backup API; returns how often the stepped
    copy restarted because the server wrote meanwhile. ``after_step`` runs after each step
    of the stepped copy (a test writes there, as a busy server would)."""
    create_private_file(target)  # 0600 before SQLite writes it
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True,
                          timeout=BUSY_TIMEOUT_MS / 1000)
    dst = sqlite3.connect(target)
    restarts = 0
    try:
        last_remaining: int | None = None

        def progress(status: int, remaining: int, total: int) -> None:
            nonlocal restarts, last_remaining
            if status not in (_SQLITE_OK, _SQLITE_DONE):
                return  # busy or locked: the step is retried, nothing was copied
            # Each step without a restart lowers the remaining count; a write by another
            # connection restarts the copy from page 1, so the count does not fall.
            if last_remaining is not None and remaining >= last_remaining:
                restarts += 1
                if restarts > max_restarts:
                    raise _TooManyRestarts
            last_remaining = remaining
            if after_step is not None:
                after_step()

        try:
            src.backup(dst, pages=step_pages, progress=progress)
        except _TooManyRestarts:
            log.info("the server wrote during each of %d steps of the database copy; "
                     "copying the rest in one step", restarts)
            src.backup(dst, pages=-1)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal
        verdict = "; ".join(str(row[0]) for row in dst.execute("PRAGMA integrity_check"))
        if verdict != "ok":
            raise BackupError(f"the copy of {source} fails SQLite's integrity check: {verdict}")
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the database {source}: {exc}") from exc
    finally:
        dst.close()
        src.close()
    os.chmod(target, 0o600)
    return restarts


def _schema_revision(copy: Path) -> tuple[int | None, str | None]:
    """The copy's schema version (``meta``) and Alembic revision, if it has them."""
    conn = sqlite3.connect(f"{copy.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        version = revision = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row and str(row[0]).isdigit() else None
        if "alembic_version" in tables:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = str(row[0]) if row else None
        return version, revision
    finally:
        conn.close()


def _referenced_blobs(copy: Path) -> set[str]:
    """Every blob the database copy refers to (the store's own query, on the copy)."""
    engine = sa.create_engine(f"sqlite:///{copy.resolve()}")
    try:
        with engine.connect() as conn:
            return Tx(conn).referenced_blobs()
    except sa.exc.SQLAlchemyError as exc:
        raise BackupError(f"cannot read the blob references of the database copy: {exc}") \
            from exc
    finally:
        engine.dispose()


def _copy_blobs(referenced: set[str], blob_root: Path, pins: Path, staging: Path,
                files: dict[str, FileEntry]) -> None:
    vanished: list[str] = []
    corrupt: list[str] = []
    for name in sorted(referenced):
        pin = pins / name[:2] / name
        # Uploaded after the pins were made (it was stored before its row committed).
        if not pin.exists() and not _pin(blob_root / name[:2] / name, pin):
            vanished.append(name)
            continue
        relative = f"{BLOBS_DIR}/{name[:2]}/{name}"
        entry = copy_hashed(pin, staging / relative)
        if entry.sha256 != name:
            corrupt.append(name)
            continue
        files[relative] = entry
    if corrupt:
        raise BackupBlobError(
            f"{len(corrupt)} blobs in {blob_root} no longer match their SHA-256 "
            f"({', '.join(corrupt[:3])}): the disk damaged them; no backup was written "
            "(restore them from an older backup, or delete the firmware that names them)"
        )
    if vanished:
        raise _BlobsVanished(vanished)


def _copy_data_files(data_dir: Path, database: Path, staging: Path,
                     files: dict[str, FileEntry]) -> None:
    """Copy the data directory's CA, certificates and key-encryption key (everything but
    the store). The products' signing keys are in the database copy, sealed under the KEK
    (server.devices.key_vault); the KEK exists before any key is sealed and is copied after
    the database, so a copy holding sealed keys always comes with the KEK that opens them.
    An older release's key files (``keys/product-*``) are copied as they are."""
    database = database.resolve()
    # A --db-url SQLite file inside DIR, and its journal files, are the database, not data.
    skipped = {database, *(Path(f"{database}{suffix}") for suffix in ("-wal", "-shm", "-journal"))}
    for directory, subdirs, names in os.walk(data_dir):
        base = Path(directory)
        if base == data_dir:
            subdirs[:] = [d for d in subdirs
                          if d not in _NOT_DATA and not d.startswith(PIN_PREFIX)]
        for name in sorted(names):
            path = base / name
            if base == data_dir and name in _NOT_DATA:
                continue
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # a private file being replaced (write_private_file)
            if path.is_symlink() or not path.is_file():
                log.warning("backup: skipped %s (not a regular file)", path)
                continue
            if path.resolve() in skipped:
                continue
            relative = f"{DATA_DIR}/{path.relative_to(data_dir).as_posix()}"
            try:
                files[relative] = copy_hashed(path, staging / relative)
            except FileNotFoundError:  # removed meanwhile
                continue
