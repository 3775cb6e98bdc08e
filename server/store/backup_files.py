"""What a backup of an installation is on disk, and how its files are written and checked.

A backup is one directory::

    manifest.json        what, when, schema revision, SHA-256 and size of every other file
    ota.db               a consistent copy of the SQLite database (online backup API)
    blobs/ab/abcd...     every firmware blob that copy refers to, verified by its SHA-256
    data/...             the data directory's other files: CA, server certificate and key,
                         the key-encryption key of the products' signing keys (all 0600;
                         the keys and statements themselves are in ota.db, sealed)

Every file and directory in it is owner-only (0600 / 0700, :mod:`server.private_files`):
it holds the installation's private keys. :func:`verify_backup` checks a backup against its
manifest: the same set of files, each with the size and SHA-256 recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import otacore
from otacore.errors import StoreError
from server.private_files import PRIVATE_FILE_MODE, make_private_dir

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "otacloud-backup"
FORMAT_VERSION = 1
#: The database copy's name in a backup.
DATABASE_NAME = "ota.db"
#: The folder of the blob copies in a backup (laid out as in the data directory).
BLOBS_DIR = "blobs"
#: The folder of the data directory's other files in a backup.
DATA_DIR = "data"

_CHUNK = 1 << 20


class BackupError(StoreError):
    """A backup or restore could not be done; nothing was left that looks whole."""


class BackupUnsupportedError(BackupError):
    """The installation's database is not the embedded SQLite store (use pg_dump)."""


class BackupBlobError(BackupError):
    """A blob the database copy refers to is missing from, or corrupt in, the installation."""


class BackupIntegrityError(BackupError):
    """A backup does not match its manifest (a file missing, added, truncated or changed)."""


class RestoreRefusedError(BackupError):
    """The restore target is not empty (without --force), or it cannot be swapped in."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a backup as the manifest records it."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A backup's manifest: what it holds and how to check it."""

    created_at: str
    source: str
    schema_version: int | None
    alembic_revision: str | None
    copy_restarts: int
    files: dict[str, FileEntry]

    @property
    def blobs(self) -> list[str]:
        """The SHA-256 names of the blobs the backup holds."""
        prefix = BLOBS_DIR + "/"
        return sorted(name.rsplit("/", 1)[1] for name in self.files if name.startswith(prefix))

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``manifest.json``."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": self.created_at,
            "created_by": f"otacloud {otacore.__version__}",
            "source": self.source,
            "database": {
                "file": DATABASE_NAME,
                "backend": "sqlite",
                "schema_version": self.schema_version,
                "alembic_revision": self.alembic_revision,
                "copy_restarts": self.copy_restarts,
            },
            "blobs": len(self.blobs),
            "files": {name: {"sha256": entry.sha256, "size": entry.size}
                      for name, entry in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, obj: Any, where: Path) -> Manifest:
        """Parse a manifest; BackupIntegrityError naming what is wrong."""
        def bad(why: str) -> BackupIntegrityError:
            return BackupIntegrityError(f"{where} is not a valid backup manifest: {why}")

        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise bad(f"its format is not {FORMAT_NAME!r}")
        if obj.get("format_version") != FORMAT_VERSION:
            raise bad(f"format version {obj.get('format_version')!r}; this release reads "
                      f"version {FORMAT_VERSION}")
        database, files = obj.get("database"), obj.get("files")
        if not isinstance(database, dict) or not isinstance(files, dict):
            raise bad("it lacks the database or files section")
        entries: dict[str, FileEntry] = {}
        for name, entry in files.items():
            if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                    or not isinstance(entry.get("size"), int)):
                raise bad(f"the entry of {name!r} needs sha256 and size")
            if not _safe_relative(name):
                raise bad(f"file name {name!r} leaves the backup directory")
            entries[name] = FileEntry(entry["sha256"], entry["size"])
        if DATABASE_NAME not in entries:
            raise bad(f"it lists no {DATABASE_NAME}")
        version = database.get("schema_version")
        revision = database.get("alembic_revision")
        return cls(
            created_at=str(obj.get("created_at", "")),
            source=str(obj.get("source", "")),
            schema_version=version if isinstance(version, int) else None,
            alembic_revision=revision if isinstance(revision, str) else None,
            copy_restarts=int(database.get("copy_restarts", 0) or 0),
            files=entries,
        )


def _safe_relative(name: str) -> bool:
    path = Path(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def fsync_dir(path: Path) -> None:
    """Make the entries created or renamed in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path) -> FileEntry:
    """SHA-256 and size of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(digest.hexdigest(), size)


def copy_hashed(source: Path, target: Path) -> FileEntry:
    """Copy ``source`` to the new file ``target`` (0600, created exclusively, fsynced) and
    return the SHA-256 and size of the bytes copied: what was written is what was hashed."""
    make_private_dir(target.parent)
    digest, size = hashlib.sha256(), 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # whatever the umask
        with source.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return FileEntry(digest.hexdigest(), size)


def fsync_tree(root: Path) -> None:
    """fsync every directory of a tree (its files were fsynced when written), so the whole
    tree is durable before it is renamed into place."""
    for directory, _subdirs, _files in os.walk(root):
        fsync_dir(Path(directory))


def backup_listing(root: Path) -> dict[str, Path]:
    """Every file of a backup directory but its manifest (relative name -> path).
    BackupIntegrityError for anything but regular files and directories (a symbolic link
    could point out of the backup)."""
    found: dict[str, Path] = {}
    for directory, subdirs, files in os.walk(root):
        base = Path(directory)
        for name in subdirs + files:
            path = base / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise BackupIntegrityError(f"{path} in the backup is not a regular file or "
                                           "directory; a backup holds nothing else")
        for name in files:
            relative = (base / name).relative_to(root).as_posix()
            if relative != MANIFEST_NAME:
                found[relative] = base / name
    return found


def read_manifest(root: Path) -> Manifest:
    """The manifest of the backup in ``root`` (BackupIntegrityError when absent or bad)."""
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BackupIntegrityError(f"{root} is not a backup directory (it does not exist or "
                                   "is not a directory)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupIntegrityError(f"{root} holds no {MANIFEST_NAME}: not a backup, or one "
                                   "interrupted before it was complete") from None
    except (OSError, ValueError) as exc:
        raise BackupIntegrityError(f"cannot read {path}: {exc}") from exc
    return Manifest.from_json(obj, path)


def verify_backup(root: Path | str) -> Manifest:
    """Check the backup in ``root`` against its manifest: the same files, none added or
    missing, each of the recorded size and SHA-256. Returns the manifest;
    BackupIntegrityError naming the first files that differ."""
    root = Path(root)
    manifest = read_manifest(root)
    listing = backup_listing(root)
    missing = sorted(set(manifest.files) - set(listing))
    extra = sorted(set(listing) - set(manifest.files))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if extra:
            parts.append(f"not in the manifest {', '.join(extra[:5])}")
        raise BackupIntegrityError(f"backup {root} does not match its manifest: "
                                   + "; ".join(parts))
    changed = [name for name, path in sorted(listing.items())
               if hash_file(path) != manifest.files[name]]
    if changed:
        raise BackupIntegrityError(
            f"backup {root} does not match its manifest: {len(changed)} files changed "
            f"({', '.join(changed[:5])}); it was altered or damaged since it was taken"
        )
    return manifest
