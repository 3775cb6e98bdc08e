"""The lock a running ``ota server`` holds on its data directory.

``ota server`` takes a ``flock`` on ``<data>/server.lock`` for as long as it runs (the
kernel drops it when the process ends, however it ends, so a SIGKILLed server leaves no
stale lock). On the embedded SQLite store the lock is exclusive: one server per data
directory. On a shared database (PostgreSQL) it is shared: several nodes may run on one
data directory, still none beside a restore. Commands that must not run beside any server,
such as ``ota admin restore``, take it exclusively and so refuse while a server runs, and a
server refuses to start while they hold it. An exclusive holder writes its process id into
the file, for the error message.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from otacore.errors import OtaError
from server.private_files import PRIVATE_FILE_MODE, make_private_dir

#: The lock file's name inside the data directory.
LOCK_FILENAME = "server.lock"


class DataDirBusyError(OtaError):
    """Another process (a running server, or a restore) holds the data directory's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


@contextmanager
def hold_data_dir(data_dir: Path | str, purpose: str = "ota server", *,
                  shared: bool = False) -> Iterator[Path]:
    """Hold the data directory's lock for the ``with`` block (creating the directory
    owner-only if missing), exclusively or ``shared`` with other shared holders; yields the
    lock file's path. Raises DataDirBusyError at once (no waiting) when another process
    holds it in a conflicting way."""
    root = make_private_dir(data_dir)
    path = root / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise DataDirBusyError(
                f"{root} is in use by another process{_holder(fd)}: a running ota server or "
                f"a restore holds {path}; stop it before starting {purpose} on this directory"
            ) from None
        if not shared:  # shared holders would overwrite each other's
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock

