"""The payload decoders of the streaming applier (otacore.delta_stream) and the native
memory each holds.

A patch's payload is one zstd frame (codec 0; codec 2 with the base image as a raw-content
dictionary) or one raw LZMA2 stream (codec 1). Each decoder is fed the compressed payload in
pieces of any size and writes the decoded payload to ``write.write`` in pieces of at most
DECODE_PIECE bytes; ``zstd_native_bound`` and ``lzma_native_bound`` are the state the codec
library holds meanwhile, which the applier's memory bound adds to its own.
"""

from __future__ import annotations

import lzma
from typing import IO, Any, cast

import zstandard

from otacore.delta import PatchCorruptError, lzma_filters, lzma_props

#: Largest piece the payload decoder takes in or hands to the record parser at a time.
DECODE_PIECE = 16384
#: liblzma's LZMA2 decoder state besides the dictionary and probability tables (coder
#: structs, range decoder, allocation headers), rounded up.
_LZMA_FIXED_STATE = 8 * 1024


def zstd_native_bound(window_log: int) -> int:
    """zstd's own streaming state for ``window_log`` (ZSTD_estimateDStreamSize, rounded up)."""
    window = 1 << window_log
    block = min(window, 128 * 1024)
    # DCtx + input buffer (one block) + output buffer (window + one block + wildcopy slack)
    return zstandard.estimate_decompression_context_size() + block + window + block + 64


def lzma_native_bound(window_log: int, props: int) -> int:
    """liblzma's LZMA2 decoding state for ``window_log`` and the properties byte ``props``:
    the dictionary, 1846 + 768 * 2**(lc + lp) probabilities of 2 bytes (LZMA specification,
    "The state of the LZMA decoder"), fixed state and one DECODE_PIECE of buffered input."""
    lc, lp, _ = lzma_props(props)
    probabilities = 1846 + 768 * (1 << (lc + lp))
    return (1 << window_log) + 2 * probabilities + _LZMA_FIXED_STATE + DECODE_PIECE


class _Lzma2ChunkCheck:
    """Walks the LZMA2 chunk headers of the compressed payload as it arrives (xz-file-format
    1.2.0, 5.3.1; liblzma lzma2_decoder.c) and refuses a chunk that sets properties other
    than the header's: the decoder's table size must be the one the header promised."""

    def __init__(self, props: int) -> None:
        self._props = props
        self._head = bytearray()
        self._need = 1  # header bytes of the current chunk (1: its control byte)
        self._skip = 0  # data bytes of the current chunk still to pass over
        self.ended = False

    def feed(self, view: memoryview) -> None:
        at = 0
        while at < len(view) and not self.ended:
            if self._skip:
                step = min(self._skip, len(view) - at)
                self._skip -= step
                at += step
                continue
            self._head.append(view[at])
            at += 1
            control = self._head[0]
            if len(self._head) == 1:
                if control == 0x00:
                    self.ended = True  # the end marker; the decoder refuses what follows
                    return
                if control in (0x01, 0x02):
                    self._need = 3  # uncompressed chunk: control, size - 1 (big-endian)
                elif control >= 0x80:
                    self._need = 6 if control >= 0xC0 else 5  # + properties on a state reset
                else:
                    raise PatchCorruptError(f"patch LZMA2 stream has bad control byte {control}")
            if len(self._head) < self._need:
                continue
            if control < 0x80:
                self._skip = (self._head[1] << 8 | self._head[2]) + 1
            else:
                self._skip = (self._head[3] << 8 | self._head[4]) + 1
                if self._need == 6 and self._head[5] != self._props:
                    raise PatchCorruptError(
                        f"patch LZMA2 chunk sets properties {self._head[5]:#04x}, the header "
                        f"declares {self._props:#04x}"
                    )
            self._head.clear()
            self._need = 1


class ZstdDecoder:
    """Codecs 0 and 2: one zstd frame, decoded by a stream writer into ``write``; codec 2
    with the base image as a raw-content dictionary."""

    def __init__(self, window_log: int, write: Any, dictionary: bytes | None = None) -> None:
        dict_data = None
        if dictionary is not None:
            dict_data = zstandard.ZstdCompressionDict(
                dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT
            )
        decompressor = zstandard.ZstdDecompressor(
            dict_data=dict_data, max_window_size=1 << window_log
        )
        # zstd writes each decompressed piece to write.write (an IO-like sink).
        self._stream = decompressor.stream_writer(cast(IO[bytes], write), write_size=DECODE_PIECE)

    def feed(self, view: memoryview) -> None:
        self._stream.write(view)

    def check_end(self) -> None:
        """The end record was seen; the frame's own end needs no separate check."""


class LzmaDecoder:
    """Codec 1: one raw LZMA2 stream, fed and drained DECODE_PIECE at a time so that neither
    its buffered input nor any output piece exceeds that."""

    def __init__(self, window_log: int, props: int, write: Any) -> None:
        self._decompressor = lzma.LZMADecompressor(
            format=lzma.FORMAT_RAW, filters=lzma_filters(window_log, props)
        )
        self._chunks = _Lzma2ChunkCheck(props)
        self._write = write.write

    def feed(self, view: memoryview) -> None:
        decompressor = self._decompressor
        for start in range(0, len(view), DECODE_PIECE):
            piece = view[start : start + DECODE_PIECE]
            if decompressor.eof:
                raise PatchCorruptError("patch payload has bytes after its LZMA2 end marker")
            self._chunks.feed(piece)
            self._write(decompressor.decompress(piece, max_length=DECODE_PIECE))
            while not decompressor.needs_input and not decompressor.eof:
                self._write(decompressor.decompress(b"", max_length=DECODE_PIECE))
            if decompressor.unused_data:
                raise PatchCorruptError("patch payload has bytes after its LZMA2 end marker")

    def check_end(self) -> None:
        if not self._decompressor.eof:
            raise PatchCorruptError("patch payload ends without its LZMA2 end marker")
