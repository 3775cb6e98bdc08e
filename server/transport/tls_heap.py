"""Give the C heap's free pages back to the system once TLS sessions go quiet.

A TLS handshake allocates tens of KiB in OpenSSL and frees them at the hand-over; a session's
AEAD contexts (~2.5 KiB each, :mod:`server.transport.tls_session`) are freed when it goes
quiet. glibc keeps such freed chunks in its heap, interleaved with live ones, so after a burst
of handshakes the process's RSS stays at the burst's high-water mark: measured with
bench/sessions/session_memory.py, about 5 KiB per idle session at 1,000-2,000 sessions.
``malloc_trim(0)`` returns the free pages inside the heap (madvise), in about 1 ms for a
process holding 2,000 sessions.

:class:`HeapTrimmer` coalesces: whatever frees memory calls :meth:`HeapTrimmer.note_freed`
(cheap, synchronous); the trimmer's task trims at most once per ``interval`` seconds, and only
after something was freed. Without glibc it does nothing. The TLS listener runs one
(:func:`server.transport.tls.serve_tls`); its handshakes and sessions feed it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import trio

__all__ = ["TRIM_INTERVAL", "HeapTrimmer"]

#: Seconds between two trims at most (a burst of handshakes or of sessions going quiet ends
#: in one trim).
TRIM_INTERVAL = 2.0


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Trims the C heap after memory was freed, at most once per ``interval`` seconds."""

    __slots__ = ("_freed", "_trim", "interval", "trims")

    def __init__(
        self, trim: Callable[[int], int] | None = None, *, interval: float = TRIM_INTERVAL
    ) -> None:
        self._trim = trim if trim is not None else _glibc_malloc_trim()
        self.interval = interval
        self._freed: trio.Event | None = None  # while run() waits for a free
        #: How many trims ran (monitoring and tests).
        self.trims = 0

    @property
    def available(self) -> bool:
        """True if this C library can trim its heap."""
        return self._trim is not None

    def note_freed(self) -> None:
        """Something released a notable amount of C heap (a handshake ended, a session
        dropped its ciphers): trim soon."""
        freed = self._freed
        if freed is not None:
            freed.set()

    async def run(self) -> None:
        """Trim after memory was freed, at most once per interval; runs until cancelled."""
        if self._trim is None:
            return
        try:
            while True:
                self._freed = trio.Event()
                await self._freed.wait()
                await trio.sleep(self.interval)  # let the burst end
                self._freed = None  # frees during the trim are covered by it
                self._trim(0)
                self.trims += 1
        finally:
            self._freed = None
