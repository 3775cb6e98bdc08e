"""``ota admin restore``: bring a backup (server/store/backup.py) back into a data directory.

The backup is verified against its manifest first. The restore then holds the data
directory's lock (server/data_lock.py), so it refuses while a server runs there and no
server starts while it works. It builds the new data directory beside the target (same file
system), checking every file's SHA-256 again as it is copied and the database with SQLite's
``integrity_check``, and swaps it in by renaming: the target is either the old directory or
the restored one, never a mixture. A database outside the data directory (a ``sqlite:///``
``--db-url``) is replaced the same way, by rename, after its old journal files are removed.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from server.data_lock import LOCK_FILENAME, DataDirBusyError, hold_data_dir
from server.private_files import make_private_dir
from server.store import schema
from server.store.backup_files import (
    BLOBS_DIR,
    DATA_DIR,
    DATABASE_NAME,
    BackupIntegrityError,
    BackupUnsupportedError,
    Manifest,
    RestoreRefusedError,
    copy_hashed,
    fsync_dir,
    fsync_tree,
    verify_backup,
)
from server.store.installation import sqlite_database_path
from server.store.store import BLOB_DIRNAME

log = logging.getLogger("ota.backup")


@dataclass(frozen=True)
class RestoreResult:
    """What a restore brought back, and where."""

    manifest: Manifest
    data_dir: Path
    database: Path
    replaced: bool


def restore_installation(
    source: Path | str, data_dir: Path | str, *, db_url: str | None = None, force: bool = False
) -> RestoreResult:
    """Restore the backup in ``source`` into ``data_dir`` (its database to ``db_url`` when
    that is a ``sqlite:///`` URL outside the data directory).

    Raises BackupIntegrityError when the backup does not match its manifest,
    DataDirBusyError while a server runs on ``data_dir``, RestoreRefusedError when the
    target holds an installation and ``force`` is false (or the backup's schema is newer
    than this release's), BackupUnsupportedError for a PostgreSQL ``db_url``.
    """
    source, data_dir = Path(source), Path(data_dir)
    database = sqlite_database_path(data_dir, db_url)
    if database is None:
        raise BackupUnsupportedError(
            "ota admin restore brings back the embedded SQLite store; restore a PostgreSQL "
            "database with pg_restore and copy the data directory back by hand (README, "
            "Backups)"
        )
    manifest = verify_backup(source)
    if manifest.schema_version is not None and manifest.schema_version > schema.SCHEMA_VERSION:
        raise RestoreRefusedError(
            f"the backup has schema version {manifest.schema_version}, newer than this "
            f"release's {schema.SCHEMA_VERSION}; restore it with the release that took it"
        )
    # A database inside the data directory is restored with it (swapped in by the same
    # rename); one elsewhere is replaced on its own.
    inside = database.resolve().is_relative_to(data_dir.resolve())
    external = None if inside else database
    try:
        with hold_data_dir(data_dir, purpose="a restore"):
            replaced = _occupied(data_dir, external)
            if replaced and not force:
                raise RestoreRefusedError(
                    f"{data_dir} already holds an installation (or {database} exists); "
                    "restore into an empty or new directory, or give --force to replace it"
                )
            _restore_locked(source, manifest, data_dir, database, external)
    except DataDirBusyError as exc:
        raise DataDirBusyError(f"cannot restore: {exc}") from None
    return RestoreResult(manifest, data_dir, database, replaced)


def _occupied(data_dir: Path, external: Path | None) -> bool:
    entries = [entry for entry in data_dir.iterdir() if entry.name != LOCK_FILENAME]
    return bool(entries) or (external is not None and external.exists()
                             and external.stat().st_size > 0)


def _restore_locked(source: Path, manifest: Manifest, data_dir: Path, database: Path,
                    external: Path | None) -> None:
    token = secrets.token_hex(4)
    parent = data_dir.resolve().parent
    staging = parent / f".{data_dir.name}.restore-{token}"
    old = parent / f".{data_dir.name}.replaced-{token}"
    try:
        make_private_dir(staging)
    except PermissionError as exc:
        raise RestoreRefusedError(
            f"cannot create {staging}: a restore builds the new data directory beside "
            f"{data_dir} and swaps it in by renaming, which needs write access to {parent}"
        ) from exc
    db_staged = (external.parent / f".{external.name}.restore-{token}"
                 if external is not None else
                 staging / database.resolve().relative_to(data_dir.resolve()))
    try:
        # The staged directory is locked too: once renamed into place it is the locked one.
        with hold_data_dir(staging, purpose="a restore"):
            for name, entry in sorted(manifest.files.items()):
                target = _target_of(name, staging, db_staged)
                if copy_hashed(source / name, target) != entry:
                    raise BackupIntegrityError(f"{source / name} changed while it was restored; "
                                               "nothing was replaced")
            _check_database(db_staged)
            make_private_dir(staging / BLOB_DIRNAME)
            fsync_tree(staging)
            if external is not None:
                make_private_dir(external.parent)
                for suffix in ("-wal", "-shm", "-journal"):  # never pair the copy with an
                    Path(f"{external}{suffix}").unlink(missing_ok=True)  # old log
                os.replace(db_staged, external)
                fsync_dir(external.parent)
            if data_dir.exists():
                os.rename(data_dir, old)
            os.rename(staging, data_dir)
            fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if external is not None:
            db_staged.unlink(missing_ok=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _target_of(name: str, staging: Path, db_staged: Path) -> Path:
    if name == DATABASE_NAME:
        return db_staged
    top, _, rest = name.partition("/")
    if top == BLOBS_DIR and rest:
        return staging / BLOB_DIRNAME / rest
    if top == DATA_DIR and rest:
        return staging / rest
    raise BackupIntegrityError(f"the manifest lists {name!r}, which no backup holds")


def _check_database(path: Path) -> None:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        verdict = "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))
    except sqlite3.Error as exc:
        raise BackupIntegrityError(f"the backup's database cannot be read: {exc}") from exc
    finally:
        conn.close()
    if verdict != "ok":
        raise BackupIntegrityError(f"the backup's database fails SQLite's integrity check: "
                                   f"{verdict}")
