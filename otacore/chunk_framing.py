"""Frame, and seal, a window of firmware chunks in one call: the card's chunk framing kernel.

The per-chunk path builds, for every chunk, a ``Chunk`` message, wraps it in a CoAP
``POST u`` (``otacore.protocol.ota_wire.transfer_request``), encodes it on the link, and
seals it as its own record. :func:`frame_window` makes the same CoAP messages, byte for
byte, for a whole window of chunks in one call of the kernel (``ext/chunk_framing.pyx``, or
its pure-Python twin ``otacore/_chunk_framing_py.py``, picked by ``load_kernel``), reading
the chunks straight out of the image buffer. :func:`seal_window` hands the messages to a
record layer's batch seal, which reserves the sequence numbers (the layer owns them) and
lets the kernel build nonces and additional data and call the AEAD:

* DTLS 1.2: one record per message, each its own datagram (RFC 6347 4.1);
* TLS 1.3: the messages as one stream (as the TCP shell writes them today), cut into
  records of at most 2^14 bytes (RFC 8446 5.1), concatenated for one stream write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

from otacore._chunk_framing_py import (
    MAX_TOKEN_LENGTH,
    MAX_WINDOW_CHUNKS,
    ChunkFramingError,
    ChunkRangeError,
    WindowTooLargeError,
)
from otacore._select import load_kernel
from otacore._types import Buffer
from otacore.coap import Code, Message, MessageType, encode_udp
from otacore.records.dtls12 import DtlsRecordLayer
from otacore.records.tls13 import Tls13RecordLayer
from otacore.records.tls13_protocol import MAX_PLAINTEXT

__all__ = [
    "MAX_TOKEN_LENGTH",
    "MAX_WINDOW_CHUNKS",
    "NATIVE",
    "ChunkFramingError",
    "ChunkRangeError",
    "WindowTooLargeError",
    "encoded_options",
    "frame_and_seal_window",
    "frame_window",
    "seal_window",
]

_kernel = load_kernel("chunk_framing")

#: True when the compiled kernel is in use.
NATIVE: bool = _kernel.__name__ == "otacore._chunk_framing"

Transport = Literal["udp", "tcp"]
Sealer = DtlsRecordLayer | Tls13RecordLayer


def encoded_options(options: Sequence[tuple[int, Buffer]]) -> bytes:
    """``options`` in wire form (sorted by number, RFC 7252 3.1), exactly as the codec's
    ``encode_udp``/``encode_tcp`` write them; pass the result to :func:`frame_window`."""
    as_bytes = [(number, bytes(value)) for number, value in options]
    datagram = encode_udp(Message(MessageType.NON, Code.POST, 0, b"", as_bytes))
    return datagram[4:]


def frame_window(
    image: Buffer,
    chunk_size: int,
    numbers: Sequence[int],
    *,
    transfer_id: int,
    transport: Transport,
    options: Buffer,
    crcs: Sequence[int] | None = None,
    message_ids: int | Sequence[int] = 0,
    tokens: Buffer | Sequence[Buffer] = b"",
    msg_type: int = MessageType.NON,
    code: int = Code.POST,
) -> list[bytes]:
    """The CoAP message carrying each chunk of ``numbers`` (numbered from 1), in order.

    Chunk ``n`` is ``image[(n - 1) * chunk_size : n * chunk_size]`` (the last may be
    short); its payload is ``encode_message(Chunk(transfer_id, n, crc, data))``, with the
    CRC-32 from ``crcs[n - 1]`` (``PreparedFile.chunk_crcs``) or computed when None.
    ``options`` come from :func:`encoded_options`. Over UDP each message takes ``msg_type``
    and its message id: one each from ``message_ids``, or consecutive ids from an int
    (wrapping at 65536); over TCP neither exists (RFC 8323 3.2). ``tokens``: one for every
    message, or one each.

    ChunkFramingError for arguments out of range (WindowTooLargeError past
    MAX_WINDOW_CHUNKS chunks, ChunkRangeError for a number outside the file).
    """
    if transport not in ("udp", "tcp"):
        raise ChunkFramingError(f"transport must be 'udp' or 'tcp', not {transport!r}")
    frames: list[bytes] = _kernel.frame_chunks(
        image,
        chunk_size,
        numbers,
        crcs,
        transfer_id,
        transport == "tcp",
        msg_type,
        code,
        message_ids,
        tokens,
        options,
    )
    return frames


@overload
def seal_window(frames: Sequence[bytes], sealer: DtlsRecordLayer) -> list[bytes]: ...


@overload
def seal_window(frames: Sequence[bytes], sealer: Tls13RecordLayer) -> bytes: ...


def seal_window(frames: Sequence[bytes], sealer: Sealer) -> list[bytes] | bytes:
    """Seal a window's messages: a DTLS 1.2 layer gives one record (datagram) per message;
    a TLS 1.3 layer gives the messages' stream cut into records of at most 2^14 bytes,
    preceded by anything the layer had queued, for one stream write. The layer advances
    its sequence numbers exactly as that many single seals would."""
    if isinstance(sealer, DtlsRecordLayer):
        return sealer.seal_many(frames)
    if isinstance(sealer, Tls13RecordLayer):
        stream = b"".join(frames)
        pieces = [stream[i : i + MAX_PLAINTEXT] for i in range(0, len(stream), MAX_PLAINTEXT)]
        return sealer.seal_many(pieces)
    raise TypeError(
        f"a sealer is a DtlsRecordLayer or a Tls13RecordLayer, not {type(sealer).__name__}"
    )


@overload
def frame_and_seal_window(
    image: Buffer,
    chunk_size: int,
    numbers: Sequence[int],
    *,
    sealer: DtlsRecordLayer,
    transfer_id: int,
    options: Buffer,
    crcs: Sequence[int] | None = None,
    message_ids: int | Sequence[int] = 0,
    tokens: Buffer | Sequence[Buffer] = b"",
    msg_type: int = MessageType.NON,
    code: int = Code.POST,
) -> list[bytes]: ...


@overload
def frame_and_seal_window(
    image: Buffer,
    chunk_size: int,
    numbers: Sequence[int],
    *,
    sealer: Tls13RecordLayer,
    transfer_id: int,
    options: Buffer,
    crcs: Sequence[int] | None = None,
    message_ids: int | Sequence[int] = 0,
    tokens: Buffer | Sequence[Buffer] = b"",
    msg_type: int = MessageType.NON,
    code: int = Code.POST,
) -> bytes: ...


def frame_and_seal_window(
    image: Buffer,
    chunk_size: int,
    numbers: Sequence[int],
    *,
    sealer: Sealer,
    transfer_id: int,
    options: Buffer,
    crcs: Sequence[int] | None = None,
    message_ids: int | Sequence[int] = 0,
    tokens: Buffer | Sequence[Buffer] = b"",
    msg_type: int = MessageType.NON,
    code: int = Code.POST,
) -> list[bytes] | bytes:
    """:func:`frame_window` then :func:`seal_window`; the transport follows the sealer
    (DTLS 1.2: UDP framing, datagrams out; TLS 1.3: TCP framing, stream bytes out)."""
    transport: Transport = "udp" if isinstance(sealer, DtlsRecordLayer) else "tcp"
    frames = frame_window(
        image,
        chunk_size,
        numbers,
        transfer_id=transfer_id,
        transport=transport,
        options=options,
        crcs=crcs,
        message_ids=message_ids,
        tokens=tokens,
        msg_type=msg_type,
        code=code,
    )
    return seal_window(frames, sealer)
