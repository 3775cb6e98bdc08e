"""Typed messages and events of the firmware transfer protocol.

Modelled on Device OS's v3 firmware-update protocol (``communication/src/firmware_update.cpp``):
UpdateStart -> StartReply (window, resume offset); Chunks sent without waiting; ChunkAck (in-order
count + bitmap of out-of-order chunks); UpdateFinish -> FinishReply (statistics) -> FinishAck;
Cancel from either side.

Numbering: chunks are numbered from 1, as in Device OS. Chunk ``n`` covers file bytes
``[(n - 1) * chunk_size, n * chunk_size)``; the in-order count of an ack is then also the number
of the last in-order chunk, and a resume offset is a count of chunks the device already holds.
The ack bitmap describes the chunks after the first missing one: bit ``j`` (word ``j // 32``,
bit ``j % 32``, words u32 little-endian) set means chunk ``in_order + 2 + j`` is held (chunk
``in_order + 1`` is missing by definition, so it needs no bit).

Each message maps onto one CoAP request with a small payload (the session layer does that):
UpdateStart -> POST ``S``; StartReply -> its response; Chunk -> NON POST ``C`` with options
CHUNK_INDEX (2049) and the CRC (a custom option, e.g. 2081) and the chunk data as payload;
ChunkAck -> POST ``A``; UpdateFinish -> POST ``F``; FinishReply -> the device's separate
response; FinishAck -> the CoAP ACK of that response; Cancel -> CANCEL_UPDATE (2073).
``encode()``/``decode()`` give the compact little-endian binary form of each message's fields
(what goes into the payload); ``encode_message``/``decode_message`` add a one-byte kind tag for
transports without CoAP (tests, the emulator). Malformed input raises
:class:`TransferProtocolError` and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeAlias

from otacore._types import Buffer
from otacore.errors import ProtocolError

#: Largest chunk the u16 chunk-size field holds that is a multiple of 4.
MAX_CHUNK_SIZE = 65532
#: Smallest chunk size accepted (Device OS uses 512-1136 over UDP).
MIN_CHUNK_SIZE = 64
#: Largest window in chunks; bounds the ack bitmap to 32 words (128 bytes).
MAX_WINDOW = 1024
#: Longest Cancel reason, in UTF-8 bytes.
MAX_REASON_BYTES = 200
SHA256_SIZE = 32


class TransferProtocolError(ProtocolError):
    """A transfer message is malformed: truncated, oversized or with a field out of range."""


class TransferStatus(IntEnum):
    """Result codes carried by StartReply, FinishReply and Cancel."""

    OK = 0
    REFUSED = 1  # the device layer refused the update (updates disabled, busy, ...)
    TOO_LARGE = 2  # the file does not fit the device's slot
    BAD_PARAMETERS = 3  # chunk size or window outside what the device supports
    BAD_BASE = 4  # the delta's base image is not installed on the device
    UNKNOWN_TRANSFER = 5  # a message names a transfer the peer does not have
    INCOMPLETE = 6  # finish requested before every chunk arrived
    SHA256_MISMATCH = 7  # the assembled file's SHA-256 differs from UpdateStart's
    INVALID_MODULE = 8  # a full image failed module validation (CRC-32, size, header)
    REJECTED = 9  # the device layer's own check refused the file (e.g. a signature)
    CANCELLED = 10  # cancelled on purpose by the sender of the Cancel
    TIMEOUT = 11  # the peer stopped answering
    STORAGE_ERROR = 12  # the device could not read back what it stored


class MessageKind(IntEnum):
    """One-byte tag used by encode_message/decode_message."""

    UPDATE_START = 1
    START_REPLY = 2
    CHUNK = 3
    CHUNK_ACK = 4
    UPDATE_FINISH = 5
    FINISH_REPLY = 6
    FINISH_ACK = 7
    CANCEL = 8


class Message:
    """Base of every transfer message (what the state machines hand out to be sent)."""

    __slots__ = ()
    KIND: ClassVar[MessageKind]
    transfer_id: int

    def encode(self) -> bytes:
        """Binary form of the message's fields (each message kind defines it)."""
        raise NotImplementedError


