"""What quiet TLS sessions give back: their AEAD objects, then the C heap's free pages.

A session's AEAD contexts cost ~2.5 KiB each (cryptography keeps an OpenSSL cipher context
per object); :class:`~otacore.records.tls13.Tls13RecordLayer` keeps the 28-44 bytes of key
and IV each direction's secret gave (RFC 8446 7.3) and rebuilds them from those in ~1-2 us
for both directions (deriving them again from the secrets, as it once did, took ~10 us:
bench/test_bench_tls13_wake.py). :class:`IdleSweeper` is the listener's one timer for
this: sessions that used their ciphers join its set (once per quiet-to-busy change, not per
record), and every ``interval`` seconds the sessions quiet for ``quiet_after`` seconds drop
them. A per-session timer would cost microseconds on every receive instead.

A TLS handshake also allocates tens of KiB in OpenSSL and frees them at the hand-over. glibc
keeps freed chunks in its heap, interleaved with live ones, so after a burst of handshakes or
of sessions going quiet the process's RSS stays at the burst's high-water mark (measured with
bench/sessions/session_memory.py: about 5 KiB per idle session at 1,000-2,000 sessions). After
something was freed the sweeper calls glibc's ``malloc_trim(0)``, which returns the free pages
inside the heap (about 1 ms for a process holding 2,000 sessions), at most once per
``trim_interval`` seconds. Without glibc it only drops ciphers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Protocol

import trio

from server.transport.limits import (
    CIPHER_IDLE_SECONDS,
    SWEEP_INTERVAL,
    TRIM_INTERVAL,
    SessionLimits,
)

__all__ = ["CIPHER_IDLE_SECONDS", "IdleSweeper", "QuietSession"]

# The defaults (seconds): a session quiet for CIPHER_IDLE_SECONDS drops its AEAD objects
# (up to one SWEEP_INTERVAL more), heap trims come TRIM_INTERVAL apart at least. Operators
# set them as SessionLimits cipher_idle_timeout, idle_sweep_interval, heap_trim_interval
# (``[sessions]`` of ``ota server --config``, ``--device-limit NAME=SECONDS``).


class QuietSession(Protocol):
    """What the sweeper needs of a session."""

    def quiet_for(self, now: float) -> float:
        """Seconds since the session's last traffic."""
        ...

    def rest(self) -> bool:
        """Drop the ciphers if no record is being sealed; True if dropped."""
        ...


def glibc_malloc_trim() -> Callable[[int], int] | None:
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


class IdleSweeper:
    """Drops the ciphers of quiet sessions and trims the C heap after frees (see the module
    documentation); :meth:`run` is its one task."""

    __slots__ = (
        "_busy",
        "_freed",
        "_last_trim",
        "_trim",
        "interval",
        "quiet_after",
        "trim_interval",
        "trims",
    )

    def __init__(
        self,
        trim: Callable[[int], int] | None = None,
        *,
        quiet_after: float = CIPHER_IDLE_SECONDS,
        interval: float = SWEEP_INTERVAL,
        trim_interval: float = TRIM_INTERVAL,
    ) -> None:
        if trim is None and trim_interval > 0:  # 0: never trim (the operator's choice)
            trim = glibc_malloc_trim()
        self._trim = trim if trim_interval > 0 else None
        self.quiet_after = quiet_after
        self.interval = interval
        self.trim_interval = trim_interval
        # Sessions holding ciphers (they joined on their first record since resting).
        self._busy: set[QuietSession] = set()
        self._freed = False
        self._last_trim = -float("inf")
        #: How many heap trims ran (monitoring and tests).
        self.trims = 0

    @classmethod
    def from_limits(cls, limits: SessionLimits) -> IdleSweeper:
        """A sweeper with the operator's settings (``cipher_idle_timeout``,
        ``idle_sweep_interval``, ``heap_trim_interval``; 0 never trims)."""
        return cls(
            quiet_after=limits.cipher_idle_timeout,
            interval=limits.idle_sweep_interval,
            trim_interval=limits.heap_trim_interval,
        )

    @property
    def can_trim(self) -> bool:
        """True if this C library can trim its heap (glibc)."""
        return self._trim is not None

    @property
    def holding_ciphers(self) -> int:
        """Sessions holding their AEAD objects now."""
        return len(self._busy)

    def busy(self, session: QuietSession) -> None:
        """``session`` derived its ciphers: drop them once it is quiet."""
        self._busy.add(session)

    def forget(self, session: QuietSession) -> None:
        """``session`` ended (or rested on its own)."""
        self._busy.discard(session)

    def note_freed(self) -> None:
        """Something released a notable amount of C heap (a handshake ended)."""
        self._freed = True

    def sweep(self, now: float) -> int:
        """Drop the ciphers of the sessions quiet for ``quiet_after``; how many did."""
        quiet = [s for s in self._busy if s.quiet_for(now) >= self.quiet_after]
        rested = 0
        for session in quiet:
            if session.rest():
                self._busy.discard(session)
                rested += 1
        if rested:
            self._freed = True
        if self._freed and self._trim is not None and now - self._last_trim >= self.trim_interval:
            self._freed = False
            self._last_trim = now
            self._trim(0)
            self.trims += 1
        return rested

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled."""
        while True:
            await trio.sleep(self.interval)
            self.sweep(trio.current_time())
