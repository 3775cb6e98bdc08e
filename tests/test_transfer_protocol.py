"""TransferSender and TransferReceiver rules, driven message by message."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest

from otacore.transfer import (
    Cancel,
    Chunk,
    ChunkAck,
    FinishAck,
    FinishReply,
    PartialDiscarded,
    PreparedFile,
    ReadyToApply,
    ReceiverPhase,
    ReceiverState,
    ReceiverStats,
    RetransmitPolicy,
    SaveState,
    SenderPhase,
    StartReply,
    TransferCompleted,
    TransferFailed,
    TransferProgress,
    TransferReceiver,
    TransferRejectedError,
    TransferSender,
    TransferStarted,
    TransferStatus,
    UpdateFinish,
    UpdateStart,
    WriteChunk,
)
from otacore.transfer.receiver import ReceiverOutput
from otacore.transfer.sender import Output
from tests.test_transfer_sim import Device, make_image

IMAGE = make_image(20 * 512 + 300)  # 21 chunks of 512, the last one 300 bytes
N = 21


T = TypeVar("T")


def of(kind: type[T], outputs: Sequence[object]) -> list[T]:
    """The outputs of one type, in order."""
    return [item for item in outputs if isinstance(item, kind)]


#: The device's whole window at once: for tests of other parts of the exchange.
UNCONGESTED = RetransmitPolicy(congestion_control=False)


def sender(window: int = 8, **options: Any) -> TransferSender:
    return TransferSender(
        IMAGE, 512, window, 77, module_function=5, module_index=1, module_version=7, **options
    )


def started_sender(
    window: int = 8, device_window: int = 8, offset: int = 0, **options: Any
) -> tuple[TransferSender, list[Output]]:
    tx = sender(window, **options)
    tx.start(0.0)
    return tx, tx.handle(StartReply(77, TransferStatus.OK, device_window, offset), 0.1)


# --- sender -----------------------------------------------------------------------------------


def test_update_start_describes_the_file() -> None:
    tx = sender()
    (start,) = tx.start(0.0)
    assert isinstance(start, UpdateStart)
    assert start.file_sha256 == hashlib.sha256(IMAGE).digest()
    assert (start.file_size, start.chunk_size, start.chunk_count) == (len(IMAGE), 512, N)
    assert (start.module_function, start.module_index, start.module_version) == (5, 1, 7)
    assert not start.is_delta
    with pytest.raises(RuntimeError, match="twice"):
        tx.start(0.0)


def test_sender_argument_checks() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        TransferSender(IMAGE, 510, 8, 1)
    with pytest.raises(ValueError, match="window limit"):
        TransferSender(IMAGE, 512, 0, 1)
    with pytest.raises(ValueError, match="cut in 1024-byte chunks"):
        TransferSender(PreparedFile(IMAGE, 1024), 512, 8, 1)
    with pytest.raises(ValueError, match="empty"):
        PreparedFile(b"", 512)


def test_prepared_file_chunks_are_zero_copy_slices_with_their_crc() -> None:
    prepared = PreparedFile(IMAGE, 512)
    tx = TransferSender(prepared, 512, 32, 5, policy=UNCONGESTED)
    tx.start(0.0)
    chunks = of(Chunk, tx.handle(StartReply(5, TransferStatus.OK, 32, 0), 0.1))
    assert [c.index for c in chunks] == list(range(1, N + 1))
    for chunk in chunks:
        assert isinstance(chunk.data, memoryview) and chunk.data.obj is IMAGE
        assert chunk.crc32 == zlib.crc32(chunk.data)
    assert b"".join(bytes(c.data) for c in chunks) == IMAGE


def test_flow_control_keeps_at_most_one_window_in_flight() -> None:
    tx, out = started_sender(window=16, device_window=4)
    assert tx.window == 4
    assert [c.index for c in of(Chunk, out)] == [1, 2, 3, 4]
    assert of(Chunk, tx.handle(ChunkAck(77, 0, 0b11), 0.2)) == []  # 1 missing: window blocked
    out = tx.handle(ChunkAck(77, 1, 0b1), 0.2)  # 1 arrived: 1..3 held, the window slides by 3
    assert [c.index for c in of(Chunk, out)] == [5, 6, 7]
    assert tx.book.base == 3


def test_resume_offset_skips_held_chunks_and_a_complete_file_finishes_at_once() -> None:
    _, out = started_sender(offset=15)
    assert [c.index for c in of(Chunk, out)] == [16, 17, 18, 19, 20, 21]
    tx, out = started_sender(offset=N)
    assert of(UpdateFinish, out) and tx.phase is SenderPhase.FINISHING
    tx, out = started_sender(offset=N + 1)
    assert of(TransferFailed, out)[0].status is TransferStatus.BAD_PARAMETERS


def test_gap_in_the_ack_bitmap_triggers_an_immediate_resend() -> None:
    tx, _ = started_sender()
    out = tx.handle(ChunkAck(77, 0, 0b111), 0.2)  # 2, 3, 4 held, 1 missing
    assert [c.index for c in of(Chunk, out)] == [1]
    assert tx.stats().chunks_retransmitted == 1


def test_probe_then_backed_off_timeouts_then_failure() -> None:
    policy = RetransmitPolicy(initial_rto=1.0, min_rto=0.5, max_rto=4.0, max_rounds=4)
    tx, _ = started_sender(policy=policy)
    out = tx.handle(ChunkAck(77, 2, 0), 0.2)  # an RTT sample of 0.1 s
    assert [c.index for c in of(Chunk, out)] == [9, 10]
    first = tx.next_deadline()
    assert first is not None and first == pytest.approx(0.2 + 2 * 0.1 + 0.2)  # probe timeout
    out = tx.poll(first)
    assert [c.index for c in of(Chunk, out)] == [10]  # tail-loss probe: highest outstanding
    gaps = []
    previous = first
    sends_per_round = []
    while not tx.finished:
        deadline = tx.next_deadline()
        assert deadline is not None
        gaps.append(deadline - previous)
        previous = deadline
        out = tx.poll(deadline)
        sends_per_round.append(len(of(Chunk, out)))
    assert gaps == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0])
    assert sends_per_round == [1, 1, 1, 1, 0]  # one probe chunk per round, not a window
    (failure,) = of(TransferFailed, out)
    assert failure.status is TransferStatus.TIMEOUT and "4 retransmission rounds" in failure.reason
    assert tx.next_deadline() is None and tx.poll(1e9) == []


def test_update_start_is_retransmitted_then_given_up() -> None:
    tx = sender(policy=RetransmitPolicy(initial_rto=1.0, max_rounds=2))
    tx.start(0.0)
    assert tx.poll(0.99) == []
    assert isinstance(tx.poll(1.0)[0], UpdateStart)
    assert isinstance(tx.poll(3.0)[0], UpdateStart)
    (failure,) = tx.poll(7.0)
    assert isinstance(failure, TransferFailed) and "UpdateStart" in failure.reason


def test_rtt_estimate_follows_acks_and_ignores_retransmissions() -> None:
    tx, _ = started_sender(device_window=8)
    assert tx.stats().rtt_estimate == pytest.approx(0.1)  # UpdateStart answered in 0.1 s
    tx.handle(ChunkAck(77, 2, 0), 0.3)  # chunk 2 sent at 0.1, acked at 0.3: RFC 6298 smoothing
    assert tx.stats().rtt_estimate == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)
    tx.handle(ChunkAck(77, 2, 0b111), 0.31)  # bit j = chunk 4 + j: 4, 5, 6 held, 3 lost
    resent = tx.stats().chunks_retransmitted
    assert resent == 1
    srtt = tx.stats().rtt_estimate
    tx.handle(ChunkAck(77, 6, 0), 0.9)  # newly acks only the retransmitted chunk 3: no sample
    assert tx.stats().rtt_estimate == srtt


def test_finish_exchange_and_repeated_finish_reply() -> None:
    tx, _ = started_sender(window=32, device_window=32, policy=UNCONGESTED)
    out = tx.handle(ChunkAck(77, N, 0), 0.3)
    assert of(UpdateFinish, out)
    assert of(TransferProgress, out)[-1] == TransferProgress(len(IMAGE), len(IMAGE))
    stats = ReceiverStats(received=N, acks_sent=11)
    out = tx.handle(FinishReply(77, TransferStatus.OK, stats), 0.4)
    assert of(FinishAck, out) == [FinishAck(77)]
    (done,) = of(TransferCompleted, out)
    assert done.stats == stats and done.sender is not None and done.sender.chunks_sent == N
    assert tx.handle(FinishReply(77, TransferStatus.OK, stats), 5.0) == [FinishAck(77)]


def test_finish_reply_with_an_error_fails_the_transfer() -> None:
    tx, _ = started_sender(window=32, device_window=32, policy=UNCONGESTED)
    tx.handle(ChunkAck(77, N, 0), 0.3)
    out = tx.handle(FinishReply(77, TransferStatus.SHA256_MISMATCH, ReceiverStats()), 0.4)
    assert of(TransferFailed, out)[0].status is TransferStatus.SHA256_MISMATCH
    assert of(FinishAck, out) == []


def test_progress_is_throttled_by_step() -> None:
    tx, _ = started_sender(window=32, device_window=32, progress_step=4096)
    events = []
    for k in range(1, N + 1):
        events += of(TransferProgress, tx.handle(ChunkAck(77, k, 0), 0.2))
    assert [e.bytes_acked for e in events] == [4096, 8192, len(IMAGE)]


def test_cancel_refusal_and_foreign_messages() -> None:
    tx, _ = started_sender()
    assert tx.handle(ChunkAck(78, 5, 0), 0.2) == []  # another transfer's ack
    assert tx.handle(ChunkAck(77, 12, 0), 0.2) == []  # claims chunks never sent: ignored
    out = tx.handle(Cancel(77, TransferStatus.CANCELLED, "battery low"), 0.3)
    assert "battery low" in of(TransferFailed, out)[0].reason
    assert tx.cancel(0.4) == []  # already over
    tx = sender()
    tx.start(0.0)
    out = tx.handle(StartReply(77, TransferStatus.REFUSED, 0, 0), 0.1)
    assert of(TransferFailed, out)[0].status is TransferStatus.REFUSED
    tx, _ = started_sender()
    out = tx.cancel(0.2, "release withdrawn")
    assert out[0] == Cancel(77, TransferStatus.CANCELLED, "release withdrawn")
    assert of(TransferFailed, out)[0].status is TransferStatus.CANCELLED


# --- receiver ---------------------------------------------------------------------------------


def start_msg(tid: int = 77, **changes: Any) -> UpdateStart:
    fields = dict(
        transfer_id=tid,
        file_size=len(IMAGE),
        chunk_size=512,
        file_sha256=hashlib.sha256(IMAGE).digest(),
        module_function=5,
        module_index=1,
        module_version=7,
    )
    fields.update(changes)
    return UpdateStart(**fields)  # type: ignore[arg-type]


def chunk(number: int, tid: int = 77, image: bytes = IMAGE) -> Chunk:
    data = memoryview(image)[(number - 1) * 512 : number * 512]
    return Chunk(tid, number, zlib.crc32(data), data)


def started_device(**options: object) -> tuple[Device, list[ReceiverOutput]]:
    device = Device(len(IMAGE), **options)
    out = device.receiver.handle(start_msg(), 0.0)
    device.apply(out)
    return device, out


def feed(device: Device, numbers: list[int], now: float = 1.0) -> list[ReceiverOutput]:
    outputs: list[ReceiverOutput] = []
    for number in numbers:
        out = device.receiver.handle(chunk(number), now)
        device.apply(out)
        outputs += out
    return outputs


def test_start_reply_announces_window_and_offset() -> None:
    _, out = started_device(window_bytes=4096)
    (reply,) = of(StartReply, out)
    assert reply == StartReply(77, TransferStatus.OK, 8, 0)
    assert of(TransferStarted, out)[0].resume_offset == 0
    assert of(SaveState, out)[0].state == ReceiverState(
        start_msg().file_sha256, len(IMAGE), 512, 0, 0
    )


def test_acks_every_two_chunks_with_the_state_saved_first() -> None:
    device, _ = started_device()
    assert of(ChunkAck, feed(device, [1])) == []
    out = feed(device, [2])
    assert [type(o).__name__ for o in out] == ["WriteChunk", "SaveState", "ChunkAck"]
    assert of(SaveState, out)[0].state == device.receiver.state and out[2] == ChunkAck(77, 2, 0)
    assert device.receiver.state is not None and device.receiver.state.count == 2
    assert ReceiverState.from_bytes(device.saved).count == 2  # type: ignore[arg-type]


def test_a_lone_chunk_is_acked_after_200_ms() -> None:
    device, _ = started_device()
    feed(device, [1], now=1.0)
    rx = device.receiver
    assert rx.next_deadline() == pytest.approx(1.2)
    assert rx.poll(1.19) == []
    out = rx.poll(1.2)
    assert of(ChunkAck, out) == [ChunkAck(77, 1, 0)]


def test_gaps_are_acked_at_once_with_the_bitmap() -> None:
    device, _ = started_device()
    feed(device, [1, 2])
    out = feed(device, [4])  # new gap: chunk 3 missing
    assert of(ChunkAck, out) == [ChunkAck(77, 2, 0b1)]
    assert of(ChunkAck, feed(device, [5])) == []  # continues the run: normal cadence
    out = feed(device, [7])  # another new gap
    assert of(ChunkAck, out) == [ChunkAck(77, 2, 0b1011)]
    out = feed(device, [3])  # fills the gap: in order up to 5
    assert of(ChunkAck, out) == [ChunkAck(77, 5, 0b1)]
    out = feed(device, [3])  # duplicate: counted and acked at once, not written
    assert of(WriteChunk, out) == [] and of(ChunkAck, out) == [ChunkAck(77, 5, 0b1)]


def test_corrupt_out_of_range_and_out_of_window_chunks_are_dropped_and_counted() -> None:
    device, _ = started_device(window_bytes=4 * 512)
    rx = device.receiver
    good = chunk(1)
    bad = Chunk(77, 1, good.crc32, b"\x00" * 512)
    assert rx.handle(bad, 1.0) == []
    assert rx.handle(Chunk(77, 1, good.crc32, bytes(good.data[:100])), 1.0) == []  # too short
    assert rx.handle(Chunk(77, 99, 0, b"x"), 1.0) == []  # past the end of the file
    out = rx.handle(chunk(6), 1.0)  # beyond count + window (0 + 4)
    assert of(WriteChunk, out) == [] and of(ChunkAck, out) == [ChunkAck(77, 0, 0)]
    feed(device, list(range(1, N + 1)), now=2.0)
    out = rx.handle(UpdateFinish(77), 3.0)
    (reply,) = of(FinishReply, out)
    assert reply.status is TransferStatus.OK
    assert (reply.stats.corrupt, reply.stats.dropped, reply.stats.received) == (2, 2, N)
    assert reply.stats.processing_ms == 3000


def test_idle_timeout_after_300_s_keeps_the_partial_download() -> None:
    device, _ = started_device()
    feed(device, [1, 2, 3], now=10.0)
    rx = device.receiver
    assert rx.next_deadline() == pytest.approx(10.2)  # delayed ack for chunk 3 first
    device.apply(rx.poll(10.2))
    assert rx.next_deadline() == pytest.approx(310.0)
    assert rx.poll(309.9) == []
    out = rx.poll(310.0)
    assert of(TransferFailed, out)[0].status is TransferStatus.TIMEOUT
    assert rx.phase is ReceiverPhase.IDLE and rx.next_deadline() is None
    assert rx.state is not None and rx.state.count == 3


def test_apply_only_after_the_finish_ack_and_the_reply_is_repeated() -> None:
    device, _ = started_device(finish_retry=2.0, finish_retries=2)
    feed(device, list(range(1, N + 1)))
    rx = device.receiver
    out = rx.handle(UpdateFinish(77), 2.0)
    device.apply(out)
    assert of(FinishReply, out)[0].status is TransferStatus.OK
    assert rx.state is not None and rx.state.validated and not device.ready
    assert rx.handle(UpdateFinish(77), 2.1) == of(FinishReply, out)  # repeated, same answer
    assert rx.next_deadline() == pytest.approx(4.0)
    assert of(FinishReply, rx.poll(4.0))
    assert rx.next_deadline() == pytest.approx(4.0 + 2.0 * 2**1)
    out = rx.handle(FinishAck(77), 5.0)
    assert of(ReadyToApply, out)[0].stats.received == N
    assert rx.phase is ReceiverPhase.DONE and rx.next_deadline() is None


def test_unconfirmed_finish_gives_up_but_resumes_as_complete() -> None:
    device, _ = started_device(finish_retry=1.0, finish_retries=1)
    feed(device, list(range(1, N + 1)))
    device.apply(device.receiver.handle(UpdateFinish(77), 2.0))
    rx = device.receiver
    assert of(FinishReply, rx.poll(3.0))
    out = rx.poll(5.0)
    assert of(TransferFailed, out)[0].status is TransferStatus.TIMEOUT
    device.reboot()
    out = device.receiver.handle(start_msg(tid=78), 10.0)
    assert of(StartReply, out)[0].resume_offset == N


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"file_sha256": bytes(32)}, TransferStatus.SHA256_MISMATCH),
        ({"module_version": 8}, TransferStatus.INVALID_MODULE),
    ],
)
def test_finish_refuses_a_wrong_file(changes: dict[str, Any], status: TransferStatus) -> None:
    device = Device(len(IMAGE))
    device.apply(device.receiver.handle(start_msg(**changes), 0.0))
    feed(device, list(range(1, N + 1)))
    out = device.receiver.handle(UpdateFinish(77), 2.0)
    device.apply(out)
    assert of(FinishReply, out)[0].status is status
    assert of(TransferFailed, out)[0].status is status
    assert device.saved is None  # wrong bytes are never resumed from


def test_forged_chunk_with_a_valid_crc_is_caught_by_the_file_hash() -> None:
    device, _ = started_device()
    forged = bytearray(IMAGE[512:1024])
    forged[0] ^= 0xFF
    out = device.receiver.handle(Chunk(77, 2, zlib.crc32(forged), bytes(forged)), 1.0)
    device.apply(out)
    feed(device, [1, *range(3, N + 1)])
    out = device.receiver.handle(UpdateFinish(77), 2.0)
    assert of(FinishReply, out)[0].status is TransferStatus.SHA256_MISMATCH


def test_full_image_must_be_a_module_but_a_delta_need_not() -> None:
    blob = bytes(range(256)) * 20
    for base, status in ((None, TransferStatus.INVALID_MODULE), (bytes(32), TransferStatus.OK)):
        device = Device(len(blob))
        start = UpdateStart(5, len(blob), 512, hashlib.sha256(blob).digest(), base_sha256=base)
        device.apply(device.receiver.handle(start, 0.0))
        for number in range(1, start.chunk_count + 1):
            device.apply(device.receiver.handle(chunk(number, tid=5, image=blob), 1.0))
        out = device.receiver.handle(UpdateFinish(5), 2.0)
        assert of(FinishReply, out)[0].status is status


def test_hooks_and_size_limit_refuse_updates() -> None:
    def no_delta(start: UpdateStart) -> None:
        if start.is_delta:
            raise TransferRejectedError("base image not installed", TransferStatus.BAD_BASE)

    def unsigned(start: UpdateStart, image: memoryview) -> None:
        assert bytes(image) == IMAGE
        raise TransferRejectedError("manifest signature does not verify")

    device = Device(len(IMAGE), check_start=no_delta, check_file=unsigned, max_file_size=20_000)
    out = device.receiver.handle(start_msg(base_sha256=bytes(32)), 0.0)
    assert of(StartReply, out) == [StartReply(77, TransferStatus.BAD_BASE, 0, 0)]
    out = device.receiver.handle(start_msg(file_size=30_000), 0.0)
    assert of(StartReply, out)[0].status is TransferStatus.TOO_LARGE
    device.apply(device.receiver.handle(start_msg(), 0.0))
    feed(device, list(range(1, N + 1)))
    out = device.receiver.handle(UpdateFinish(77), 2.0)
    assert of(FinishReply, out)[0].status is TransferStatus.REJECTED
    assert "signature" in of(TransferFailed, out)[0].reason


def test_finish_before_every_chunk_is_incomplete_and_keeps_the_state() -> None:
    device, _ = started_device()
    feed(device, [1, 2, 3, 4])
    out = device.receiver.handle(UpdateFinish(77), 2.0)
    device.apply(out)
    assert of(FinishReply, out)[0].status is TransferStatus.INCOMPLETE
    assert device.receiver.state is not None and device.receiver.state.count == 4


def test_storage_errors_are_reported() -> None:
    def broken(offset: int, length: int) -> bytes:
        raise OSError("flash read failed")

    rx = TransferReceiver(read_stored=broken)
    rx.handle(start_msg(), 0.0)
    for number in range(1, N + 1):
        rx.handle(chunk(number), 1.0)
    out = rx.handle(UpdateFinish(77), 2.0)
    assert of(FinishReply, out)[0].status is TransferStatus.STORAGE_ERROR
    rx = TransferReceiver(
        ReceiverState(start_msg().file_sha256, len(IMAGE), 512, 3, 123), read_stored=broken
    )
    out = rx.handle(start_msg(), 0.0)
    assert "flash read failed" in of(PartialDiscarded, out)[0].reason
    assert of(StartReply, out)[0].resume_offset == 0


def test_resume_after_reboot_checks_the_stored_prefix() -> None:
    device, _ = started_device()
    feed(device, list(range(1, 11)))
    device.reboot()
    out = device.receiver.handle(start_msg(tid=78), 5.0)
    assert of(StartReply, out)[0].resume_offset == 10
    device.apply(out)
    device.slot[700] ^= 0x55  # a storage fault inside the held prefix
    device.reboot()
    out = device.receiver.handle(start_msg(tid=79), 6.0)
    assert "no longer matches" in of(PartialDiscarded, out)[0].reason
    assert of(StartReply, out)[0].resume_offset == 0


def test_other_file_or_discard_flag_restart_from_zero() -> None:
    device, _ = started_device()
    feed(device, list(range(1, 11)))
    out = device.receiver.handle(start_msg(tid=78, discard_partial=True), 5.0)
    assert of(StartReply, out)[0].resume_offset == 0 and of(PartialDiscarded, out)
    device.apply(out)
    feed_out = device.receiver.handle(chunk(1, tid=78), 5.1)
    device.apply(feed_out)
    device.apply(device.receiver.poll(6.0))
    out = device.receiver.handle(start_msg(tid=79, file_sha256=bytes(32)), 7.0)
    assert "different file" in of(PartialDiscarded, out)[0].reason


def test_repeated_start_gets_the_same_reply_and_strays_get_one_cancel() -> None:
    device, first = started_device()
    rx = device.receiver
    assert rx.handle(start_msg(), 0.5) == of(StartReply, first)
    assert rx.transfer_id == 77
    (cancel,) = of(Cancel, rx.handle(chunk(1, tid=12), 1.0))
    assert (cancel.transfer_id, cancel.status) == (12, TransferStatus.UNKNOWN_TRANSFER)
    assert "UpdateStart" in cancel.reason
    assert rx.handle(chunk(2, tid=12), 1.5) == []  # at most one per second per transfer
    assert len(rx.handle(chunk(3, tid=12), 2.1)) == 1
    assert of(Cancel, rx.handle(UpdateFinish(13), 2.2))


def test_cancel_from_either_side_keeps_the_partial_download() -> None:
    device, _ = started_device()
    feed(device, [1, 2, 3])
    out = device.receiver.handle(Cancel(77, TransferStatus.CANCELLED, "release withdrawn"), 2.0)
    device.apply(out)
    assert "release withdrawn" in of(TransferFailed, out)[0].reason
    assert device.receiver.phase is ReceiverPhase.IDLE and device.receiver.transfer_id is None
    assert ReceiverState.from_bytes(device.saved).count == 3  # type: ignore[arg-type]
    device.apply(device.receiver.handle(start_msg(tid=78), 3.0))
    out = device.receiver.cancel(4.0, "user disabled updates")
    assert out[-2] == Cancel(78, TransferStatus.CANCELLED, "user disabled updates")
    assert device.receiver.cancel(5.0) == []


def test_a_reused_transfer_id_with_other_parameters_is_a_new_transfer() -> None:
    device, _ = started_device()
    feed(device, [1, 2, 3, 4])
    out = device.receiver.handle(start_msg(chunk_size=1024), 2.0)
    (reply,) = of(StartReply, out)
    assert reply.resume_offset == 2  # 4 chunks of 512 bytes = 2 chunks of 1024 bytes
    assert of(TransferStarted, out)[0].start.chunk_size == 1024


def test_congestion_window_slow_start_halving_and_timeout() -> None:
    """RFC 5681 in chunks: 10 chunks first (RFC 6928), one more per chunk acknowledged,
    halved once per window of data on a loss (RFC 6582), one chunk after a timeout."""
    policy = RetransmitPolicy(initial_rto=1.0, min_rto=0.5, max_rounds=8)
    tx, out = started_sender(window=64, device_window=64, policy=policy)
    assert [c.index for c in of(Chunk, out)] == list(range(1, 11))
    out = tx.handle(ChunkAck(77, 2, 0), 0.2)  # 2 acked: cwnd 12, 8 in flight -> 4 new
    assert tx.cwnd == 12 and [c.index for c in of(Chunk, out)] == [11, 12, 13, 14]
    # Chunk 3 is missing while 4..14 arrive: the window grows by the 11 acknowledged
    # (to 23), then the hole is a loss (three later sends delivered): re-sent at once, and
    # the window halves.
    out = tx.handle(ChunkAck(77, 2, (1 << 11) - 1), 0.35)
    assert of(Chunk, out)[0].index == 3
    assert tx.cwnd == 11.5
    halved = tx.cwnd
    # More losses in the same window (15 and 16, with 17..19 delivered): no second cut,
    # and no growth until the window that saw the loss is acknowledged (RFC 6582).
    tx.handle(ChunkAck(77, 2, ((1 << 11) - 1) | (0b1110 << 12)), 0.36)
    assert tx.cwnd == halved
    # Nothing acknowledged any more: the probe re-sends one chunk, then the timer expires:
    # the window restarts at 1 and one chunk goes out, the lowest outstanding.
    sent_after_timeout: list[int] = []
    while tx.cwnd != 1.0:
        deadline = tx.next_deadline()
        assert deadline is not None
        sent = [c.index for c in of(Chunk, tx.poll(deadline))]
        assert len(sent) == 1  # a probe or a timeout: one chunk, never a burst
        sent_after_timeout = sent
    assert sent_after_timeout == [3]
    # Its ack reopens the window by one (slow start); the rest of the old flight still
    # counts as in flight (not acknowledged, not judged lost), so nothing more goes out:
    # no burst after a timeout (RFC 6298 section 5.4 re-sends the earliest chunk only).
    out = tx.handle(ChunkAck(77, 3, ((1 << 10) - 1) | (0b1110 << 11)), deadline + 0.1)
    assert tx.cwnd == 2.0 and of(Chunk, out) == []
