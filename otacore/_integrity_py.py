"""Pure-Python twin of ext/integrity.pyx (same functions, same results)."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from otacore._types import Buffer


def hardware_crc() -> bool:
    """The twin never uses carry-less multiplication."""
    return False


def crc32(data: Buffer, value: int = 0) -> int:
    """CRC-32 of ``data`` continuing from ``value``; equals ``zlib.crc32(data, value)``."""
    return zlib.crc32(data, value)


def crc32_batch(data: Buffer, offsets: Sequence[int] | NDArray[np.int64]) -> NDArray[np.uint32]:
    """CRC-32 of each chunk ``data[offsets[i]:offsets[i+1]]``, as a uint32 numpy array."""
    view = memoryview(data).cast("B")
    bounds = np.ascontiguousarray(offsets, dtype=np.int64)
    count = bounds.shape[0] - 1
    if count < 0:
        raise ValueError("offsets must hold at least one boundary")
    size = len(view)
    for i in range(count):
        if bounds[i] < 0 or bounds[i] > bounds[i + 1] or bounds[i + 1] > size:
            raise ValueError(
                f"chunk {i} bounds [{bounds[i]}, {bounds[i + 1]}) are outside 0..{size}"
            )
    result = np.empty(count, dtype=np.uint32)
    for i in range(count):
        result[i] = zlib.crc32(view[int(bounds[i]) : int(bounds[i + 1])])
    return result


def module_digests(image: Buffer) -> tuple[int, bytes]:
    """(CRC-32 over all but the last 4 bytes, SHA-256 over all but the last 38 bytes)."""
    view = memoryview(image).cast("B")
    n = len(view)
    if n < 38:
        raise ValueError(f"a module image needs at least 38 bytes, got {n}")
    return zlib.crc32(view[: n - 4]), hashlib.sha256(view[: n - 38]).digest()
