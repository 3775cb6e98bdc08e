"""Pure-Python twin of ext/chunk_framing.pyx: frame a window of firmware chunks, seal records.

Same functions, same results, same error classes and messages as the compiled kernel
(``ext/chunk_framing.pyx`` imports its error classes from here). The typed front is
:mod:`otacore.chunk_framing`; the kernel boundary is plain values so the compiled twin
stays fast.

:func:`frame_chunks` builds, for each chunk number of a window, the CoAP message the
per-chunk path sends (``otacore.protocol.ota_wire.transfer_request`` of a
:class:`~otacore.transfer.messages.Chunk`, then the link's ``encode_udp``/``encode_tcp``):

* UDP/DTLS (RFC 7252 3): ``0x40|T<<4|TKL, Code, Message ID, Token, Options, 0xFF, Payload``;
* TCP/TLS (RFC 8323 3.2): ``Len|TKL, Extended Length, Code, Token, Options, 0xFF, Payload``;

with the payload ``encode_message(Chunk)``: the kind tag (``MessageKind.CHUNK``), then
transfer id, chunk number and CRC-32 (u32 little-endian each), then the chunk's bytes.

:func:`seal_dtls12` and :func:`seal_tls13` protect a batch of payloads under consecutive
sequence numbers that the caller (the record layer, which owns them) has already reserved:
DTLS 1.2 records one per datagram (RFC 6347 4.1, RFC 5246 6.2.3.3), TLS 1.3 records
concatenated for one stream write (RFC 8446 5.2, 5.3). ``encrypt`` is the ``encrypt``
method of a `cryptography` AEAD object; nonces and additional data are built here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from operator import index

from otacore._types import Buffer
from otacore.errors import OtaError
from otacore.transfer.messages import MAX_CHUNK_SIZE, MAX_WINDOW, MessageKind


class ChunkFramingError(OtaError, ValueError):
    """Arguments to the chunk framing kernel are out of range; the message says which."""


class WindowTooLargeError(ChunkFramingError):
    """More chunks in one call than a transfer window may hold (MAX_WINDOW)."""


class ChunkRangeError(ChunkFramingError):
    """A chunk number outside the file (chunks are numbered from 1)."""


#: Most chunks one call frames: a transfer window never holds more (transfer.messages).
MAX_WINDOW_CHUNKS = MAX_WINDOW
#: Longest token (RFC 7252 3).
MAX_TOKEN_LENGTH = 8
#: Most plaintext bytes one record carries (RFC 6347 4.1 via RFC 5246 6.2.1; RFC 8446 5.1).
MAX_RECORD_PLAINTEXT = 1 << 14
#: DTLS 1.2 on the wire (RFC 6347 4.1).
DTLS12_VERSION = 0xFEFD
#: Largest DTLS sequence number in an epoch (48 bits, RFC 6347 4.1).
MAX_DTLS_SEQUENCE = (1 << 48) - 1
#: Kind tag, transfer id, chunk number, CRC-32: what precedes the data of a chunk.
CHUNK_KIND = int(MessageKind.CHUNK)
CHUNK_PREFIX_SIZE = 13

_CHUNK_PREFIX = struct.Struct("<BIII")
_DTLS_AAD = struct.Struct(">QBHH")  # epoch||seq, type, version, length (RFC 5246 6.2.3.3)
_DTLS_HEADER = struct.Struct(">BHQH")  # type, version, epoch||seq, length (RFC 6347 4.1)
_TLS13_APPLICATION_DATA = 23


def _check_window(count: int) -> None:
    if count > MAX_WINDOW_CHUNKS:
        raise WindowTooLargeError(
            f"a window of {count} chunks exceeds the {MAX_WINDOW_CHUNKS}-chunk maximum; "
            "frame it in several calls"
        )


def _message_ids(message_ids: int | Sequence[int], count: int) -> list[int]:
    """One message id per message: consecutive from an int (wrapping at 2^16), or as given."""
    if isinstance(message_ids, int):
        first = index(message_ids)
        if not 0 <= first <= 0xFFFF:
            raise ChunkFramingError(f"message id {first} is outside 0..65535")
        return [(first + i) & 0xFFFF for i in range(count)]
    ids = [index(mid) for mid in message_ids]
    if len(ids) != count:
        raise ChunkFramingError(f"{len(ids)} message ids for {count} chunks; give one per chunk")
    for mid in ids:
        if not 0 <= mid <= 0xFFFF:
            raise ChunkFramingError(f"message id {mid} is outside 0..65535")
    return ids


def _tokens(tokens: Buffer | Sequence[Buffer], count: int) -> list[bytes]:
    """One token per message: the same bytes for all, or one each."""
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        chosen = [bytes(tokens)]
    else:
        chosen = [bytes(token) for token in tokens]
        if len(chosen) != count:
            raise ChunkFramingError(f"{len(chosen)} tokens for {count} chunks; give one per chunk")
    for token in chosen:
        if len(token) > MAX_TOKEN_LENGTH:
            raise ChunkFramingError(
                f"token of {len(token)} bytes exceeds the 8-byte maximum (RFC 7252 3)"
            )
    return chosen if len(chosen) == count else chosen * count


def _tcp_length_header(length: int, tkl: int) -> bytes:
    """RFC 8323 3.2: Len nibble (and extended length) for ``length`` bytes after the token."""
    if length < 13:
        return bytes((length << 4 | tkl,))
    if length < 269:
        return bytes((13 << 4 | tkl, length - 13))
    if length < 65805:
        return bytes((14 << 4 | tkl,)) + (length - 269).to_bytes(2, "big")
    return bytes((15 << 4 | tkl,)) + (length - 65805).to_bytes(4, "big")


def frame_chunks(
    image: Buffer,
    chunk_size: int,
    numbers: Sequence[int],
    crcs: Sequence[int] | None,
    transfer_id: int,
    tcp: bool,
    msg_type: int,
    code: int,
    message_ids: int | Sequence[int],
    tokens: Buffer | Sequence[Buffer],
    options: Buffer,
) -> list[bytes]:
    """The CoAP message carrying each chunk of ``numbers`` (1-based), in order.

    Chunk ``n`` is ``image[(n - 1) * chunk_size : n * chunk_size]`` (the last one may be
    short). ``crcs[n - 1]`` is its CRC-32 (``PreparedFile.chunk_crcs``); None computes it.
    ``options`` are the encoded options (RFC 7252 3.1, deltas from option 0) every message
    carries. Over UDP (``tcp`` false) ``msg_type`` and ``message_ids`` (one each, or the
    first of consecutive ids wrapping at 65536) fill the header; over TCP they are unused.
    ``tokens``: one token for every message, or one each.
    """
    view = memoryview(image).cast("B")
    size = len(view)
    chunk_size = index(chunk_size)
    transfer_id = index(transfer_id)
    msg_type = index(msg_type)
    code = index(code)
    chunk_numbers = [index(number) for number in numbers]
    count = len(chunk_numbers)
    _check_window(count)
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkFramingError(f"chunk size {chunk_size} is outside 1..{MAX_CHUNK_SIZE}")
    if not 0 <= transfer_id <= 0xFFFFFFFF:
        raise ChunkFramingError(f"transfer id {transfer_id} does not fit in 32 bits")
    if not 0 <= msg_type <= 3:
        raise ChunkFramingError(f"message type {msg_type} is outside 0..3")
    if not 1 <= code <= 255:
        # Code 0.00 is an Empty message, which carries no payload (RFC 7252 4.1).
        raise ChunkFramingError(f"code {code} is outside 1..255 (0.00 carries no payload)")
    chunk_count = -(-size // chunk_size)
    if crcs is not None and len(crcs) < chunk_count:
        raise ChunkFramingError(
            f"{len(crcs)} CRCs for a file of {chunk_count} chunks; give one per chunk of the file"
        )
    ids = [0] * count if tcp else _message_ids(message_ids, count)
    chosen_tokens = _tokens(tokens, count)
    option_bytes = bytes(memoryview(options).cast("B"))
    frames: list[bytes] = []
    for i, number in enumerate(chunk_numbers):
        if not 1 <= number <= chunk_count:
            raise ChunkRangeError(
                f"chunk {number} is outside the file's chunks 1..{chunk_count}"
            )
        offset = (number - 1) * chunk_size
        data = view[offset : min(offset + chunk_size, size)]
        crc = zlib.crc32(data) if crcs is None else index(crcs[number - 1]) & 0xFFFFFFFF
        prefix = _CHUNK_PREFIX.pack(CHUNK_KIND, transfer_id, number, crc)
        token = chosen_tokens[i]
        if tcp:
            length = len(option_bytes) + 1 + CHUNK_PREFIX_SIZE + len(data)
            head = _tcp_length_header(length, len(token)) + bytes((code,))
        else:
            mid = ids[i]
            head = bytes((0x40 | msg_type << 4 | len(token), code, mid >> 8, mid & 0xFF))
        frames.append(b"".join((head, token, option_bytes, b"\xff", prefix, data)))
    return frames


def _payload_views(payloads: Sequence[Buffer]) -> list[memoryview]:
    views = [memoryview(payload).cast("B") for payload in payloads]
    for view in views:
        if len(view) > MAX_RECORD_PLAINTEXT:
            raise ChunkFramingError(
                f"a record holds at most {MAX_RECORD_PLAINTEXT} bytes of plaintext, "
                f"got {len(view)}"
            )
    return views


def seal_dtls12(
    encrypt: Callable[[bytes, bytes, bytes], bytes],
    write_iv: bytes,
    epoch: int,
    first_seq: int,
    explicit_nonce: bool,
    content_type: int,
    payloads: Sequence[Buffer],
) -> list[bytes]:
    """One DTLS 1.2 record per payload, as datagrams, sequence numbers ``first_seq``, ...

    ``explicit_nonce``: AES-GCM/CCM's salt || epoch||seq nonce, carried in the record (RFC
    5288 3, RFC 6655 3); otherwise ChaCha20-Poly1305's IV XOR epoch||seq (RFC 7905 2).
    """
    epoch = index(epoch)
    first_seq = index(first_seq)
    content_type = index(content_type)
    views = _payload_views(payloads)
    if not 0 <= epoch <= 0xFFFF:
        raise ChunkFramingError(f"epoch {epoch} is outside 0..65535")
    if first_seq < 0 or first_seq + len(views) - 1 > MAX_DTLS_SEQUENCE:
        raise ChunkFramingError(
            f"sequence numbers {first_seq}.. of {len(views)} records pass 2^48 - 1"
        )
    if not 0 <= content_type <= 255:
        raise ChunkFramingError(f"content type {content_type} is outside 0..255")
    iv = bytes(write_iv)
    if len(iv) != (4 if explicit_nonce else 12):
        raise ChunkFramingError(
            f"a write IV of {len(iv)} bytes; this nonce style needs {4 if explicit_nonce else 12}"
        )
    iv_int = int.from_bytes(iv, "big")
    records: list[bytes] = []
    for i, view in enumerate(views):
        epoch_seq = (epoch << 48) | (first_seq + i)
        aad = _DTLS_AAD.pack(epoch_seq, content_type, DTLS12_VERSION, len(view))
        if explicit_nonce:
            explicit = epoch_seq.to_bytes(8, "big")
            body = explicit + encrypt(iv + explicit, bytes(view), aad)
        else:
            body = encrypt((iv_int ^ epoch_seq).to_bytes(12, "big"), bytes(view), aad)
        records.append(
            _DTLS_HEADER.pack(content_type, DTLS12_VERSION, epoch_seq, len(body)) + body
        )
    return records


def seal_tls13(
    encrypt: Callable[[bytes, bytes, bytes], bytes],
    write_iv: bytes,
    first_seq: int,
    tag_length: int,
    content_type: int,
    payloads: Sequence[Buffer],
) -> bytes:
    """One TLS 1.3 record per payload, concatenated, sequence numbers ``first_seq``, ...

    RFC 8446 5.2: the inner plaintext is the content followed by its type (no padding), the
    outer header says application_data and 0x0303 and is the additional data; 5.3: the
    nonce is the IV XOR the sequence number, left-padded.
    """
    first_seq = index(first_seq)
    tag_length = index(tag_length)
    content_type = index(content_type)
    views = _payload_views(payloads)
    if first_seq < 0 or first_seq + len(views) > 2**64 - 1:
        raise ChunkFramingError(
            f"sequence numbers {first_seq}.. of {len(views)} records pass 2^64 - 2"
        )
    if not 0 < tag_length <= 16:
        raise ChunkFramingError(f"tag length {tag_length} is outside 1..16")
    if not 0 <= content_type <= 255:
        raise ChunkFramingError(f"content type {content_type} is outside 0..255")
    iv = bytes(write_iv)
    if len(iv) != 12:
        raise ChunkFramingError(f"a TLS 1.3 write IV is 12 bytes, got {len(iv)}")
    iv_int = int.from_bytes(iv, "big")
    type_byte = bytes((content_type,))
    out: list[bytes] = []
    for i, view in enumerate(views):
        header = bytes((_TLS13_APPLICATION_DATA, 3, 3)) + (
            len(view) + 1 + tag_length
        ).to_bytes(2, "big")
        nonce = (iv_int ^ (first_seq + i)).to_bytes(12, "big")
        sealed = encrypt(nonce, bytes(view) + type_byte, header)
        if len(sealed) != len(view) + 1 + tag_length:
            raise ChunkFramingError(
                f"the AEAD returned {len(sealed)} bytes for {len(view) + 1} of plaintext; "
                f"is its tag {tag_length} bytes?"
            )
        out.append(header)
        out.append(sealed)
    return b"".join(out)
