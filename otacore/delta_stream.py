"""Streaming, bounded-memory application of an OTAD delta patch (format: otacore.delta).

This is how a device applies a patch into its inactive slot: the old image is read at random
offsets (flash is memory-mapped or readable by offset), the patch arrives in pieces of any
size (down to one byte) and the new image leaves sequentially through a sink, so neither image
nor the patch is ever held whole.

Memory bound (checked by tests/test_delta_stream.py and tests/test_delta_format_v2.py)
-------------------------------------------------------------------------------------
The applier refuses a patch whose header asks for more than its ``max_window_log`` /
``max_block_limit`` (defaults 17 and 64 KiB; a device with less RAM gets patches made with a
smaller window, e.g. log 15, at a few % in size). Beyond constant bookkeeping it then holds:

* the payload decoder's state, by the header's codec:

  - zstd (codec 0; native, outside Python's allocator): the window of ``2**window_log``
    bytes plus one zstd block (at most min(window, 128 KiB)) of input and output buffers and
    a ~94 KiB decoding context: about 480 KiB for window log 17, 190 KiB for window log 15
    (ZSTD_estimateDStreamSize; ``zstd_native_bound``);
  - LZMA2 (codec 1; liblzma, allocated through Python's raw allocator): the dictionary of
    exactly ``2**window_log`` bytes, the probability tables of 1846 + 768 * 2**(lc + lp)
    16-bit words (lc, lp from the header; every chunk that sets properties is checked to
    set those), liblzma's fixed decoder state and at most one DECODE_PIECE of compressed
    input held inside the decompressor: about 164 KiB for window log 17
    (``lzma_native_bound``);
  - zstd with the base image as dictionary (codec 2): as zstd, plus the base image, at most
    the window (the header is refused otherwise). A device references it in place in
    flash; this applier reads it once into a Python buffer (``base_size`` more bytes);
* one payload record, at most ``block_limit`` bytes (a Python bytearray); a version 3
  patch's literal bytes are restored in place in it (otacore.delta_literal, candidate by
  candidate: no numpy temporaries, a few Python integers at a time);
* the relocation and value maps, at most 2 x MAX_MAP_ENTRIES entries (64 KiB as int64 pairs
  here, 32 KiB as the u32/i32 pairs a device would keep);
* per step: one decoded piece (``DECODE_PIECE``) and one old-image read, its
  prediction and output of at most ``chunk_size + LOOKAHEAD`` bytes each.

So the Python-side peak is below ``PYTHON_OVERHEAD + 2 * block_limit + 4 * chunk_size +
DECODE_PIECE`` (``python_memory_bound``: 256 KiB with the defaults) and does not grow
with the images; the decoder's state is ``zstd_native_bound(window_log)`` or
``lzma_native_bound(window_log, props)`` (otacore.delta_decoders), whichever the patch's
codec needs.

Version 1 patches (zstd, 92-byte header) apply exactly as before; version 3 is version 2
plus exact copies (a bitmap per block) and the literal branch conversion named in the
prelude (format: otacore.delta), version 4 version 3 with each block's control entries in
columns. An exact copy is predicted in the same bounded pieces as any copy, converted
literals are restored in place in their record, and columns are read through three cursors
into the record: the memory bound is the same.
"""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import numpy as np
import zstandard

from otacore import delta_literal
from otacore._types import Buffer
from otacore.delta import (
    AUTO_FILTERS,
    CODEC_LZMA2,
    CODEC_ZSTD_OLD,
    COLUMNS,
    COPY_FILTER_MASK,
    DEFAULT_BLOCK_LIMIT,
    DEFAULT_WINDOW_LOG,
    EXACT_COPIES,
    FORMAT_VERSION,
    LITERAL_SHIFT,
    MAX_HEADER_SIZE,
    MAX_MAP_ENTRIES,
    PRELUDE_FLAGS,
    SPARSE_COLUMNS,
    PatchBaseMismatchError,
    PatchCorruptError,
    PatchFeatureError,
    PatchHeader,
    PatchLimitError,
    PatchTargetMismatchError,
    PatchTruncatedError,
    _HeaderIncomplete,
    _kernel,
    prelude_format_version,
    read_header,
    unzigzag,
)
from otacore.delta_decoders import (
    DECODE_PIECE,
    LzmaDecoder,
    ZstdDecoder,
)
from otacore.errors import OtaError, PatchFormatError

