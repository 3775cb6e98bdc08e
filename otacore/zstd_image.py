"""Full module images sent zstd-compressed, for devices that announce compressed OTA.

A device sets Hello's ``compressed_ota`` (Particle's Hello flag 0x40, "compressed OTA") when it
can inflate a compressed image into its inactive slot. When no delta applies, the server may
then send the image as one zstd frame (RFC 8878) instead of the raw bytes. The frame is what
travels and what the transfer's SHA-256 and chunk CRCs cover; the *image* inside it is what
the signed manifest names, so the device inflates the frame and checks the image against the
manifest (size, SHA-256, CRC-32, signature) exactly as it checks a full image.

Frames are made so a microcontroller can inflate them as a stream into flash with bounded
RAM: a window of ``2**window_log`` bytes (default 128 KiB, as the delta payload,
:data:`otacore.delta.DEFAULT_WINDOW_LOG`), the content size in the frame header (the device
refuses a frame that does not say how big the image is, or says something else than the
manifest), and the frame's own content checksum (XXH64) on top of the transfer's checks.
:func:`inflate_image` refuses a frame that asks for a larger window than the device allows
before decompressing anything, and never produces more than the size the manifest promises.
"""

from __future__ import annotations

import zstandard

from otacore.errors import OtaError

#: Window of frames the server makes: 128 KiB of RAM on the device while inflating.
DEFAULT_WINDOW_LOG = 17
#: Largest window :func:`inflate_image` accepts unless told otherwise (1 MiB).
MAX_WINDOW_LOG = 20
#: zstd level the server compresses with (images are compressed once and cached).
DEFAULT_LEVEL = 19
#: Bytes inflated per step: the output buffer a streaming device would flush to flash.
INFLATE_STEP = 16 * 1024


class CompressedImageError(OtaError):
    """A compressed image is malformed, truncated, too big, or needs too much memory."""


def compress_image(
    image: bytes, *, level: int = DEFAULT_LEVEL, window_log: int = DEFAULT_WINDOW_LOG
) -> bytes:
    """One zstd frame holding ``image``, with its content size and checksum, whose window a
    device can afford (``2**window_log`` bytes)."""
    if not 10 <= window_log <= MAX_WINDOW_LOG:
        raise ValueError(f"zstd window log {window_log} is outside 10..{MAX_WINDOW_LOG}")
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(image),
        window_log=window_log,
        write_content_size=True,
        write_checksum=True,
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(image)


def inflate_image(
    frame: bytes | memoryview, expected_size: int, *, max_window_log: int = MAX_WINDOW_LOG
) -> bytes:
    """The image inside ``frame``: exactly ``expected_size`` bytes, or a
    :class:`CompressedImageError` saying what is wrong.

    Inflates in :data:`INFLATE_STEP` pieces with a decompressor limited to a
    ``2**max_window_log``-byte window, as a device streaming into its slot would.
    """
    data = bytes(frame)
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise CompressedImageError(f"not a zstd frame: {exc}") from exc
    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise CompressedImageError("the zstd frame does not state the image size")
    if params.content_size != expected_size:
        raise CompressedImageError(
            f"the zstd frame holds {params.content_size} bytes, the manifest names "
            f"{expected_size}"
        )
    if params.window_size > 1 << max_window_log:
        raise CompressedImageError(
            f"the zstd frame needs a {params.window_size}-byte window, more than this device's "
            f"{1 << max_window_log}"
        )
    if not params.has_checksum:
        raise CompressedImageError("the zstd frame carries no content checksum")
    # The frame must end exactly where the file ends: walk its blocks (RFC 8878 3.1.1).
    frame_length = _frame_length(data, params.has_checksum)
    if frame_length != len(data):
        raise CompressedImageError(
            f"{len(data) - frame_length} bytes follow the zstd frame (one frame expected)"
        )
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << max_window_log)
    out = bytearray()
    try:
        with decompressor.stream_reader(data, read_across_frames=False) as reader:
            while True:
                piece = reader.read(INFLATE_STEP)
                if not piece:
                    break
                if len(out) + len(piece) > expected_size:
                    raise CompressedImageError(
                        f"the zstd frame inflates to more than {expected_size} bytes"
                    )
                out += piece
    except zstandard.ZstdError as exc:
        raise CompressedImageError(f"the zstd frame is corrupt: {exc}") from exc
    if len(out) != expected_size:
        raise CompressedImageError(
            f"the zstd frame is truncated: it inflates to {len(out)} of {expected_size} bytes"
        )
    return bytes(out)


def _frame_length(data: bytes, has_checksum: bool) -> int:
    """Bytes of the zstd frame at the start of ``data``: header, blocks, checksum.

    Each block starts with a 3-byte little-endian header: bit 0 last block, bits 1-2 type
    (0 raw, 1 RLE, 2 compressed, 3 reserved), bits 3-23 size; an RLE block's payload is one
    byte whatever its size (RFC 8878 3.1.1.2).
    """
    try:
        position = int(zstandard.frame_header_size(data))
    except zstandard.ZstdError as exc:
        raise CompressedImageError(f"not a zstd frame: {exc}") from exc
    while True:
        if position + 3 > len(data):
            raise CompressedImageError("the zstd frame is truncated inside a block header")
        header = int.from_bytes(data[position : position + 3], "little")
        block_type, block_size = (header >> 1) & 3, header >> 3
        if block_type == 3:
            raise CompressedImageError("the zstd frame has a reserved block type")
        position += 3 + (1 if block_type == 1 else block_size)
        if position > len(data):
            raise CompressedImageError("the zstd frame is truncated inside a block")
        if header & 1:
            break
    position += 4 if has_checksum else 0  # XXH64 content checksum, low 4 bytes
    if position > len(data):
        raise CompressedImageError("the zstd frame is truncated inside its checksum")
    return position
