"""Which instruction set an image's branches show: Thumb-2, x86 or neither.

The patch maker (otacore.delta_maker) normalises branches of the family this detector picks
before it matches, and orders its strategies by the same evidence (otacore.delta_strategy).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from otacore.delta import FILTER_THUMB, FILTER_X86

#: Branches whose target another branch shares that make a family (see detect_family).
MIN_SHARED_TARGETS = 8


#: ... and at least this fraction of the branches landing inside: chance coincidences are
#: few (about 1% in a container of records whose length fields follow E8/E9 bytes), real
#: code's many (24% in the BCM4345C0 Bluetooth patch RAM, 57-97% in Cortex-M and x86 code).
MIN_SHARED_FRACTION = 1 / 8


def _shared_targets(targets: NDArray[np.int64], size: int) -> int:
    """How many of ``targets`` land inside the image on a spot another of them also hits
    (0 when they are fewer than MIN_SHARED_FRACTION of those landing inside)."""
    inside = targets[(targets >= 0) & (targets < size)]
    _, counts = np.unique(inside, return_counts=True)
    shared = int(counts[counts >= 2].sum())
    return shared if shared >= MIN_SHARED_FRACTION * inside.shape[0] else 0


def branch_scores(image: bytes) -> tuple[int, int]:
    """(Thumb-2, x86) evidence in ``image``: branches whose target another branch shares.

    A function is called from many places, so real code's BL/B.W (Thumb-2) and CALL/JMP rel32
    (x86) targets recur; bytes that only look like branches (dense data, compressed or
    encrypted blobs, another instruction set) give targets that are spread out, and two of
    them hardly ever coincide. Counting targets merely inside the image does not separate
    them: in a 1.4 MB Wi-Fi container about 4% of the E8/E9 bytes are followed by a rel32
    that lands inside, and in such data the x86 count beat the Thumb one (issue 18's corpus);
    none of those targets is shared, while 57-72% of the inside targets of x86-64 ``.text``
    are. Evidence below MIN_SHARED_FRACTION of the inside targets counts as none.
    """
    size = len(image)
    thumb = x86 = 0
    if size >= 4:
        halves = np.frombuffer(image, dtype="<u2", count=size // 2)
        second = halves[1:] & 0xD000
        # BL / B.W (ARMv7-M ARM A7.7.18, A7.7.12 T4): 11110 S imm10, 11 J1 1 J2 imm11 / 10 J1 1 J2.
        found = np.flatnonzero(
            ((halves[:-1] & 0xF800) == 0xF000) & ((second == 0xD000) | (second == 0x9000))
        )
        h1, h2 = halves[found].astype(np.int64), halves[found + 1].astype(np.int64)
        s = (h1 >> 10) & 1
        i1, i2 = 1 ^ (((h2 >> 13) & 1) ^ s), 1 ^ (((h2 >> 11) & 1) ^ s)
        off = (i1 << 23) | (i2 << 22) | ((h1 & 0x3FF) << 12) | ((h2 & 0x7FF) << 1)
        thumb = _shared_targets(2 * found + 4 + off - (s << 24), size)
    if size >= 5:
        data = np.frombuffer(image, dtype=np.uint8)
        at = np.flatnonzero((data[: size - 4] == 0xE8) | (data[: size - 4] == 0xE9))
        rel = sum(data[at + k].astype(np.int64) << (8 * (k - 1)) for k in range(1, 5))
        x86 = _shared_targets(at + 5 + np.where(rel >= 1 << 31, rel - (1 << 32), rel), size)
    return thumb, x86


def detect_family(image: bytes) -> int:
    """FILTER_THUMB or FILTER_X86, whichever has more branches sharing a target inside
    ``image`` (see :func:`branch_scores`), or 0 when neither has MIN_SHARED_TARGETS."""
    return family_of(branch_scores(image))


def family_of(scores: tuple[int, int]) -> int:
    thumb, x86 = scores
    if max(thumb, x86) < MIN_SHARED_TARGETS:
        return 0
    return FILTER_THUMB if thumb >= x86 else FILTER_X86

