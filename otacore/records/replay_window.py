"""The DTLS anti-replay window (RFC 6347 section 4.1.2.6) as two integers.

A session keeps ``top`` (the highest sequence number received and authenticated, -1 before
the first) and ``bitmap`` (bit i set: ``top - i`` was received). Plain functions over the two
ints keep the per-session state at two slots instead of another object. The window is
checked before a record is opened and updated only after it authenticated (4.1.2.6: "the
receive window is updated only if the MAC verification succeeds").
"""

from __future__ import annotations

import enum
from typing import Final

#: Window width: RFC 6347 4.1.2.6 says it MUST be at least 32 and SHOULD be 64.
WINDOW_SIZE: Final = 64
_WINDOW_MASK: Final = (1 << WINDOW_SIZE) - 1
#: Nothing received yet.
EMPTY_TOP: Final = -1


class ReplayVerdict(enum.IntEnum):
    """What the window says about a sequence number."""

    NEW = 0
    #: Received before (a network duplicate or a replay).
    DUPLICATE = 1
    #: Left of the window: too old to tell, so rejected (4.1.2.6).
    TOO_OLD = 2


def check(top: int, bitmap: int, seq: int) -> ReplayVerdict:
    """May a record with sequence number ``seq`` be opened?"""
    if seq > top:
        return ReplayVerdict.NEW
    behind = top - seq
    if behind >= WINDOW_SIZE:
        return ReplayVerdict.TOO_OLD
    return ReplayVerdict.DUPLICATE if (bitmap >> behind) & 1 else ReplayVerdict.NEW


def mark(top: int, bitmap: int, seq: int) -> tuple[int, int]:
    """The window after the record ``seq`` authenticated: returns (top, bitmap)."""
    if seq > top:
        # Slide right: the old bits move left by the distance, the new top is bit 0.
        shift = seq - top
        bitmap = ((bitmap << shift) | 1) & _WINDOW_MASK if shift < WINDOW_SIZE else 1
        return seq, bitmap
    behind = top - seq
    if behind < WINDOW_SIZE:
        bitmap |= 1 << behind
    return top, bitmap