#: Python-side bookkeeping allowance (objects, numpy headers, hash state) in the bound.
PYTHON_OVERHEAD = 96 * 1024
_VALUE_LIMIT = 1 << 40
_EMPTY_MAP = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))


class SupportsReadAt(Protocol):
    """An old image readable at offsets, like a flash partition."""

    def read_at(self, offset: int, size: int) -> bytes: ...


OldSource = Buffer | Callable[[int, int], Buffer] | SupportsReadAt | Any
Sink = Callable[[bytes], object] | Any


def python_memory_bound(block_limit: int = DEFAULT_BLOCK_LIMIT, chunk_size: int = 4096) -> int:
    """The Python-side peak allocation bound stated in the module docstring, in bytes."""
    return PYTHON_OVERHEAD + 2 * block_limit + 4 * chunk_size + DECODE_PIECE


def _reader(old: OldSource) -> tuple[Callable[[int, int], Buffer], int | None]:
    if isinstance(old, bytes | bytearray | memoryview):
        view = memoryview(old).cast("B")
        return (lambda offset, size: view[offset : offset + size]), len(view)
    read_at = getattr(old, "read_at", None)
    if callable(read_at):
        return read_at, None
    if callable(getattr(old, "seek", None)) and callable(getattr(old, "read", None)):
        stream: Any = old

        def read_file(offset: int, size: int) -> bytes:
            stream.seek(offset)
            data: bytes = stream.read(size)
            return data

        return read_file, None
    if callable(old):
        return old, None
    raise TypeError("old image must be bytes, a read_at(offset, size) callable or a file")


def _writer(sink: Sink) -> Callable[[bytes], object]:
    write = getattr(sink, "write", None)
    if callable(write):
        return cast(Callable[[bytes], object], write)
    if callable(sink):
        return cast(Callable[[bytes], object], sink)
    raise TypeError("sink must be callable or have a write(bytes) method")


