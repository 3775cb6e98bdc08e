"""Binary delta patches between firmware images: the format, the maker and one-shot apply.

The maker (:mod:`otacore.delta_maker`) matches the new image against the old one
bsdiff-style (suffix array, matches extended both ways while at least half the bytes agree),
learns how relinking moved branch targets and pointers, matches again with those taken into
account, and sends only what its prediction gets wrong inside each copy, zstd compressed
with a window a device can afford. Streaming application with bounded memory is in
:mod:`otacore.delta_stream`; :func:`apply_patch` is its one-shot form.

Patch format, version 1 (all integers little-endian)
----------------------------------------------------
Header, 92 bytes::

    0   4  magic b"OTAD"
    4   1  format version (1)
    5   1  zstd window log of the payload (10..MAX_WINDOW_LOG); the applier needs 2**log bytes
    6   2  reserved, 0
    8   4  base (old image) size
    12  4  target (new image) size
    16  4  block limit: largest decompressed record in the payload (256..MAX_BLOCK_LIMIT)
    20  4  payload size: compressed bytes after the header; nothing may follow them
    24 32  SHA-256 of the base image
    56 32  SHA-256 of the target image
    88  4  CRC-32 of bytes 0..87

Payload: one zstd frame (RFC 8878) whose content is a sequence of records, each
``varint length`` + ``length`` bytes, at most the block limit; a record of length 0 ends it.
Varints are unsigned LEB128; signed values are zigzag-coded first.

The first record is the prelude: ``varint filters`` (bit 0 THUMB, bit 1 X86, bit 2 WORDS; X86
excludes THUMB). Unless it is 0, then: ``varint load address + 1`` of the old image (0: not
known), the relocation map (old image offset -> delta) and the value map (word value ->
delta). A map is ``varint count`` (<= MAX_MAP_ENTRIES) then per entry the key (first: zigzag;
then the positive gap from the previous key) and the zigzag delta. ext/delta_filter.h says
what the filters predict with them inside every copy.

Every further record is a block: ``varint n`` (>= 1) control entries of three varints
``zigzag seek, copy length, extra length``, then the difference bytes of all its copies, then
the extra bytes of all its entries, in entry order, exactly filling the record. Applying an
entry: move the old cursor by ``seek`` (it must stay within the base); output ``copy length``
bytes of the prediction of old[cursor:cursor+copy] plus the difference bytes (mod 256),
advancing the cursor; output ``extra length`` literal bytes. The output must end at exactly
the target size with the target SHA-256.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from otacore._select import load_kernel
from otacore._types import Buffer
from otacore.errors import DeltaError, PatchBaseMismatchError, PatchFormatError

_kernel = load_kernel("delta")

#: True when the compiled kernel is in use.
NATIVE: bool = _kernel.__name__ == "otacore._delta"

MAGIC = b"OTAD"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBHIIII32s32s")
HEADER_SIZE = _HEADER.size + 4
#: Largest zstd window a patch may ask for (1 MiB); makers default to DEFAULT_WINDOW_LOG.
MAX_WINDOW_LOG = 20
DEFAULT_WINDOW_LOG = 17
MIN_BLOCK_LIMIT = 256
MAX_BLOCK_LIMIT = 1 << 20
DEFAULT_BLOCK_LIMIT = 1 << 16
MAX_MAP_ENTRIES = 2048
MAX_IMAGE_SIZE = 0xFFFFFFFF
FILTER_THUMB = 1
FILTER_X86 = 2
FILTER_WORDS = 4
#: Filter sets the maker tries when none is given (and the only valid ones): none, Thumb-2,
#: Thumb-2 + pointers, pointers only, x86, x86 + pointers.
AUTO_FILTERS = (
    0,
    FILTER_THUMB,
    FILTER_THUMB | FILTER_WORDS,
    FILTER_WORDS,
    FILTER_X86,
    FILTER_X86 | FILTER_WORDS,
)


class PatchTruncatedError(PatchFormatError):
    """The patch ends before its header or payload is complete."""


class PatchCorruptError(PatchFormatError):
    """The patch's bytes contradict its own structure (bad CRC, lengths, offsets, records)."""


class PatchVersionError(PatchFormatError):
    """The patch is not an OTAD patch or uses a format version this code does not know."""


class PatchLimitError(PatchFormatError):
    """The patch needs more memory (zstd window, record size) than this applier allows."""


class PatchTargetMismatchError(PatchFormatError):
    """Applying the patch did not give the target image it promises (size or SHA-256)."""


class PatchInputError(DeltaError):
    """The images given to the patch maker cannot be diffed (too large, bad options)."""