class Event:
    """Base of every event the state machines report to their owner."""

    __slots__ = ()


def _view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _need(view: memoryview, size: int, what: str, exact: bool = True) -> None:
    n = len(view)
    if n < size or (exact and n != size):
        qualifier = "" if exact else "at least "
        raise TransferProtocolError(f"{what} needs {qualifier}{size} bytes, got {n}")


def _status(value: int, what: str) -> TransferStatus:
    try:
        return TransferStatus(value)
    except ValueError:
        raise TransferProtocolError(f"{what} carries unknown status code {value}") from None


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size % 4 or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise TransferProtocolError(
            f"chunk size {chunk_size} must be a multiple of 4 within "
            f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
        )


# --- server -> device -------------------------------------------------------------------

_START = struct.Struct("<BIIHBBH32s")  # flags, transfer id, size, chunk size, fn, idx, ver, sha
_FLAG_DELTA = 0x01
_FLAG_DISCARD = 0x02
_FLAG_ZSTD = 0x04  # the file is one zstd frame of the image (otacore.zstd_image)


@dataclass(slots=True, frozen=True)
class UpdateStart(Message):
    """Offer a file: its size, chunk size, SHA-256, module identity and full/delta kind."""

    transfer_id: int
    file_size: int
    chunk_size: int
    file_sha256: bytes
    module_function: int = 0
    module_index: int = 0
    module_version: int = 0
    #: SHA-256 of the image a delta applies to; None for a full image.
    base_sha256: bytes | None = None
    #: Ask the device to drop partial data and start from chunk 1 (Device OS DISCARD_DATA).
    discard_partial: bool = False
    #: The file is the image compressed as one zstd frame (never together with a delta,
    #: whose payload is zstd-compressed already).
    compressed: bool = False
    KIND: ClassVar[MessageKind] = MessageKind.UPDATE_START

    def __post_init__(self) -> None:
        if self.compressed and self.base_sha256 is not None:
            raise ValueError("a delta transfer is not also a compressed-image transfer")

    @property
    def is_delta(self) -> bool:
        """True when the file is a delta patch against ``base_sha256``."""
        return self.base_sha256 is not None

    @property
    def chunk_count(self) -> int:
        """Number of chunks the file splits into."""
        return -(-self.file_size // self.chunk_size)

    @property
    def is_image(self) -> bool:
        """True when the file is the module image itself (neither a delta nor compressed)."""
        return self.base_sha256 is None and not self.compressed

    def encode(self) -> bytes:
        """Binary form of the fields (47 bytes, 79 for a delta)."""
        flags = (
            (_FLAG_DELTA if self.base_sha256 is not None else 0)
            | (_FLAG_DISCARD if self.discard_partial else 0)
            | (_FLAG_ZSTD if self.compressed else 0)
        )
        head = _START.pack(
            flags,
            self.transfer_id,
            self.file_size,
            self.chunk_size,
            self.module_function,
            self.module_index,
            self.module_version,
            self.file_sha256,
        )
        return head + self.base_sha256 if self.base_sha256 is not None else head

    @classmethod
    def decode(cls, data: Buffer) -> UpdateStart:
        """Parse the binary form; raise TransferProtocolError when malformed."""
        view = _view(data)
        _need(view, _START.size, "UpdateStart", exact=False)
        flags, tid, size, chunk_size, function, index, version, sha = _START.unpack_from(view)
        if flags & ~(_FLAG_DELTA | _FLAG_DISCARD | _FLAG_ZSTD):
            raise TransferProtocolError(f"UpdateStart has unknown flag bits 0x{flags:02x}")
        if flags & _FLAG_DELTA and flags & _FLAG_ZSTD:
            raise TransferProtocolError("UpdateStart flags both a delta and a compressed image")
        base = None
        if flags & _FLAG_DELTA:
            _need(view, _START.size + SHA256_SIZE, "delta UpdateStart")
            base = bytes(view[_START.size :])
        else:
            _need(view, _START.size, "full-image UpdateStart")
        if size == 0:
            raise TransferProtocolError("UpdateStart announces an empty file")
        _check_chunk_size(chunk_size)
        return cls(
            tid,
            size,
            chunk_size,
            sha,
            function,
            index,
            version,
            base,
            bool(flags & _FLAG_DISCARD),
            bool(flags & _FLAG_ZSTD),
        )


_CHUNK_HEADER = struct.Struct("<III")  # transfer id, chunk number (1-based), CRC-32 of data


@dataclass(slots=True)
class Chunk(Message):
    """One chunk of file data, numbered from 1, with the CRC-32 of its data.

    ``data`` is a zero-copy slice (a memoryview of the file on the sender, of the received
    datagram on the receiver). Not frozen, to keep per-chunk construction cheap: treat as
    read-only.
    """

    transfer_id: int
    index: int
    crc32: int
    data: Buffer
    KIND: ClassVar[MessageKind] = MessageKind.CHUNK

    def header(self) -> bytes:
        """The 12-byte header alone, for scatter-gather sends that keep ``data`` uncopied."""
        return _CHUNK_HEADER.pack(self.transfer_id, self.index, self.crc32)

    def encode(self) -> bytes:
        """Header followed by the data (one copy of the data)."""
        return b"".join((_CHUNK_HEADER.pack(self.transfer_id, self.index, self.crc32), self.data))

    @classmethod
    def decode(cls, data: Buffer) -> Chunk:
        """Parse the binary form; the data stays a memoryview into ``data``."""
        view = _view(data)
        _need(view, _CHUNK_HEADER.size + 1, "Chunk", exact=False)
        tid, index, crc = _CHUNK_HEADER.unpack_from(view)
        if index == 0:
            raise TransferProtocolError("chunk numbers start at 1; got chunk 0")
        payload = view[_CHUNK_HEADER.size :]
        if len(payload) > MAX_CHUNK_SIZE:
            raise TransferProtocolError(
                f"chunk of {len(payload)} bytes exceeds the {MAX_CHUNK_SIZE}-byte maximum"
            )
        return cls(tid, index, crc, payload)


_TID = struct.Struct("<I")


@dataclass(slots=True, frozen=True)
class UpdateFinish(Message):
    """All chunks are acknowledged: validate the file and report statistics."""

    transfer_id: int
    KIND: ClassVar[MessageKind] = MessageKind.UPDATE_FINISH

    def encode(self) -> bytes:
        """Binary form: the transfer id (4 bytes)."""
        return _TID.pack(self.transfer_id)

    @classmethod
    def decode(cls, data: Buffer) -> UpdateFinish:
        """Parse the binary form; raise TransferProtocolError when malformed."""
        view = _view(data)
        _need(view, 4, "UpdateFinish")
        return cls(_TID.unpack_from(view)[0])


@dataclass(slots=True, frozen=True)
class FinishAck(Message):
    """The server received the device's FinishReply; only now may the device apply."""

    transfer_id: int
    KIND: ClassVar[MessageKind] = MessageKind.FINISH_ACK

    def encode(self) -> bytes:
        """Binary form: the transfer id (4 bytes)."""
        return _TID.pack(self.transfer_id)

    @classmethod
    def decode(cls, data: Buffer) -> FinishAck:
        """Parse the binary form; raise TransferProtocolError when malformed."""
        view = _view(data)
        _need(view, 4, "FinishAck")
        return cls(_TID.unpack_from(view)[0])


# --- device -> server -------------------------------------------------------------------

_START_REPLY = struct.Struct("<IBHI")  # transfer id, status, window (chunks), resume offset


@dataclass(slots=True, frozen=True)
class StartReply(Message):
    """The device's answer to UpdateStart: status, window size and resume offset (chunks)."""

    transfer_id: int
    status: TransferStatus
    window: int
    resume_offset: int
    KIND: ClassVar[MessageKind] = MessageKind.START_REPLY

    def encode(self) -> bytes:
        """Binary form (11 bytes)."""
        return _START_REPLY.pack(self.transfer_id, self.status, self.window, self.resume_offset)

    @classmethod
    def decode(cls, data: Buffer) -> StartReply:
        """Parse the binary form; raise TransferProtocolError when malformed."""
        view = _view(data)
        _need(view, _START_REPLY.size, "StartReply")
        tid, status, window, offset = _START_REPLY.unpack_from(view)
        code = _status(status, "StartReply")
        if code is TransferStatus.OK and not 1 <= window <= MAX_WINDOW:
            raise TransferProtocolError(f"window of {window} chunks is outside 1..{MAX_WINDOW}")
        return cls(tid, code, window, offset)


_ACK_HEADER = struct.Struct("<II")  # transfer id, in-order count
_MAX_ACK_WORDS = MAX_WINDOW // 32


@dataclass(slots=True)
class ChunkAck(Message):
    """In-order count plus the out-of-order chunks held after the first gap, as a bitset.

    Not frozen (one per two chunks): treat as read-only.

    ``bitmap`` is a Python int: bit ``j`` means chunk ``in_order + 2 + j`` is held. On the
    wire it is the shortest sequence of u32 little-endian words holding those bits.
    """

    transfer_id: int
    in_order: int
    bitmap: int = 0
    KIND: ClassVar[MessageKind] = MessageKind.CHUNK_ACK

    def encode(self) -> bytes:
        """Binary form: 8-byte header plus 0..32 bitmap words."""
        words = (self.bitmap.bit_length() + 31) >> 5
        # int.to_bytes(..., "little") lays bit 32k+b in byte 4k + b//8: u32 LE words.
        return _ACK_HEADER.pack(self.transfer_id, self.in_order) + self.bitmap.to_bytes(
            words * 4, "little"
        )

    @classmethod
    def decode(cls, data: Buffer) -> ChunkAck:
        """Parse the binary form; raise TransferProtocolError when malformed."""
        view = _view(data)
        _need(view, _ACK_HEADER.size, "ChunkAck", exact=False)
        tid, in_order = _ACK_HEADER.unpack_from(view)
        tail = len(view) - _ACK_HEADER.size
        if tail % 4:
            raise TransferProtocolError(
                f"ChunkAck bitmap of {tail} bytes is not a whole number of u32 words"
            )
        if tail > _MAX_ACK_WORDS * 4:
            raise TransferProtocolError(
                f"ChunkAck bitmap of {tail // 4} words exceeds the {_MAX_ACK_WORDS}-word maximum"
            )
        return cls(tid, in_order, int.from_bytes(view[_ACK_HEADER.size :], "little"))


_STATS = struct.Struct("<IBIIIIIIII")


@dataclass(slots=True, frozen=True)
class ReceiverStats:
    """What the device counted during this transfer session (since its UpdateStart)."""

    resumed_chunks: int = 0  # chunks already held when the session started
    received: int = 0  # distinct chunks accepted in this session
    duplicate: int = 0  # chunks that arrived again after being accepted
    out_of_order: int = 0  # accepted chunks that arrived after a gap
    corrupt: int = 0  # chunks whose CRC-32 or length was wrong (dropped, fetched again)
    dropped: int = 0  # chunks outside the window or the file (dropped)
    acks_sent: int = 0
    processing_ms: int = 0  # from UpdateStart to the validated finish, on the device clock


@dataclass(slots=True, frozen=True)
class FinishReply(Message):
    """The device's verdict on the assembled file, with its statistics."""

    transfer_id: int
    status: TransferStatus
    stats: ReceiverStats
    KIND: ClassVar[MessageKind] = MessageKind.FINISH_REPLY

    def encode(self) -> bytes:
        """Binary form (37 bytes)."""
        s = self.stats
        return _STATS.pack(
            self.transfer_id,
            self.status,
            s.resumed_chunks,
            s.received,
            s.duplicate,
            s.out_of_order,
            s.corrupt,
            s.dropped,
            s.acks_sent,
            min(s.processing_ms, 0xFFFFFFFF),
        )

    @classmethod
    def decode(cls, data: Buffer) -> FinishReply:
        """Parse the binary form; raise TransferProtocolError when malformed."""
        view = _view(data)
        _need(view, _STATS.size, "FinishReply")
        tid, status, *counters = _STATS.unpack_from(view)
        return cls(tid, _status(status, "FinishReply"), ReceiverStats(*counters))


# --- either side --------------------------------------------------------------------------

_CANCEL = struct.Struct("<IB")


@dataclass(slots=True, frozen=True)
class Cancel(Message):
    """Abandon the transfer, with a status code and a short human-readable reason."""

    transfer_id: int
    status: TransferStatus
    reason: str = ""
    KIND: ClassVar[MessageKind] = MessageKind.CANCEL

    def encode(self) -> bytes:
        """Binary form: 5-byte header plus the UTF-8 reason (truncated to 200 bytes)."""
        text = self.reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
        return _CANCEL.pack(self.transfer_id, self.status) + text.encode("utf-8")

    @classmethod
    def decode(cls, data: Buffer) -> Cancel:
        """Parse the binary form; raise TransferProtocolError when malformed."""
        view = _view(data)
        _need(view, _CANCEL.size, "Cancel", exact=False)
        tid, status = _CANCEL.unpack_from(view)
        raw = view[_CANCEL.size :]
        if len(raw) > MAX_REASON_BYTES:
            raise TransferProtocolError(
                f"Cancel reason of {len(raw)} bytes exceeds {MAX_REASON_BYTES} bytes"
            )
        try:
            reason = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise TransferProtocolError("Cancel reason is not valid UTF-8") from None
        return cls(tid, _status(status, "Cancel"), reason)


TransferMessage: TypeAlias = (
    UpdateStart | StartReply | Chunk | ChunkAck | UpdateFinish | FinishReply | FinishAck | Cancel
)

_BY_KIND: dict[int, type[TransferMessage]] = {
    cls.KIND: cls
    for cls in (
        UpdateStart,
        StartReply,
        Chunk,
        ChunkAck,
        UpdateFinish,
        FinishReply,
        FinishAck,
        Cancel,
    )
}


def encode_message(message: Message) -> bytes:
    """One-byte kind tag followed by the message's binary form."""
    return bytes((message.KIND,)) + message.encode()


def decode_message(data: Buffer) -> TransferMessage:
    """Inverse of :func:`encode_message`; raise TransferProtocolError when malformed."""
    view = _view(data)
    if not view:
        raise TransferProtocolError("empty transfer message")
    cls = _BY_KIND.get(view[0])
    if cls is None:
        raise TransferProtocolError(f"unknown transfer message kind {view[0]}")
    return cls.decode(view[1:])


# --- events shared by both sides ----------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SenderStats:
    """What the server counted for one transfer session."""

    chunks_sent: int = 0  # chunk messages handed out, retransmissions included
    chunks_retransmitted: int = 0
    bytes_sent: int = 0  # chunk payload bytes handed out, retransmissions included
    timeouts: int = 0  # retransmission timer expiries (each backs the timer off)
    probes: int = 0  # tail-loss probes sent before a full timeout
    rtt_estimate: float = 0.0  # smoothed ack round-trip time in seconds (0 = no sample)
    bytes_retransmitted: int = 0  # the part of bytes_sent that retransmitted chunks carried


@dataclass(slots=True)
class TransferProgress(Event):
    """Bytes the device has acknowledged so far, of ``total`` (not frozen: read-only)."""

    bytes_acked: int
    total: int


@dataclass(slots=True, frozen=True)
class TransferCompleted(Event):
    """The device validated the file (sender side: and the FinishAck went out)."""

    stats: ReceiverStats
    sender: SenderStats | None = None


@dataclass(slots=True, frozen=True)
class TransferFailed(Event):
    """The transfer ended without success; ``reason`` says why in plain words."""

    reason: str
    status: TransferStatus
