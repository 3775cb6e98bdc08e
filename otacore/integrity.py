"""Integrity checks on firmware images and transfer chunks.

Thin public face of the ``integrity`` kernel: the compiled one when built (and not disabled
with ``OTA_PURE_PYTHON=1``), else its pure-Python twin. Both give identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from otacore._select import load_kernel
from otacore._types import Buffer

_kernel = load_kernel("integrity")

#: True when the compiled kernel is in use.
NATIVE: bool = _kernel.__name__ == "otacore._integrity"


#: CRC-32 (zlib/IEEE) of ``data``, continuing from ``value``: ``crc32(data, value=0) -> int``.
#: Bound directly to the kernel: this is called once per transfer chunk.
crc32: Callable[..., int] = _kernel.crc32


def crc32_batch(data: Buffer, offsets: Sequence[int] | NDArray[np.int64]) -> NDArray[np.uint32]:
    """CRC-32 of every chunk ``data[offsets[i]:offsets[i+1]]`` in one call."""
    result: NDArray[np.uint32] = _kernel.crc32_batch(data, offsets)
    return result


def module_digests(image: Buffer) -> tuple[int, bytes]:
    """(CRC-32 of image[:-4], SHA-256 of image[:-38]), the two values a module suffix stores."""
    crc, digest = _kernel.module_digests(image)
    return int(crc), bytes(digest)


def hardware_crc() -> bool:
    """True when CRC-32 runs on the CPU's carry-less multiply instructions."""
    return bool(_kernel.hardware_crc())