@dataclass(frozen=True)
class PatchHeader:
    """The fixed 92-byte header of a patch."""

    version: int
    window_log: int
    base_size: int
    target_size: int
    block_limit: int
    payload_size: int
    base_sha256: bytes
    target_sha256: bytes

    def pack(self) -> bytes:
        """The header's 92 bytes, CRC included."""
        body = _HEADER.pack(
            MAGIC,
            self.version,
            self.window_log,
            0,
            self.base_size,
            self.target_size,
            self.block_limit,
            self.payload_size,
            self.base_sha256,
            self.target_sha256,
        )
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def parse(cls, data: Buffer) -> PatchHeader:
        """Parse and check the first HEADER_SIZE bytes of ``data``."""
        raw = bytes(data[:HEADER_SIZE])
        if raw[:4] != MAGIC[: len(raw[:4])]:
            raise PatchVersionError("not an OTAD delta patch (bad magic)")
        if len(raw) < HEADER_SIZE:
            raise PatchTruncatedError(
                f"patch is truncated: {len(raw)} bytes, the header alone needs {HEADER_SIZE}"
            )
        fields = _HEADER.unpack(raw[: _HEADER.size])
        magic, version, window_log, reserved = fields[:4]
        if magic != MAGIC:
            raise PatchVersionError("not an OTAD delta patch (bad magic)")
        (crc,) = struct.unpack("<I", raw[_HEADER.size :])
        if zlib.crc32(raw[: _HEADER.size]) != crc:
            raise PatchCorruptError("patch header is corrupt (CRC-32 mismatch)")
        if version != FORMAT_VERSION:
            raise PatchVersionError(
                f"patch format version {version} is not supported (this code reads "
                f"version {FORMAT_VERSION})"
            )
        header = cls(version, window_log, *fields[4:])
        if reserved != 0:
            raise PatchCorruptError("patch header has non-zero reserved bits")
        if not 10 <= window_log <= MAX_WINDOW_LOG:
            raise PatchCorruptError(f"patch zstd window log {window_log} is outside 10..20")
        if not MIN_BLOCK_LIMIT <= header.block_limit <= MAX_BLOCK_LIMIT:
            raise PatchCorruptError(f"patch block limit {header.block_limit} is out of range")
        return header


# --- varints (the payload's integer coding) --------------------------------------------------


def put_varint(out: bytearray, value: int) -> None:
    """Append ``value`` (>= 0) as unsigned LEB128."""
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def zigzag(value: int) -> int:
    """Map a signed integer to an unsigned one (0, -1, 1, -2 -> 0, 1, 2, 3)."""
    return value * 2 if value >= 0 else -value * 2 - 1


def unzigzag(value: int) -> int:
    """Inverse of :func:`zigzag`."""
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


# --- the maker (otacore.delta_maker) --------------------------------------------------------


def make_patch(
    old: Buffer,
    new: Buffer,
    *,
    level: int | None = None,
    window_log: int = DEFAULT_WINDOW_LOG,
    block_limit: int = DEFAULT_BLOCK_LIMIT,
    filters: int | None = None,
    threshold: int = 16,
    map_cap: int = MAX_MAP_ENTRIES,
    effort: int | None = None,
) -> bytes:
    """A patch that turns ``old`` into ``new`` (see :func:`otacore.delta_maker.make_patch`).

    ``filters`` None picks the filter set that fits; ``level`` None is a tuned zstd profile
    near level 19. ``window_log`` and ``block_limit`` bound the memory the applier needs (see
    :mod:`otacore.delta_stream`). ``effort`` is how many strategies the maker makes in full
    to keep the smallest (:mod:`otacore.delta_strategy`; None: its default). Raises
    PatchInputError for images or options it refuses.
    """
    from otacore import delta_maker, delta_strategy  # the maker imports this module

    if effort is None:
        effort = delta_strategy.DEFAULT_EFFORT

    return delta_maker.make_patch(
        old,
        new,
        level=level,
        window_log=window_log,
        block_limit=block_limit,
        filters=filters,
        threshold=threshold,
        map_cap=map_cap,
        effort=effort,
    )


def apply_patch(old: Buffer, patch: Buffer) -> bytes:
    """The target image of ``patch`` applied to ``old`` (raises on any mismatch or damage)."""
    from otacore.delta_stream import PatchApplier  # the applier imports this module

    output = bytearray()
    applier = PatchApplier(
        old, output.extend, max_window_log=MAX_WINDOW_LOG, max_block_limit=MAX_BLOCK_LIMIT
    )
    applier.feed(patch)
    applier.finish()
    return bytes(output)


def read_header(patch: Buffer) -> PatchHeader:
    """The header of ``patch``; checks the payload size against the patch length too."""
    header = PatchHeader.parse(patch)
    actual = len(patch) - HEADER_SIZE
    if actual < header.payload_size:
        raise PatchTruncatedError(
            f"patch is truncated: payload has {actual} of {header.payload_size} bytes"
        )
    if actual > header.payload_size:
        raise PatchCorruptError(f"patch has {actual - header.payload_size} bytes after its payload")
    return header


__all__ = [
    "AUTO_FILTERS",
    "DEFAULT_BLOCK_LIMIT",
    "DEFAULT_WINDOW_LOG",
    "FILTER_THUMB",
    "FILTER_WORDS",
    "FILTER_X86",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "NATIVE",
    "PatchBaseMismatchError",
    "PatchCorruptError",
    "PatchHeader",
    "PatchInputError",
    "PatchLimitError",
    "PatchTargetMismatchError",
    "PatchTruncatedError",
    "PatchVersionError",
    "apply_patch",
    "make_patch",
    "read_header",
]
