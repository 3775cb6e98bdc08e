"""Firmware transfer protocol throughput: a 128 KB image through sender and receiver.

Run: .venv/bin/python -m pytest bench/test_bench_transfer.py --benchmark-enable
Each round moves one 128 KB user part (256 chunks of 512 B) from a TransferSender to a
TransferReceiver in-process, writing the chunks into a slot and validating the module at the
end; chunks/s = 256 / time per round. Groups: a perfect link (message objects handed over, and
the same through encode/decode), 5% loss in both directions (timers driven on a simulated
clock), and each side alone (the server's cost per chunk is what bounds 10,000 devices).
"""

from __future__ import annotations

import random

import pytest

from otacore.module import build_module
from otacore.transfer import (
    Chunk,
    ChunkAck,
    FinishReply,
    Message,
    PreparedFile,
    ReceiverStats,
    SenderPhase,
    StartReply,
    TransferReceiver,
    TransferSender,
    TransferStatus,
    UpdateFinish,
    WriteChunk,
    decode_message,
    encode_message,
)

IMAGE = build_module(
    random.Random(1).randbytes(128 * 1024 - 68), platform_id=32, function=5, version=7
)
PREPARED = PreparedFile(IMAGE, 512)
CHUNKS = PREPARED.chunk_count
RTT = 0.05


def transfer(loss: float = 0.0, codec: bool = False, seed: int = 0) -> TransferSender:
    """Move IMAGE from a new sender to a new receiver; messages cross in rounds of RTT/2."""
    rng = random.Random(seed)
    slot = bytearray(len(IMAGE))
    view = memoryview(slot)
    receiver = TransferReceiver(read_stored=lambda offset, length: view[offset : offset + length])
    sender = TransferSender(
        PREPARED, 512, 256, 1, module_function=5, module_index=1, module_version=7
    )
    now = 0.0
    to_device = [m for m in sender.start(now) if isinstance(m, Message)]
    to_server: list[Message] = []
    while not sender.finished or to_server:
        now += RTT / 2
        next_server: list[Message] = []
        for message in to_device:
            if loss and rng.random() < loss:
                continue
            if codec:
                message = decode_message(encode_message(message))
            for item in receiver.handle(message, now):
                if isinstance(item, WriteChunk):
                    slot[item.offset : item.offset + len(item.data)] = item.data
                elif isinstance(item, Message):
                    next_server.append(item)
        to_device = []
        for message in to_server:
            if loss and rng.random() < loss:
                continue
            if codec:
                message = decode_message(encode_message(message))
            to_device += [m for m in sender.handle(message, now) if isinstance(m, Message)]
        to_server = next_server
        if not to_device and not to_server:
            # Nothing in flight: jump to the earliest timer of either side.
            deadlines = [d for d in (sender.next_deadline(), receiver.next_deadline()) if d]
            if not deadlines:
                break
            now = max(now, min(deadlines))
        to_device += [m for m in sender.poll(now) if isinstance(m, Message)]
        to_server += [m for m in receiver.poll(now) if isinstance(m, Message)]
    assert sender.phase is SenderPhase.DONE, sender.phase
    return sender


def _check(sender: TransferSender) -> None:
    assert sender.phase is SenderPhase.DONE


@pytest.mark.benchmark(group="transfer-128KB")
def test_perfect_link_objects(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["chunks"] = CHUNKS
    _check(benchmark(transfer))


@pytest.mark.benchmark(group="transfer-128KB")
def test_perfect_link_with_codec(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["chunks"] = CHUNKS
    _check(benchmark(transfer, codec=True))


@pytest.mark.benchmark(group="transfer-128KB")
def test_five_percent_loss_objects(benchmark) -> None:  # type: ignore[no-untyped-def]
    sender = benchmark(transfer, loss=0.05, seed=3)
    stats = sender.stats()
    benchmark.extra_info["chunks"] = CHUNKS
    benchmark.extra_info["chunks_sent"] = stats.chunks_sent
    benchmark.extra_info["retransmitted"] = stats.chunks_retransmitted


@pytest.mark.benchmark(group="transfer-128KB")
def test_five_percent_loss_with_codec(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["chunks"] = CHUNKS
    _check(benchmark(transfer, loss=0.05, codec=True, seed=3))


def sender_alone() -> None:
    """The server's share: start, every chunk out, an ack every two chunks, finish."""
    sender = TransferSender(PREPARED, 512, 256, 1)
    sender.start(0.0)
    sender.handle(StartReply(1, TransferStatus.OK, 256, 0), 0.05)
    for count in range(2, CHUNKS + 1, 2):
        sender.handle(ChunkAck(1, count, 0), 0.1)
    sender.handle(FinishReply(1, TransferStatus.OK, ReceiverStats()), 0.15)
    assert sender.phase is SenderPhase.DONE


_START = TransferSender(
    PREPARED, 512, 256, 1, module_function=5, module_index=1, module_version=7
).start_message
_ALL_CHUNKS = [
    Chunk(1, n, PREPARED.chunk_crcs[n - 1], PREPARED.view[(n - 1) * 512 : n * 512])
    for n in range(1, CHUNKS + 1)
]


def receiver_alone() -> None:
    """The device's share: start, every chunk in (written to a slot), finish with validation."""
    slot = bytearray(len(IMAGE))
    view = memoryview(slot)
    receiver = TransferReceiver(read_stored=lambda offset, length: view[offset : offset + length])
    receiver.handle(_START, 0.0)
    for chunk in _ALL_CHUNKS:
        for item in receiver.handle(chunk, 0.1):
            if isinstance(item, WriteChunk):
                slot[item.offset : item.offset + len(item.data)] = item.data
    out = receiver.handle(UpdateFinish(1), 0.2)
    assert out[-1].status is TransferStatus.OK  # type: ignore[union-attr]


@pytest.mark.benchmark(group="transfer-one-side")
def test_sender_alone(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["chunks"] = CHUNKS
    benchmark(sender_alone)


@pytest.mark.benchmark(group="transfer-one-side")
def test_receiver_alone(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["chunks"] = CHUNKS
    benchmark(receiver_alone)


@pytest.mark.benchmark(group="transfer-one-side")
def test_prepare_file_once_per_release(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(PreparedFile, IMAGE, 512)
