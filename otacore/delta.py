"""Binary delta patches between firmware images: the format, the maker and one-shot apply.

The maker (:mod:`otacore.delta_maker`) matches the new image against the old one
bsdiff-style (suffix array, matches extended both ways while at least half the bytes agree),
learns how relinking moved branch targets and pointers, matches again with those taken into
account, and sends only what its prediction gets wrong inside each copy, compressed (zstd,
LZMA2 or zstd with the old image as dictionary, whichever is smallest; otacore.delta_codec)
with a window a device can afford. Streaming application
with bounded memory is in :mod:`otacore.delta_stream`; :func:`apply_patch` is its one-shot form.

Patch format (all integers little-endian)
-----------------------------------------
A patch is a header, then the payload: a compressed stream whose content is the records
below. The maker writes version 5 or 4: control entries in sparse columns (prelude bits 6
and 7) or in columns (bit 6), whichever compresses smaller, with exact copies and a literal
branch conversion where they pay (bits 3-5). Held to version 4 it writes version 4 (or 3
where entry order compresses smaller), held to version 3 version 3 when the payload uses
one of its features (every patch without them is byte-identical to a version 2 patch), held
to version 2 version 2; appliers read versions 1 to 5.

Header, versions 2 to 5 (33..63 bytes; "varint" is unsigned LEB128)::

    0   4  magic b"OTAD"
    4   1  format version (2; 3: the prelude sets EXACT_COPIES or a literal conversion and
           not COLUMNS; 4: the prelude sets COLUMNS, not SPARSE_COLUMNS; 5: it sets both)
    5   1  bits 0-4: window log (10..MAX_WINDOW_LOG): the applier needs a 2**log byte window;
           bits 5-7: codec (CODEC_ZSTD 0, CODEC_LZMA2 1, CODEC_ZSTD_OLD 2; others refused)
    6   1  LZMA2 only: the LZMA properties byte (pb * 5 + lp) * 9 + lc, lc + lp <= 4, pb <= 4
       v   base (old image) size
       v   target (new image) size
       v   block limit: largest decompressed record in the payload (256..MAX_BLOCK_LIMIT)
       v   payload size: compressed bytes after the header; nothing may follow them
      16   SHA-256 of the base image, first 16 bytes
      16   SHA-256 of the target image, first 16 bytes
       4   CRC-32 of all the bytes before it

Codec 0: the payload is one zstd frame (RFC 8878) whose window is at most 2**log.
Codec 1: the payload is one raw LZMA2 stream (xz-file-format 1.2.0, section 5.3.1, without
the .xz container) with a dictionary of exactly 2**log bytes (log >= 12, LZMA2's smallest
dictionary is 4 KiB); every chunk that sets properties must set the header's byte, so the
decoder's probability tables are 1846 + 768 * 2**(lc + lp) 16-bit words, known up front.
Codec 2: one zstd frame as codec 0, decoded with the whole base image as its raw-content
dictionary (RFC 8878, section 5: what ``zstd --patch-from`` does), so the frame's matches
may copy from the old image too. zstd references dictionary bytes only within the window,
so a codec 2 patch needs base size + payload <= 2**log (the applier checks the base size);
the apply memory stays the window: a device reads the dictionary in place from flash.

Why 16-byte digests are enough: neither digest is a defence against a forger, who writes the
header too. The base digest tells a device that the patch is for the image it runs before it
writes anything (a 2**-128 chance that another image passes); the target digest catches
damage and maker bugs at the end. What makes the result trusted is the signed manifest: the
device checks the rebuilt image against its full SHA-256 and signature
(otacore.device.slots.accept_download) before it installs anything. Version 1 kept 32-byte digests.

Header, version 1 (92 bytes, fixed)::

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

and its payload is one zstd frame (codec 0).

Payload content (every version): a sequence of records, each
``varint length`` + ``length`` bytes, at most the block limit; a record of length 0 ends it.
Varints are unsigned LEB128; signed values are zigzag-coded first.

The first record is the prelude: ``varint filters``: bits 0-2 the copy filters (bit 0 THUMB,
bit 1 X86, bit 2 WORDS; X86 excludes THUMB); bits 3-4 the literal branch conversion (0 none,
1 Thumb-2 BL/B.W, 2 RISC-V JAL/AUIPC pairs, 3 reserved) and bit 5 EXACT_COPIES, both
version 3 or later (a version 1 or 2 patch that sets them is corrupt, a version 3 patch
must set one of them); bit 6 COLUMNS, version 4 or later, which must set it; bit 7
SPARSE_COLUMNS, version 5 only, which must set it and COLUMNS; no other bits.
Unless the copy filters are 0, then: ``varint load address + 1`` of the old image (0: not
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
the target size with the target SHA-256 (its first 16 bytes in versions 2 to 5).

Exact copies (version 3, EXACT_COPIES): after ``varint n`` a block has a bitmap of
``ceil(n / 8)`` bytes, bit ``i % 8`` of byte ``i // 8`` set when entry ``i``'s copy is exact:
it has no difference bytes in the record and outputs the prediction as it is (bits past ``n``
must be 0). The maker makes a stretch of at least EXACT_RUN_MIN (otacore.delta_maker)
unchanged bytes inside a copy its own exact entry. Why: most difference bytes are zero, and
in a version 2 payload they stand between the bytes that matter. LZMA2 and zstd see only
``2**window_log`` payload bytes back, so in a 1.4 MB container whose sub-images change
alike, the second change is too far from the first to be coded as a repeat; without its
zero runs the payload is a few tens of KB and the window spans all of it (the public
corpus's wifi-rtw89 patch: 23.6 -> 18.6 KB, bench/delta/README.md). The applier's memory
does not change: an exact copy is predicted in the same bounded pieces as any other.

Columns (version 4, COLUMNS): a block writes its control entries in three columns, the
``n`` seeks, then the ``n`` copy lengths, then the ``n`` extra lengths (each still a varint;
the exact-copy bitmap, when EXACT_COPIES is set, comes before them as above). Why: the seeks
are mostly 0, the copy and extra lengths alike, so each column is a run the coder codes in
a few bits, where interleaved they are a three-way mix; with the many short entries of
exact copies and the dense form it is most of the control bytes' cost (public corpus:
ath10k firmware-6 18,899 -> 17,799 bytes, 3.5 KB off the total; bench/delta/README.md).
The applier buffers a record whole anyway: it finds the three columns' starts, then reads
each entry through three cursors; its memory does not change.

Sparse columns (version 5, SPARSE_COLUMNS with COLUMNS): after the exact-copy bitmap (if
any) a block has two bitmaps of ``ceil(n / 8)`` bytes each, bit ``i % 8`` of byte ``i // 8``
set when entry ``i``'s seek, then its extra length, is not 0 (bits past ``n`` must be 0);
then the ``n`` copy lengths; then the set seeks' zigzag varints and then the set extra
lengths' varints, in entry order, each non-zero. An unset entry's value is 0. Why: in the
many short entries of exact copies and the dense form most seeks and extras are 0, and a
bit costs less than a zero byte the coder must still code (public corpus: wifi-rtw89
14,180 -> 13,9xx bytes; bench/delta/README.md). The maker writes whichever of columns and
sparse columns gives the smaller zstd patch. The applier reads it through the same three
cursors, skipping a value whose bit is unset.

Literal branch conversion (version 3): each entry's extra bytes were converted alone, as if
they sat at the entry's output offset in the target, by the prelude's transform
(otacore.delta_literal: xz's BCJ filters ``armthumb.c`` and ``riscv.c`` in
src/liblzma/simple/, relative call targets made absolute so that calls to one function are
equal bytes); the applier restores them in place before it outputs them. An instruction
that straddles two entries, or an entry and a copy, is not converted.

Why one stream of interleaved records and not the control, difference and literal bytes
compressed apart (about 1.3% smaller with LZMA on the public corpus): the applier consumes
the three together, so separate streams would have to be either buffered whole (memory
grows with the image) or cut into per-block pieces decoded by three decoders at once (three
windows of memory, and each piece restarting its coder loses most of the gain).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass

from otacore._select import load_kernel
from otacore._types import Buffer
from otacore.errors import DeltaError, PatchBaseMismatchError, PatchFormatError

_kernel = load_kernel("delta")

#: True when the compiled kernel is in use.
NATIVE: bool = _kernel.__name__ == "otacore._delta"

MAGIC = b"OTAD"
#: The format version the maker writes, unless the payload uses a version 3 feature (exact
#: copies, a literal branch conversion: VERSION_3_FLAGS); SUPPORTED_VERSIONS are the ones
#: appliers read.
FORMAT_VERSION = 2
LITERAL_FORMAT_VERSION = 3
#: The version of payloads whose blocks write their control entries in columns (COLUMNS).
COLUMNS_FORMAT_VERSION = 4
#: The version of payloads whose columns are sparse (SPARSE_COLUMNS).
SPARSE_FORMAT_VERSION = 5
#: The newest version the maker writes (when the payload needs it).
NEWEST_VERSION = 5
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5)
_HEADER_V1 = struct.Struct("<4sBBHIIII32s32s")
#: Version 1's fixed header size, which is also the largest header of any version.
V1_HEADER_SIZE = _HEADER_V1.size + 4
HEADER_SIZE = V1_HEADER_SIZE
MAX_HEADER_SIZE = V1_HEADER_SIZE
#: Bytes of each SHA-256 a version 2 header keeps (the module docstring says why).
V2_DIGEST_SIZE = 16
#: Payload codecs (version 2 header, bits 5-7 of byte 5).
CODEC_ZSTD = 0
CODEC_LZMA2 = 1
CODEC_ZSTD_OLD = 2
CODEC_NAMES = {CODEC_ZSTD: "zstd", CODEC_LZMA2: "lzma2", CODEC_ZSTD_OLD: "zstd-old"}
#: LZMA2's smallest dictionary is 4 KiB (liblzma LZMA_DICT_SIZE_MIN).
MIN_LZMA_WINDOW_LOG = 12
#: Largest window a patch may ask for (1 MiB); makers default to DEFAULT_WINDOW_LOG.
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
#: The prelude's copy filter bits; bits LITERAL_SHIFT.. hold the literal branch conversion
#: (otacore.delta_literal kinds), which only version 3 may set.
COPY_FILTER_MASK = 7
LITERAL_SHIFT = 3
LITERAL_MASK = 3 << LITERAL_SHIFT
#: Prelude flag (bit 5 of the filter varint), version 3 or later: every block record carries an
#: exact-copy bitmap after its entry count (module docstring, "Exact copies").
EXACT_COPIES = 1 << 5
#: The prelude bits version 3 added (a version 3 patch sets one of them; version 4 may).
VERSION_3_FLAGS = LITERAL_MASK | EXACT_COPIES
#: Prelude flag (bit 6), version 4 only, which must set it: every block writes its control
#: entries in columns, all the seeks, then all the copy lengths, then all the extra lengths
#: (module docstring, "Columns").
COLUMNS = 1 << 6
#: Prelude flag (bit 7), version 5 only, which must set it and COLUMNS: the seek and extra
#: columns keep only their non-zero values, after a bitmap each of which entries have one
#: (module docstring, "Sparse columns").
SPARSE_COLUMNS = 1 << 7
#: Every prelude bit some version defines.
PRELUDE_FLAGS = COPY_FILTER_MASK | VERSION_3_FLAGS | COLUMNS | SPARSE_COLUMNS
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


class PatchFeatureError(PatchVersionError):
    """The patch names a literal branch conversion this code does not know (a newer maker)."""


class PatchLimitError(PatchFormatError):
    """The patch needs more memory (zstd window, record size) than this applier allows."""


class PatchTargetMismatchError(PatchFormatError):
    """Applying the patch did not give the target image it promises (size or SHA-256)."""


class PatchInputError(DeltaError):
    """The images given to the patch maker cannot be diffed (too large, bad options)."""


def lzma_props_byte(lc: int, lp: int, pb: int) -> int:
    """The LZMA properties byte of (lc, lp, pb) (xz-file-format 1.2.0, section 5.3.1)."""
    if not (0 <= lc <= 4 and 0 <= lp <= 4 and lc + lp <= 4 and 0 <= pb <= 4):
        raise PatchInputError(
            f"LZMA2 properties lc={lc} lp={lp} pb={pb}: LZMA2 needs lc + lp <= 4 and pb <= 4"
        )
    return (pb * 5 + lp) * 9 + lc


def lzma_props(props: int) -> tuple[int, int, int]:
    """(lc, lp, pb) of an LZMA properties byte; PatchCorruptError if LZMA2 cannot use it."""
    lc, rest = props % 9, props // 9
    lp, pb = rest % 5, rest // 5
    if props >= 9 * 5 * 5 or lc + lp > 4:
        raise PatchCorruptError(f"patch LZMA2 properties byte {props:#04x} is invalid")
    return lc, lp, pb


def lzma_filters(window_log: int, props: int, preset: int | None = None) -> list[dict[str, int]]:
    """The raw LZMA2 filter chain (Python's ``lzma``) of a codec-1 payload."""
    lc, lp, pb = lzma_props(props)
    chain: dict[str, int] = {
        "id": lzma.FILTER_LZMA2, "dict_size": 1 << window_log, "lc": lc, "lp": lp, "pb": pb
    }
    if preset is not None:
        chain["preset"] = preset
    return [chain]


class _HeaderIncomplete(PatchTruncatedError):
    """The bytes so far are a correct prefix of a header that needs more."""


def _get_varint(raw: bytes, at: int, what: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(raw):
            raise _HeaderIncomplete(f"patch is truncated inside its header's {what}")
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > MAX_IMAGE_SIZE:
                raise PatchCorruptError(f"patch header's {what} {value} is out of range")
            return value, at
        shift += 7
        if shift >= 35:  # sizes are below 2**32: five bytes at most
            raise PatchCorruptError(f"patch header has an over-long {what}")


@dataclass(frozen=True)
class PatchHeader:
    """A patch's header (``size`` bytes: 92 in version 1, 33..63 in versions 2 to 5).

    ``base_sha256`` / ``target_sha256`` hold the whole SHA-256 in version 1 and its first
    V2_DIGEST_SIZE bytes in versions 2 to 5; ``codec`` and ``lzma_props`` are theirs.
    """

    version: int
    window_log: int
    base_size: int
    target_size: int
    block_limit: int
    payload_size: int
    base_sha256: bytes
    target_sha256: bytes
    codec: int = CODEC_ZSTD
    lzma_props: int = 0

    @property
    def size(self) -> int:
        """The header's length in bytes, CRC included."""
        return len(self.pack())

    def pack(self) -> bytes:
        """The header's bytes, CRC included."""
        if self.version == 1:
            body = _HEADER_V1.pack(
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
        else:
            out = bytearray(MAGIC)
            out += bytes((self.version, self.codec << 5 | self.window_log))
            if self.codec == CODEC_LZMA2:
                out.append(self.lzma_props)
            for value in (self.base_size, self.target_size, self.block_limit, self.payload_size):
                put_varint(out, value)
            out += self.base_sha256[:V2_DIGEST_SIZE] + self.target_sha256[:V2_DIGEST_SIZE]
            body = bytes(out)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def parse(cls, data: Buffer) -> PatchHeader:
        """Parse and check the header at the start of ``data`` (which may hold more).

        Raises PatchVersionError (not OTAD, unknown version or codec), PatchTruncatedError
        (``data`` ends inside the header) or PatchCorruptError (CRC, fields out of range).
        """
        raw = bytes(data[:MAX_HEADER_SIZE])
        if raw[:4] != MAGIC[: len(raw[:4])]:
            raise PatchVersionError("not an OTAD delta patch (bad magic)")
        if len(raw) < 5:
            raise _HeaderIncomplete(f"patch is truncated: {len(raw)} bytes, no header yet")
        version = raw[4]
        if version not in SUPPORTED_VERSIONS:
            raise PatchVersionError(
                f"patch format version {version} is not supported (this code reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        header = cls._parse_v1(raw) if version == 1 else cls._parse_v2(raw)
        if not 10 <= header.window_log <= MAX_WINDOW_LOG:
            raise PatchCorruptError(
                f"patch window log {header.window_log} is outside 10..{MAX_WINDOW_LOG}"
            )
        if header.codec == CODEC_ZSTD_OLD and header.base_size > 1 << header.window_log:
            raise PatchCorruptError(
                f"patch uses the {header.base_size}-byte base image as a zstd dictionary, "
                f"which must fit its {1 << header.window_log}-byte window"
            )
        if header.codec == CODEC_LZMA2 and header.window_log < MIN_LZMA_WINDOW_LOG:
            raise PatchCorruptError(
                f"patch LZMA2 window log {header.window_log} is below {MIN_LZMA_WINDOW_LOG}"
            )
        if not MIN_BLOCK_LIMIT <= header.block_limit <= MAX_BLOCK_LIMIT:
            raise PatchCorruptError(f"patch block limit {header.block_limit} is out of range")
        return header

    @classmethod
    def _parse_v1(cls, raw: bytes) -> PatchHeader:
        if len(raw) < V1_HEADER_SIZE:
            raise _HeaderIncomplete(
                f"patch is truncated: {len(raw)} bytes, the header alone needs {V1_HEADER_SIZE}"
            )
        fields = _HEADER_V1.unpack(raw[: _HEADER_V1.size])
        _, version, window_log, reserved = fields[:4]
        (crc,) = struct.unpack_from("<I", raw, _HEADER_V1.size)
        if zlib.crc32(raw[: _HEADER_V1.size]) != crc:
            raise PatchCorruptError("patch header is corrupt (CRC-32 mismatch)")
        if reserved != 0:
            raise PatchCorruptError("patch header has non-zero reserved bits")
        return cls(version, window_log, *fields[4:])

    @classmethod
    def _parse_v2(cls, raw: bytes) -> PatchHeader:
        """Versions 2 to 5 (the same header; versions 3 to 5 mark a payload that uses
        their features, which older appliers do not know)."""
        if len(raw) < 6:
            raise _HeaderIncomplete(f"patch is truncated: {len(raw)} bytes, no header yet")
        codec, window_log = raw[5] >> 5, raw[5] & 0x1F
        if codec not in CODEC_NAMES:
            raise PatchVersionError(
                f"patch payload codec {codec} is not supported (this code reads "
                + ", ".join(f"{number} {name}" for number, name in CODEC_NAMES.items())
                + ")"
            )
        at, props = 6, 0
        if codec == CODEC_LZMA2:
            if len(raw) < 7:
                raise _HeaderIncomplete("patch is truncated inside its header")
            props, at = raw[6], 7
        sizes = []
        for what in ("base size", "target size", "block limit", "payload size"):
            value, at = _get_varint(raw, at, what)
            sizes.append(value)
        end = at + 2 * V2_DIGEST_SIZE
        if len(raw) < end + 4:
            raise _HeaderIncomplete(
                f"patch is truncated: {len(raw)} bytes, the header alone needs {end + 4}"
            )
        (crc,) = struct.unpack_from("<I", raw, end)
        if zlib.crc32(raw[:end]) != crc:
            raise PatchCorruptError("patch header is corrupt (CRC-32 mismatch)")
        if codec == CODEC_LZMA2:
            lzma_props(props)  # refuses a byte LZMA2 cannot use
        base_size, target_size, block_limit, payload_size = sizes
        return cls(
            version=raw[4],
            window_log=window_log,
            base_size=base_size,
            target_size=target_size,
            block_limit=block_limit,
            payload_size=payload_size,
            base_sha256=raw[at : at + V2_DIGEST_SIZE],
            target_sha256=raw[at + V2_DIGEST_SIZE : end],
            codec=codec,
            lzma_props=props,
        )


def prelude_format_version(field: int) -> int:
    """The version a payload whose prelude's first varint is ``field`` is written as: 5 when
    it sets SPARSE_COLUMNS, 4 when it sets COLUMNS, 3 when it sets a version 3 flag
    (VERSION_3_FLAGS), else FORMAT_VERSION (and the only version an applier accepts for it).
    SPARSE_COLUMNS without COLUMNS is no version's (the applier refuses it)."""
    if field & SPARSE_COLUMNS:
        return SPARSE_FORMAT_VERSION
    if field & COLUMNS:
        return COLUMNS_FORMAT_VERSION
    return LITERAL_FORMAT_VERSION if field & VERSION_3_FLAGS else FORMAT_VERSION


def payload_format_version(payload: Buffer) -> int:
    """The version a patch of ``payload`` (decompressed records) is written as
    (:func:`prelude_format_version` of its prelude)."""
    head = bytes(payload[:16])  # the prelude's length varint, then its filter varint
    at = next((i + 1 for i, byte in enumerate(head) if byte < 0x80), len(head))
    value = shift = 0
    for byte in head[at:]:
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return prelude_format_version(value)


# --- varints (the payload's integer coding) --------------------------------------------------


def put_varint(out: bytearray, value: int) -> None:
    """Append ``value`` (>= 0) as unsigned LEB128."""
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def read_varint(data: Buffer, at: int) -> tuple[int, int]:
    """(value, offset after it) of the unsigned LEB128 varint at ``at`` in ``data``, for
    payloads this code made (bench tools, the maker); an applier parses untrusted bytes with
    its own length and range checks (otacore.delta_stream)."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


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
    codecs: Collection[int] | None = None,
    lzma_preset: int | None = None,
    workers: int | None = None,
    format_version: int = NEWEST_VERSION,
) -> bytes:
    """A patch that turns ``old`` into ``new`` (see :func:`otacore.delta_maker.make_patch`).

    ``filters`` None picks the filter set that fits; ``level`` None is a tuned zstd profile
    near level 19. ``window_log`` and ``block_limit`` bound the memory the applier needs (see
    :mod:`otacore.delta_stream`). ``effort`` is how many strategies the maker makes in full
    to keep the smallest (:mod:`otacore.delta_strategy`; None: its default). ``codecs``
    are the payload codecs tried (CODEC_ZSTD, CODEC_LZMA2, CODEC_ZSTD_OLD; None: all) and
    ``lzma_preset`` LZMA2's liblzma preset (None: :mod:`otacore.delta_codec`'s default).
    ``workers`` is how many threads the making may use (None: the maker's default; the patch
    does not depend on it). ``format_version`` is the newest format the patch may use (2:
    for appliers that read no version 3). Raises PatchInputError for images or options it
    refuses.
    """
    from otacore import delta_codec, delta_maker, delta_strategy  # they import this module

    if effort is None:
        effort = delta_strategy.DEFAULT_EFFORT
    if codecs is None:
        codecs = delta_codec.DEFAULT_CODECS
    if lzma_preset is None:
        lzma_preset = delta_codec.DEFAULT_LZMA_PRESET
    if workers is None:
        workers = delta_maker.DEFAULT_WORKERS

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
        codecs=codecs,
        lzma_preset=lzma_preset,
        workers=workers,
        format_version=format_version,
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
    actual = len(patch) - header.size
    if actual < header.payload_size:
        raise PatchTruncatedError(
            f"patch is truncated: payload has {actual} of {header.payload_size} bytes"
        )
    if actual > header.payload_size:
        raise PatchCorruptError(f"patch has {actual - header.payload_size} bytes after its payload")
    return header


__all__ = [
    "AUTO_FILTERS",
    "CODEC_LZMA2",
    "CODEC_NAMES",
    "CODEC_ZSTD",
    "CODEC_ZSTD_OLD",
    "COLUMNS",
    "COLUMNS_FORMAT_VERSION",
    "COPY_FILTER_MASK",
    "DEFAULT_BLOCK_LIMIT",
    "DEFAULT_WINDOW_LOG",
    "EXACT_COPIES",
    "FILTER_THUMB",
    "FILTER_WORDS",
    "FILTER_X86",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "LITERAL_FORMAT_VERSION",
    "LITERAL_MASK",
    "LITERAL_SHIFT",
    "MAGIC",
    "MAX_HEADER_SIZE",
    "MIN_LZMA_WINDOW_LOG",
    "NATIVE",
    "NEWEST_VERSION",
    "PRELUDE_FLAGS",
    "SPARSE_COLUMNS",
    "SPARSE_FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "V1_HEADER_SIZE",
    "V2_DIGEST_SIZE",
    "VERSION_3_FLAGS",
    "PatchBaseMismatchError",
    "PatchCorruptError",
    "PatchFeatureError",
    "PatchHeader",
    "PatchInputError",
    "PatchLimitError",
    "PatchTargetMismatchError",
    "PatchTruncatedError",
    "PatchVersionError",
    "apply_patch",
    "lzma_filters",
    "lzma_props",
    "lzma_props_byte",
    "make_patch",
    "payload_format_version",
    "prelude_format_version",
    "read_header",
    "read_varint",
]