def _varint(buf: bytearray, at: int, end: int, what: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= end:
            raise PatchCorruptError(f"patch record ends inside {what}")
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift >= 64:
            raise PatchCorruptError(f"patch has an over-long number in {what}")


def _parse_map(buf: bytearray, at: int, end: int, name: str) -> tuple[Any, int]:
    count, at = _varint(buf, at, end, f"the {name} map")
    if count > MAX_MAP_ENTRIES:
        raise PatchLimitError(f"patch {name} map has {count} entries (limit {MAX_MAP_ENTRIES})")
    keys = np.empty(count, dtype=np.int64)
    deltas = np.empty(count, dtype=np.int64)
    key = 0
    for i in range(count):
        raw, at = _varint(buf, at, end, f"the {name} map")
        if i == 0:
            key = unzigzag(raw)
        elif raw == 0:
            raise PatchCorruptError(f"patch {name} map keys are not increasing")
        else:
            key += raw
        delta, at = _varint(buf, at, end, f"the {name} map")
        delta = unzigzag(delta)
        if abs(key) > _VALUE_LIMIT or abs(delta) > _VALUE_LIMIT:
            raise PatchCorruptError(f"patch {name} map holds an out-of-range value")
        keys[i], deltas[i] = key, delta
    return (keys, deltas), at


class PatchApplier:
    """Streaming applier: ``feed`` patch pieces, then ``finish``. It does no I/O of its own:
    the caller hands in the old-image reader and the sink (a flash driver on a device).

    ``old``: the base image as bytes, a ``read_at(offset, size)`` object or callable, or a
    seekable binary file. ``sink``: a callable or an object with ``write``; it receives the
    target image in order. Nothing is trusted: every length and offset is checked before use,
    and ``finish`` checks the target size and SHA-256.
    """

    def __init__(
        self,
        old: OldSource,
        sink: Sink,
        *,
        max_window_log: int = DEFAULT_WINDOW_LOG,
        max_block_limit: int = DEFAULT_BLOCK_LIMIT,
        verify_base: bool = True,
        chunk_size: int = 4096,
    ) -> None:
        self._read, self._old_size = _reader(old)
        self._write = _writer(sink)
        self._max_window_log = max_window_log
        self._max_block_limit = max_block_limit
        self._verify_base = verify_base
        self._chunk = max(64, chunk_size)
        self._head = bytearray()
        self.header: PatchHeader | None = None
        self._remaining = 0  # payload bytes still expected
        self._stream: Any = None
        self._failed: str | None = None
        self._ended = False
        # record parser state
        self._length_bytes = bytearray()
        self._record_size: int | None = None
        self._record = bytearray()
        self._prelude_done = False
        self._model: Any = (0, 0, 0, _EMPTY_MAP, _EMPTY_MAP)
        self._exact_copies = False  # version 3: blocks carry an exact-copy bitmap
        self._columns = False  # version 4: control entries in columns
        self._literal = delta_literal.NONE  # the prelude's literal branch conversion
        # output state
        self._cursor = 0
        self.bytes_written = 0
        self._target_hash = hashlib.sha256()

    # --- input -------------------------------------------------------------------------

    def feed(self, data: Buffer) -> None:
        """Take the next piece of the patch (any size); writes whatever output it completes."""
        if self._failed is not None:
            raise PatchFormatError(f"patch application already failed: {self._failed}")
        try:
            self._feed(memoryview(data).cast("B"))
        except OtaError as exc:
            self._failed = str(exc)
            raise
        except zstandard.ZstdError as exc:
            self._failed = str(exc)
            if "window" in str(exc).lower() or "memory" in str(exc).lower():
                raise PatchLimitError(f"patch payload needs too much memory: {exc}") from None
            raise PatchCorruptError(f"patch payload is corrupt: {exc}") from None
        except lzma.LZMAError as exc:
            self._failed = str(exc)
            raise PatchCorruptError(f"patch payload is corrupt (LZMA2): {exc}") from None

    def _feed(self, view: memoryview) -> None:
        if self.header is None:
            # The header's size shows as it parses (version 2 has varints): gather bytes
            # until it parses, then hand what follows it to the payload.
            take = min(len(view), MAX_HEADER_SIZE - len(self._head))
            self._head += view[:take]
            view = view[take:]
            try:
                header = PatchHeader.parse(self._head)
            except _HeaderIncomplete:
                if len(self._head) < MAX_HEADER_SIZE:
                    return
                raise
            self._start(header)
            rest = self._head[header.size :]
            view = memoryview(bytes(rest) + bytes(view)) if len(view) else memoryview(rest)
        if len(view) > self._remaining:
            raise PatchCorruptError(
                f"patch has {len(view) - self._remaining} bytes after its declared payload"
            )
        self._remaining -= len(view)
        # The decoder calls self.write with each decompressed piece, one at most
        # DECODE_PIECE (zstd: one block) at a time.
        self._stream.feed(view)

    def _start(self, header: PatchHeader) -> None:
        if header.window_log > self._max_window_log:
            raise PatchLimitError(
                f"patch needs a {1 << header.window_log >> 10} KiB decoding window; this applier "
                f"allows {1 << self._max_window_log >> 10} KiB"
            )
        if header.block_limit > self._max_block_limit:
            raise PatchLimitError(
                f"patch records may reach {header.block_limit} bytes; this applier allows "
                f"{self._max_block_limit}"
            )
        if self._old_size is not None and self._old_size != header.base_size:
            raise PatchBaseMismatchError(
                f"patch is for a {header.base_size}-byte base image, this one has "
                f"{self._old_size} bytes"
            )
        if self._verify_base:
            digest = hashlib.sha256()
            for offset in range(0, header.base_size, 1 << 16):
                size = min(1 << 16, header.base_size - offset)
                digest.update(self._read_old(offset, size))
            if digest.digest()[: len(header.base_sha256)] != header.base_sha256:
                raise PatchBaseMismatchError(
                    "patch was made for a different base image (SHA-256 mismatch)"
                )
        self.header = header
        self._remaining = header.payload_size
        if header.codec == CODEC_LZMA2:
            self._stream = LzmaDecoder(header.window_log, header.lzma_props, self)
        elif header.codec == CODEC_ZSTD_OLD:  # the base (<= the window, parse checked it)
            base = bytes(self._read_old(0, header.base_size))
            self._stream = ZstdDecoder(header.window_log, self, base)
        else:
            self._stream = ZstdDecoder(header.window_log, self)

    def _read_old(self, offset: int, size: int) -> Buffer:
        data = self._read(offset, size)
        if len(data) != size:
            raise PatchBaseMismatchError(
                f"base image read of {size} bytes at {offset} returned {len(data)}"
            )
        return data

    # --- records (zstd's output side) -------------------------------------------------

    def write(self, data: bytes) -> int:
        """Receive decompressed payload bytes (called by the decoder; not public API)."""
        header = self.header
        assert header is not None
        view = memoryview(data)
        while len(view):
            if self._ended:
                raise PatchCorruptError("patch payload continues after its end record")
            if self._record_size is None:
                byte = view[0]
                view = view[1:]
                self._length_bytes.append(byte)
                if byte & 0x80:
                    if len(self._length_bytes) >= 10:
                        raise PatchCorruptError("patch has an over-long record length")
                    continue
                size, _ = _varint(self._length_bytes, 0, len(self._length_bytes), "a length")
                self._length_bytes.clear()
                if size > header.block_limit:
                    raise PatchCorruptError(
                        f"patch record of {size} bytes exceeds its block limit {header.block_limit}"
                    )
                if size == 0:
                    if not self._prelude_done:
                        raise PatchCorruptError("patch payload has no prelude record")
                    self._ended = True
                    continue
                self._record_size = size
                continue
            take = min(len(view), self._record_size - len(self._record))
            self._record += view[:take]
            view = view[take:]
            if len(self._record) == self._record_size:
                if self._prelude_done:
                    self._run_block(self._record)
                else:
                    self._parse_prelude(self._record)
                self._record.clear()
                self._record_size = None
        return len(data)

    def _parse_prelude(self, buf: bytearray) -> None:
        header = self.header
        assert header is not None
        field, at = _varint(buf, 0, len(buf), "the filter set")
        filters = field & COPY_FILTER_MASK
        literal = field >> LITERAL_SHIFT & 3
        if filters not in AUTO_FILTERS or field & ~PRELUDE_FLAGS:
            raise PatchCorruptError(f"patch uses unknown filter set {field}")
        if field & SPARSE_COLUMNS and not field & COLUMNS:
            raise PatchCorruptError(
                f"patch prelude ({field:#x}) sets sparse columns (bit 7) without columns (bit 6)"
            )
        expected = prelude_format_version(field)
        if max(header.version, FORMAT_VERSION) != expected:
            # An applier of an older version reads none of the newer features, so the header
            # names the version that has them; and a version only for payloads that use its
            # feature (version 3: exact copies or a literal conversion, prelude bits 3-5;
            # version 4: columns, bit 6).
            raise PatchCorruptError(
                f"a version {header.version} patch's prelude ({field:#x}) is version "
                f"{expected}'s: version 3 is exact copies or literal branch conversion "
                "(prelude bits 3-5) without columns, version 4 columns (bit 6), version 5 "
                "sparse columns (bits 6 and 7)"
            )
        if literal not in delta_literal.KIND_NAMES:
            raise PatchFeatureError(
                f"patch converts its literal bytes with transform {literal}, which this code "
                "does not know (it knows "
                + ", ".join(f"{k} {name}" for k, name in delta_literal.KIND_NAMES.items() if k)
                + "); a newer applier is needed"
            )
        self._exact_copies = bool(field & EXACT_COPIES)
        self._columns = bool(field & COLUMNS)
        self._sparse = bool(field & SPARSE_COLUMNS)
        base, image_size = 0, 0
        reloc = values = _EMPTY_MAP
        if filters:
            base_plus_one, at = _varint(buf, at, len(buf), "the load address")
            if base_plus_one:
                base, image_size = base_plus_one - 1, header.base_size
                if base + image_size > 1 << 32:
                    raise PatchCorruptError(f"patch load address {base:#x} is out of range")
            reloc, at = _parse_map(buf, at, len(buf), "relocation")
            values, at = _parse_map(buf, at, len(buf), "value")
        if at != len(buf):
            raise PatchCorruptError("patch prelude has trailing bytes")
        self._model = (filters, base, image_size, reloc, values)
        self._literal = literal
        self._prelude_done = True

    def _run_block(self, buf: bytearray) -> None:
        header = self.header
        assert header is not None
        size = len(buf)
        count, control = _varint(buf, 0, size, "a block")
        bitmap = (count + 7) // 8 if self._exact_copies else 0
        # (the fewest control bytes: a varint per field, or with sparse columns a copy
        # length and two bitmap bits per entry)
        least = count + 2 * ((count + 7) // 8) if self._sparse else count * 3
        if count == 0 or least + bitmap > size:
            raise PatchCorruptError(f"patch block claims {count} entries in {size} bytes")
        exact = int.from_bytes(buf[control : control + bitmap], "little")
        if exact >> count:
            raise PatchCorruptError("patch block's exact-copy bitmap marks entries it lacks")
        control += bitmap
        # Pass 1: check every entry against the images before any output is written.
        at, cursor, copied, literal, written = control, self._cursor, 0, 0, 0
        for index, entry in enumerate(self._entries(buf, control, count)):
            seek, copy, extra, at = entry  # (at: past the control bytes read so far)
            cursor += unzigzag(seek)
            if not 0 <= cursor <= header.base_size or copy > header.base_size - cursor:
                raise PatchCorruptError(
                    f"patch copies old bytes {cursor}..{cursor + copy}, outside the "
                    f"{header.base_size}-byte base image"
                )
            cursor += copy
            if not exact >> index & 1:
                copied += copy  # difference bytes in the record
            written += copy + extra
            literal += extra
        if at + copied + literal != size:
            raise PatchCorruptError("patch block lengths do not add up to its record size")
        if self.bytes_written + written > header.target_size:
            raise PatchCorruptError(f"patch writes past the {header.target_size}-byte target size")
        # Pass 2: run the entries.
        diff_at, extra_at = at, at + copied
        for index, (seek, copy, extra, _) in enumerate(self._entries(buf, control, count)):
            self._cursor += unzigzag(seek)
            if copy and exact >> index & 1:
                self._copy(buf, None, copy)
            elif copy:
                self._copy(buf, diff_at, copy)
                diff_at += copy
            if self._literal and extra:  # in the record, at the entry's output offset
                delta_literal.restore_into(
                    buf, self.bytes_written, self._literal, extra_at, extra_at + extra,
                    plain=True,
                )
            for start in range(extra_at, extra_at + extra, self._chunk):
                self._emit(bytes(buf[start : min(start + self._chunk, extra_at + extra)]))
            extra_at += extra

    def _entries(
        self, buf: bytearray, control: int, count: int
    ) -> Iterator[tuple[int, int, int, int]]:
        """The ``count`` control entries of the block record ``buf`` from offset ``control``:
        (zigzag seek, copy length, extra length, offset past the control bytes read so far;
        after the last entry, past all of them). In version 4 (COLUMNS) the three fields are
        three columns of ``count`` varints each: their starts are found first, then the
        entries read through three cursors, so memory stays the record's."""
        size = len(buf)
        what = "a control entry"
        if not self._columns:
            at = control
            for _ in range(count):
                seek, at = _varint(buf, at, size, what)
                copy, at = _varint(buf, at, size, what)
                extra, at = _varint(buf, at, size, what)
                yield seek, copy, extra, at
            return
        if self._sparse:
            yield from self._sparse_entries(buf, control, count)
            return
        starts = [control]
        for _ in range(2):  # skip the seek column, then the copy column
            at = starts[-1]
            for _ in range(count):
                _, at = _varint(buf, at, size, what)
            starts.append(at)
        seek_at, copy_at, extra_at = starts
        for _ in range(count):
            seek, seek_at = _varint(buf, seek_at, size, what)
            copy, copy_at = _varint(buf, copy_at, size, what)
            extra, extra_at = _varint(buf, extra_at, size, what)
            yield seek, copy, extra, extra_at

    def _sparse_entries(
        self, buf: bytearray, control: int, count: int
    ) -> Iterator[tuple[int, int, int, int]]:
        """:meth:`_entries` in version 5 (SPARSE_COLUMNS, module docstring of otacore.delta):
        the seek and extra bitmaps, the copy lengths, then the non-zero seeks and extras."""
        size, what = len(buf), "a control entry"
        width = (count + 7) // 8
        seeks = int.from_bytes(buf[control : control + width], "little")
        extras = int.from_bytes(buf[control + width : control + 2 * width], "little")
        if (seeks | extras) >> count:
            raise PatchCorruptError("patch block's sparse-column bitmaps mark entries it lacks")
        copy_at = control + 2 * width
        at = copy_at
        for _ in range(count):  # skip the copy lengths
            _, at = _varint(buf, at, size, what)
        seek_at = at
        for _ in range(seeks.bit_count()):  # skip the non-zero seeks
            _, at = _varint(buf, at, size, what)
        extra_at = at
        for index in range(count):
            seek = extra = 0
            if seeks >> index & 1:
                seek, seek_at = _varint(buf, seek_at, size, what)
            copy, copy_at = _varint(buf, copy_at, size, what)
            if extras >> index & 1:
                extra, extra_at = _varint(buf, extra_at, size, what)
            if (seeks >> index & 1 and not seek) or (extras >> index & 1 and not extra):
                # (one way to write a block: a set bit stands for a non-zero value)
                raise PatchCorruptError("patch block's sparse columns hold a marked zero")
            yield seek, copy, extra, extra_at

    def _copy(self, buf: bytearray, diff_at: int | None, length: int) -> None:
        """Output ``length`` predicted old bytes from the cursor, plus the difference bytes
        at ``diff_at`` in ``buf`` (None: an exact copy, the prediction as it is)."""
        start = self._cursor
        span_end = start + length
        shift = self.bytes_written - start
        position = start
        while position < span_end:
            limit = min(position + self._chunk, span_end)
            fetch = min(limit + _kernel.LOOKAHEAD, span_end) - position
            source = self._read_old(position, fetch)
            predicted, reached = _kernel.predict(
                source, position, span_end, limit, shift, self._model
            )
            if diff_at is None:
                self._emit(bytes(predicted))
            else:
                offset = diff_at + (position - start)
                difference = buf[offset : offset + (reached - position)]
                self._emit(_kernel.add_bytes(predicted, difference))
            position = reached
        self._cursor = span_end

    def _emit(self, data: bytes) -> None:
        self._target_hash.update(data)
        self.bytes_written += len(data)
        self._write(data)

    # --- end ---------------------------------------------------------------------------

    def finish(self) -> PatchHeader:
        """Check that the patch was complete and produced the promised target; returns the
        header. Raises PatchTruncatedError, PatchCorruptError or PatchTargetMismatchError."""
        if self._failed is not None:
            raise PatchFormatError(f"patch application already failed: {self._failed}")
        header = self.header
        if header is None:
            try:
                PatchHeader.parse(self._head)
            except _HeaderIncomplete as exc:
                raise PatchTruncatedError(str(exc)) from None
            raise PatchTruncatedError(f"patch is truncated: {len(self._head)} bytes")
        if self._remaining:
            raise PatchTruncatedError(
                f"patch is truncated: {self._remaining} of {header.payload_size} payload "
                "bytes missing"
            )
        if not self._ended:
            raise PatchCorruptError("patch payload ended without its end record")
        try:
            self._stream.check_end()
        except OtaError as exc:
            self._failed = str(exc)
            raise
        if self.bytes_written != header.target_size:
            raise PatchTargetMismatchError(
                f"patch produced {self.bytes_written} bytes, the target has {header.target_size}"
            )
        if self._target_hash.digest()[: len(header.target_sha256)] != header.target_sha256:
            raise PatchTargetMismatchError("patch output does not match the target SHA-256")
        return header


def apply_stream(
    old: OldSource,
    pieces: Any,
    sink: Sink,
    **options: Any,
) -> PatchHeader:
    """Apply a patch arriving as an iterable of byte pieces; returns the checked header."""
    applier = PatchApplier(old, sink, **options)
    for piece in pieces:
        applier.feed(piece)
    return applier.finish()


def decode_payload(
    patch: Buffer, *, old: Buffer | None = None, max_size: int | None = None
) -> tuple[PatchHeader, bytes]:
    """The header and the decompressed payload (the records) of a whole patch, any codec
    (codec 2 needs the ``old`` image): for tools that inspect patches; devices stream with
    :class:`PatchApplier`. Refuses a payload that would decompress past ``max_size``
    (default: 4x the target + 1 MiB)."""
    header = read_header(patch)
    limit = header.target_size * 4 + (1 << 20) if max_size is None else max_size
    out = bytearray()

    class _Collect:
        def write(self, data: bytes) -> int:
            if len(out) + len(data) > limit:
                raise PatchLimitError(f"patch payload decompresses past {limit} bytes")
            out.extend(data)
            return len(data)

    decoder: ZstdDecoder | LzmaDecoder
    if header.codec == CODEC_LZMA2:
        decoder = LzmaDecoder(header.window_log, header.lzma_props, _Collect())
    elif header.codec == CODEC_ZSTD_OLD:
        if old is None or len(old) != header.base_size:
            raise PatchBaseMismatchError("this patch's payload needs its base image to decode")
        decoder = ZstdDecoder(header.window_log, _Collect(), bytes(old))
    else:
        decoder = ZstdDecoder(header.window_log, _Collect())
    try:
        decoder.feed(memoryview(patch).cast("B")[header.size :])
    except zstandard.ZstdError as exc:
        raise PatchCorruptError(f"patch payload is corrupt: {exc}") from None
    except lzma.LZMAError as exc:
        raise PatchCorruptError(f"patch payload is corrupt (LZMA2): {exc}") from None
    decoder.check_end()
    return header, bytes(out)
