"""Owner-only files: the data directory and everything the server or CLI writes into it.

The data directory holds the installation's secrets (the CA key, the server key, the
products' firmware signing keys), the database (password hashes, token hashes, device IP
addresses, the audit log) and the firmware blobs. Everything in it is created owner-only,
whatever the process umask: directories 0700, files 0600 (the mode is set explicitly after
creating, since ``mkdir``/``open`` modes are filtered through the umask). A data directory
written by an older release (0755 directories, 0644 files) is tightened when it is opened,
with a warning naming how many entries changed.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

#: Mode of every directory the server creates under (and including) its data directory.
PRIVATE_DIR_MODE = 0o700
#: Mode of every file the server creates under its data directory.
PRIVATE_FILE_MODE = 0o600
#: Permission bits for anyone but the owner: none of them may be set.
_OTHERS = stat.S_IRWXG | stat.S_IRWXO

log = logging.getLogger("ota.files")


def make_private_dir(path: Path | str) -> Path:
    """Create directory ``path`` (and missing parents) with mode 0700 regardless of the
    umask; an existing directory is left as it is. Returns ``path`` as a Path."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:  # created meanwhile by another process: fine
            continue
        os.chmod(directory, PRIVATE_DIR_MODE)  # mkdir's mode went through the umask
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    return path


def create_private_file(path: Path | str) -> bool:
    """Create ``path`` empty with mode 0600 if it does not exist (True if it created it).

    Used before a library creates the file itself (SQLite makes the database 0644 less the
    umask, and its ``-wal``/``-shm`` files copy the database's mode: https://sqlite.org/tempfiles.html).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)
    return True


def write_private_fd(fd: int, data: bytes) -> None:
    """Make the new file ``fd`` 0600 (whatever the umask), write ``data``, fsync it and close
    ``fd``: the durable, owner-only write every private file of the data directory gets."""
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), PRIVATE_FILE_MODE)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_private_file(path: Path | str, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600 regardless of the umask.

    ``exclusive``: fail with FileExistsError if ``path`` exists (private keys are never
    replaced). Otherwise the file is replaced atomically (temporary file in the same
    directory, fsync, rename), so readers see the old or the new content, never a part.
    """
    path = Path(path)
    if exclusive:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        write_private_fd(fd, data)
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        write_private_fd(fd, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_private(path: Path | str) -> bool:
    """True when no one but the owner has any permission on ``path`` (not following links)."""
    return os.lstat(path).st_mode & _OTHERS == 0


def tighten_tree(root: Path | str) -> list[Path]:
    """Remove group and other permissions from ``root`` and everything below it (symbolic
    links are neither followed nor changed). Returns the paths changed. Entries that cannot
    be changed (owned by another user) are logged and skipped."""
    root = Path(root)
    changed: list[Path] = []

    def tighten(path: Path) -> None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:  # removed meanwhile (e.g. SQLite's -shm file)
            return
        if stat.S_ISLNK(mode) or mode & _OTHERS == 0:
            return
        try:
            os.chmod(path, stat.S_IMODE(mode) & ~_OTHERS)
        except FileNotFoundError:
            return
        except PermissionError as exc:
            log.warning("cannot make %s private (%s); fix its owner or mode by hand", path, exc)
            return
        changed.append(path)

    tighten(root)
    for directory, subdirs, files in os.walk(root):
        base = Path(directory)
        for name in subdirs + files:
            tighten(base / name)
    return changed


def secure_data_dir(data_dir: Path | str) -> Path:
    """Create the data directory owner-only, or tighten an existing one: afterwards no
    entry in it grants group or other users any permission. Logs a warning when it had to
    change something (a data directory written by an older release, or files copied in)."""
    root = make_private_dir(data_dir)
    changed = tighten_tree(root)
    if changed:
        log.warning(
            "%s was readable by other users: removed group/other permissions from %d "
            "entries (directories are now 0700, files 0600)",
            root,
            len(changed),
        )
    return root
