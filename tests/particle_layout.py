"""An independent builder of Particle module images, for cross-checking otacore.module.

It follows Device OS's build/module.mk step by step (link with the prefix in place, append
the suffix, `sha256sum` over the file so far, then `crc32` over everything but the CRC) and
shares no code with otacore: only struct, hashlib and zlib.
"""

from __future__ import annotations

import hashlib
import struct
import zlib


def particle_layout_module(
    body: bytes,
    *,
    start: int,
    platform: int,
    function: int,
    index: int,
    version: int,
    deps: tuple[tuple[int, int, int], tuple[int, int, int]] = ((0, 0, 0), (0, 0, 0)),
    product: tuple[int, int] | None = None,
    flags: int = 0,
    mcu_target: int = 0,
    prefix_offset: int = 0,
) -> bytes:
    """Return a module image laid out as module.mk lays it out."""
    suffix_len = 40 if product else 36
    length = len(body) + 24 + suffix_len + 4
    # module_info_t: the linker fills module_end with the address where the CRC starts.
    prefix = (
        struct.pack("<I", start)
        + struct.pack("<I", start + length - 4)
        + bytes([mcu_target, flags])
        + struct.pack("<H", version)
        + struct.pack("<H", platform)
        + bytes([function, index])
        + bytes([deps[0][0], deps[0][1]]) + struct.pack("<H", deps[0][2])
        + bytes([deps[1][0], deps[1][1]]) + struct.pack("<H", deps[1][2])
    )
    image = body[:prefix_offset] + prefix + body[prefix_offset:]
    if product:
        image += struct.pack("<H", product[0]) + struct.pack("<H", product[1])
    image += b"\0\0"
    sha = hashlib.sha256(image).digest()  # module.mk: sha256 of the file up to this point
    image += sha + struct.pack("<H", suffix_len)
    image += struct.pack(">I", zlib.crc32(image))  # crc32 tool output, written big-endian
    return image
