"""Transfer message codec and the receiver's saved state: round trips, layouts, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.errors import ProtocolError, StoreError
from otacore.transfer import (
    Cancel,
    Chunk,
    ChunkAck,
    FinishAck,
    FinishReply,
    Message,
    ReceiverState,
    ReceiverStateError,
    ReceiverStats,
    StartReply,
    TransferProtocolError,
    TransferStatus,
    UpdateFinish,
    UpdateStart,
    decode_message,
    encode_message,
)
from otacore.transfer.messages import MAX_WINDOW, MessageKind

u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
u8 = st.integers(0, 255)
sha = st.binary(min_size=32, max_size=32)
chunk_sizes = st.integers(16, 16383).map(lambda k: k * 4)
statuses = st.sampled_from(list(TransferStatus))

update_starts = st.builds(
    UpdateStart,
    transfer_id=u32,
    file_size=st.integers(1, 2**32 - 1),
    chunk_size=chunk_sizes,
    file_sha256=sha,
    module_function=u8,
    module_index=u8,
    module_version=u16,
    base_sha256=st.none() | sha,
    discard_partial=st.booleans(),
).flatmap(
    # A compressed image is never a delta (the delta payload is zstd already).
    lambda start: st.just(start)
    if start.base_sha256 is not None
    else st.sampled_from([start, dataclasses.replace(start, compressed=True)])
)
chunks = st.builds(
    Chunk,
    transfer_id=u32,
    index=st.integers(1, 2**32 - 1),
    crc32=u32,
    data=st.binary(min_size=1, max_size=2000),
)
acks = st.builds(ChunkAck, transfer_id=u32, in_order=u32, bitmap=st.integers(0, 2**MAX_WINDOW - 1))
start_replies = st.builds(
    StartReply,
    transfer_id=u32,
    status=st.just(TransferStatus.OK),
    window=st.integers(1, MAX_WINDOW),
    resume_offset=u32,
)
finish_replies = st.builds(
    FinishReply,
    transfer_id=u32,
    status=statuses,
    stats=st.builds(ReceiverStats, *([u32] * 8)),
)
cancels = st.builds(Cancel, transfer_id=u32, status=statuses, reason=st.text(max_size=60))
all_messages = st.one_of(
    update_starts,
    chunks,
    acks,
    start_replies,
    finish_replies,
    cancels,
    st.builds(UpdateFinish, u32),
    st.builds(FinishAck, u32),
)


def _same(a: object, b: object) -> bool:
    if isinstance(a, Chunk) and isinstance(b, Chunk):
        return (a.transfer_id, a.index, a.crc32, bytes(a.data)) == (
            b.transfer_id,
            b.index,
            b.crc32,
            bytes(b.data),
        )
    return a == b


@settings(max_examples=300)
@given(all_messages)
def test_every_message_round_trips(message: Message) -> None:
    decoded = decode_message(encode_message(message))
    assert type(decoded) is type(message)
    assert _same(decoded, message)
    assert _same(type(decoded).decode(message.encode()), message)


def test_ack_bitmap_is_u32_little_endian_words() -> None:
    # Bit 0 = chunk in_order + 2, bit 33 = chunk in_order + 35: two words, 1 and 2.
    ack = ChunkAck(9, 5, (1 << 0) | (1 << 33))
    assert ack.encode() == struct.pack("<II", 9, 5) + struct.pack("<II", 1, 2)
    assert ChunkAck(9, 5).encode() == struct.pack("<II", 9, 5)  # no gap, no words


def test_fixed_layouts_are_small() -> None:
    digest = hashlib.sha256(b"x").digest()
    start = UpdateStart(1, 1000, 512, digest, 5, 1, 7)
    assert len(start.encode()) == 47
    assert len(UpdateStart(1, 1000, 512, digest, base_sha256=digest).encode()) == 79
    assert len(StartReply(1, TransferStatus.OK, 256, 0).encode()) == 11
    assert len(FinishReply(1, TransferStatus.OK, ReceiverStats()).encode()) == 37
    chunk = Chunk(3, 1, 0xDEADBEEF, memoryview(b"abcd"))
    assert chunk.encode() == chunk.header() + b"abcd"
    assert chunk.header() == struct.pack("<III", 3, 1, 0xDEADBEEF)


def test_decoded_chunk_data_is_a_zero_copy_view() -> None:
    wire = Chunk(1, 1, 0, b"payload").encode()
    decoded = Chunk.decode(wire)
    assert isinstance(decoded.data, memoryview)
    assert decoded.data.obj is wire


DECODERS: list[Any] = [
    UpdateStart,
    StartReply,
    Chunk,
    ChunkAck,
    UpdateFinish,
    FinishReply,
    FinishAck,
    Cancel,
]


@settings(max_examples=400)
@given(data=st.binary(max_size=120))
def test_random_bytes_raise_only_transfer_protocol_error(data: bytes) -> None:
    for cls in DECODERS:
        with contextlib.suppress(TransferProtocolError):
            cls.decode(data)
    with contextlib.suppress(TransferProtocolError):
        decode_message(data)


@settings(max_examples=300)
@given(message=all_messages, cut=st.integers(0, 200), flip=st.integers(0, 10_000), extra=u8)
def test_mangled_encodings_raise_only_transfer_protocol_error(
    message: Message, cut: int, flip: int, extra: int
) -> None:
    wire = bytearray(encode_message(message))
    variants = [bytes(wire[: min(cut, len(wire))]), bytes(wire) + bytes([extra])]
    wire[flip % len(wire)] ^= extra or 1
    variants.append(bytes(wire))
    for variant in variants:
        with contextlib.suppress(TransferProtocolError):
            decode_message(variant)


def test_protocol_error_is_a_protocol_error() -> None:
    assert issubclass(TransferProtocolError, ProtocolError)


DIGEST = bytes(32)
_START = struct.Struct("<BIIHBBH32s")


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"", "empty"),
        (b"\x63", "unknown transfer message kind 99"),
        (bytes([MessageKind.CHUNK]) + struct.pack("<III", 1, 0, 0) + b"x", "start at 1"),
        (bytes([MessageKind.CHUNK]) + struct.pack("<III", 1, 1, 0), "at least 13 bytes"),
        (bytes([MessageKind.UPDATE_START]) + _START.pack(8, 1, 10, 512, 0, 0, 0, DIGEST), "flag"),
        (
            bytes([MessageKind.UPDATE_START])
            + _START.pack(5, 1, 10, 512, 0, 0, 0, DIGEST)
            + DIGEST,
            "both a delta and a compressed image",
        ),
        (bytes([MessageKind.UPDATE_START]) + _START.pack(0, 1, 0, 512, 0, 0, 0, DIGEST), "empty"),
        (
            bytes([MessageKind.UPDATE_START]) + _START.pack(0, 1, 9, 514, 0, 0, 0, DIGEST),
            "multiple",
        ),
        (bytes([MessageKind.UPDATE_START]) + _START.pack(0, 1, 9, 32, 0, 0, 0, DIGEST), "multiple"),
        (bytes([MessageKind.UPDATE_START]) + _START.pack(1, 1, 9, 512, 0, 0, 0, DIGEST), "delta"),
        (
            bytes([MessageKind.UPDATE_START]) + _START.pack(0, 1, 9, 512, 0, 0, 0, DIGEST) + b"x",
            "full-image UpdateStart needs 47 bytes",
        ),
        (bytes([MessageKind.START_REPLY]) + struct.pack("<IBHI", 1, 0, 0, 0), "window of 0"),
        (bytes([MessageKind.START_REPLY]) + struct.pack("<IBHI", 1, 99, 8, 0), "status code 99"),
        (bytes([MessageKind.CHUNK_ACK]) + struct.pack("<II", 1, 0) + b"abc", "whole number"),
        (bytes([MessageKind.CHUNK_ACK]) + struct.pack("<II", 1, 0) + bytes(132), "33 words"),
        (bytes([MessageKind.CANCEL]) + struct.pack("<IB", 1, 10) + b"\xff\xfe", "UTF-8"),
        (bytes([MessageKind.CANCEL]) + struct.pack("<IB", 1, 10) + b"a" * 201, "201 bytes"),
        (bytes([MessageKind.UPDATE_FINISH]) + b"\0\0\0", "needs 4 bytes"),
        (bytes([MessageKind.FINISH_REPLY]) + bytes(36), "needs 37 bytes"),
    ],
)
def test_malformed_messages_say_what_is_wrong(wire: bytes, match: str) -> None:
    with pytest.raises(TransferProtocolError, match=match):
        decode_message(wire)


def test_cancel_reason_is_truncated_on_a_character_boundary() -> None:
    reason = "é" * 150  # 300 bytes of UTF-8
    decoded = Cancel.decode(Cancel(1, TransferStatus.CANCELLED, reason).encode())
    assert decoded.reason == "é" * 100


# --- receiver state -------------------------------------------------------------------------

states = st.builds(
    lambda size, cs, frac, chain, digest, validated: ReceiverState(
        digest,
        size,
        cs,
        -(-size // cs) if validated else int(frac * -(-size // cs)),
        chain,
        validated,
    ),
    st.integers(1, 2**32 - 1),
    chunk_sizes,
    st.floats(0, 1),
    u32,
    sha,
    st.booleans(),
)


@settings(max_examples=200)
@given(states)
def test_receiver_state_round_trips(state: ReceiverState) -> None:
    record = state.to_bytes()
    assert len(record) == ReceiverState.SIZE == 54
    assert ReceiverState.from_bytes(record) == state


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_random_state_records_raise_only_receiver_state_error(data: bytes) -> None:
    with contextlib.suppress(ReceiverStateError):
        ReceiverState.from_bytes(data)


@settings(max_examples=200)
@given(states, st.integers(0, 53), st.integers(1, 255))
def test_any_flipped_byte_in_a_saved_state_is_refused(
    state: ReceiverState, spot: int, mask: int
) -> None:
    record = bytearray(state.to_bytes())
    record[spot] ^= mask
    with pytest.raises(ReceiverStateError):
        ReceiverState.from_bytes(bytes(record))


def test_state_errors_name_the_problem() -> None:
    record = ReceiverState(DIGEST, 1000, 512, 1, 0).to_bytes()
    assert issubclass(ReceiverStateError, StoreError)
    with pytest.raises(ReceiverStateError, match="torn write"):
        ReceiverState.from_bytes(record[:-1])
    with pytest.raises(ReceiverStateError, match="format version 2"):
        ReceiverState.from_bytes(b"\x02" + record[1:])
    with pytest.raises(ReceiverStateError, match="empty"):
        ReceiverState.from_bytes(b"")
    assert ReceiverState(DIGEST, 1000, 512, 2, 0).prefix_bytes == 1000
    assert ReceiverState(DIGEST, 1000, 512, 1, 0).prefix_bytes == 512
