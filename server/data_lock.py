"""The lock a running ``ota server`` holds on its data directory.

``ota server`` takes an exclusive ``flock`` on ``<data>/server.lock`` for as long as it
runs (the kernel drops it when the process ends, however it ends, so a SIGKILLed server
leaves no stale lock). Commands that must not run beside a server, such as ``ota admin
restore``, take the same lock and so refuse while a server runs, and a server refuses to
start while they hold it. The file holds the holder's process id, for the error message.
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
def hold_data_dir(data_dir: Path | str, purpose: str = "ota server") -> Iterator[Path]:
    """Hold the data directory's lock for the ``with`` block (creating the directory
    owner-only if missing); yields the lock file's path. Raises DataDirBusyError at once
    (no waiting) when another process holds it."""
    root = make_private_dir(data_dir)
    path = root / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise DataDirBusyError(
                f"{root} is in use by another process{_holder(fd)}: a running ota server or "
                f"a restore holds {path}; stop it before starting {purpose} on this directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def data_dir_in_use(data_dir: Path | str) -> bool:
    """True when a process holds the data directory's lock now (a running server)."""
    path = Path(data_dir) / LOCK_FILENAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False
