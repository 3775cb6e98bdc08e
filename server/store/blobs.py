"""Content-addressed blob directory for firmware binaries.

Each binary is stored once under its SHA-256 (``ab/abcdef...``). A write goes to a temporary
file in the same file system, is fsynced, renamed over the final name (atomic on POSIX), and
then the directory is fsynced so the rename itself is durable: after ``put`` returns the blob
survives SIGKILL and power loss, and a crash at any earlier moment leaves at most a stray
temporary file (removed at the next open), never a partial blob under a real name.

Blobs are written before the database row that names them, so a committed row always finds
its blob; a crash in between leaves an unreferenced blob, which ``sweep`` may remove once it
is older than the sweep's grace period (by the file's mtime, which ``put`` of a blob already
stored refreshes: an upload in progress is never swept from under its row).

:class:`Blobs` is the interface every user of blobs goes through; :class:`BlobStore` is this
directory (the embedded SQLite store's), :class:`server.store.db_blobs.DatabaseBlobStore` the
database's (PostgreSQL: nodes share nothing but the database).

Everything here is owner-only (directories 0700, blobs 0600, whatever the umask): firmware
images are the operator's property, not the other local users'.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from server.private_files import make_private_dir, write_private_fd
from server.store.errors import BlobCorruptError, BlobMissingError, StoreConfigError

_SHA_RE = re.compile(r"[0-9a-f]{64}")  # use fullmatch: "$" also matches before a "\n"
_TMP_DIR = "tmp"

#: A blob younger than this is never swept, referenced or not: its upload may still be on its
#: way to committing the row that names it (another node's, or this one's). An hour: far
#: longer than any upload takes, far shorter than an orphan would matter.
SWEEP_GRACE_S = 3600.0


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_sha256_name(name: str) -> str:
    """Return ``name`` if it is 64 lowercase hex digits, else raise ValueError."""
    if not _SHA_RE.fullmatch(name):
        raise ValueError(f"blob name {name!r} is not a lowercase hex SHA-256")
    return name


@runtime_checkable
class Blobs(Protocol):
    """Content-addressed binaries: what the fleet code uses, whichever store holds them.

    Every implementation guarantees: ``put`` is idempotent (the same bytes twice are one
    blob) and atomic (a blob is either whole under its name or absent); ``get`` with
    ``verify`` never returns bytes that do not hash to their name (BlobCorruptError);
    a missing blob raises BlobMissingError."""

    def exists(self, sha256: str) -> bool:
        """True when the blob is stored."""
        ...

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its SHA-256 (hex). Idempotent; storing a blob
        that is already there refreshes its stored time (see :meth:`sweep`)."""
        ...

    def get(self, sha256: str, *, verify: bool = True) -> bytes:
        """A whole blob; with ``verify`` checked against its name."""
        ...

    def read_range(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer at the end), without the rest."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove a blob (no error if absent)."""
        ...

    def names(self) -> Iterator[str]:
        """Every stored blob's SHA-256."""
        ...

    def sweep(self, referenced: set[str], *, grace_s: float = SWEEP_GRACE_S) -> list[str]:
        """Delete blobs not in ``referenced`` and stored more than ``grace_s`` seconds ago;
        return their names."""
        ...


def check_range(offset: int, length: int) -> None:
    """Refuse a negative blob range (ValueError)."""
    if offset < 0 or length < 0:
        raise ValueError("a blob range needs a non-negative offset and length")


class BlobStore:
    """Binaries named by their SHA-256 in a directory tree; safe against crashes."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        try:
            make_private_dir(self.root / _TMP_DIR)
        except OSError as exc:
            raise StoreConfigError(f"cannot create blob directory {self.root}: {exc}") from exc
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        # Leftovers of writes interrupted by a crash: never renamed, so never acknowledged.
        for leftover in (self.root / _TMP_DIR).iterdir():
            leftover.unlink(missing_ok=True)

    def path_of(self, sha256: str) -> Path:
        """Where the blob named ``sha256`` lives (whether or not it exists)."""
        check_sha256_name(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """True when the blob is stored."""
        return self.path_of(sha256).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its SHA-256 (hex). Idempotent."""
        sha256 = hashlib.sha256(data).hexdigest()
        final = self.path_of(sha256)
        if final.is_file() and final.stat().st_size == len(data):
            # Already stored (perhaps an orphan near the sweep's grace): a fresh mtime keeps
            # the sweep off it until the caller's row is committed.
            os.utime(final)
            return sha256
        shard = final.parent
        if not shard.exists():
            make_private_dir(shard)
            _fsync_dir(self.root)
        # mkstemp creates the file 0600 (owner-only) whatever the umask.
        fd, tmp_name = tempfile.mkstemp(dir=self.root / _TMP_DIR, prefix=sha256[:16] + ".")
        try:
            write_private_fd(fd, data)
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(shard)
        return sha256

    def get(self, sha256: str, *, verify: bool = True) -> bytes:
        """Read a blob; with ``verify`` check it still hashes to its name."""
        try:
            data = self.path_of(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise BlobMissingError(f"binary {sha256} is missing from {self.root}") from exc
        if verify and hashlib.sha256(data).hexdigest() != sha256:
            raise BlobCorruptError(f"binary {sha256} in {self.root} is corrupt (hash differs)")
        return data

    def read_range(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a blob from ``offset`` (fewer at its end), without
        reading or hashing the rest: a block of a download costs the block. Unverified:
        the reader names the blob by its SHA-256 and checks the whole file itself."""
        check_range(offset, length)
        try:
            fd = os.open(self.path_of(sha256), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise BlobMissingError(f"binary {sha256} is missing from {self.root}") from exc
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def delete(self, sha256: str) -> None:
        """Remove a blob (no error if absent)."""
        path = self.path_of(sha256)
        if path.exists():
            path.unlink()
            _fsync_dir(path.parent)

    def names(self) -> Iterator[str]:
        """Every stored blob's SHA-256."""
        for shard in sorted(self.root.iterdir()):
            if shard.name == _TMP_DIR or not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                if _SHA_RE.fullmatch(entry.name):
                    yield entry.name

    def sweep(self, referenced: set[str], *, grace_s: float = SWEEP_GRACE_S) -> list[str]:
        """Delete blobs not in ``referenced`` (left by crashes or deletions) whose file was
        last stored (mtime) more than ``grace_s`` seconds ago; return their names."""
        cutoff = time.time() - grace_s
        removed = []
        for name in self.names():
            if name in referenced:
                continue
            path = self.path_of(name)
            try:
                # Stat right before the unlink: a ``put`` that just refreshed the mtime wins.
                if path.stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            self.delete(name)
            removed.append(name)
        return removed
