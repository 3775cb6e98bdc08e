"""A FinishAck that comes after the device stopped waiting for it still applies the file.

Found under overload (3,000 devices, 2 nodes on PostgreSQL): the server writes a transfer's
completion durably before its FinishAck leaves (server.devices.transfer_run), and that write
took more than the device's FinishReply retries (62 s with Device OS-like settings). The
receiver gave up ("resumes as complete") and ignored the FinishAck when it came, while the
server counted the image as staged: 1,351 devices stayed on v1 until their next session.

Now the transfer *lapses*: a FinishAck of exactly that transfer, later in the session, applies
the file (validated again first); anything else (another transfer's FinishAck, one after a new
UpdateStart, a Cancel or the device's own cancel) stays stale. Sans-IO: the receiver and the
sender, message by message, no sockets (the end-to-end case is in
test_late_finish_ack_e2e.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.transfer import (
    Cancel,
    FinishAck,
    FinishReply,
    Message,
    ReadyToApply,
    ReceiverPhase,
    ReceiverStats,
    SaveState,
    StartReply,
    TransferCompleted,
    TransferFailed,
    TransferSender,
    TransferStatus,
    UpdateFinish,
)
from otacore.transfer.late_finish import answer_late_finish_reply
from tests.test_transfer_protocol import IMAGE, N, chunk, feed, of, start_msg, started_device
from tests.test_transfer_sim import Device

#: The device's FinishReply budget in these tests: at 3, 4 (1 + 1 * 2) and 6 (4 + 1 * 4) s
#: after the first reply at 2 s; it gives up at the deadline after the last retry (10 s),
#: then asks again 60 s later, and every 120, 240, 300, 300 ... s.
RETRY = {"finish_retry": 1.0, "finish_retries": 2, "finish_reask": 60.0,
         "finish_reask_max": 300.0}


def validated_device() -> Device:
    """A device that holds the whole file, validated, and waits for FinishAck(77)."""
    device, _ = started_device(**RETRY)
    feed(device, list(range(1, N + 1)))
    out = device.receiver.handle(UpdateFinish(77), 2.0)
    device.apply(out)
    assert of(FinishReply, out)[0].status is TransferStatus.OK
    assert device.receiver.phase is ReceiverPhase.VALIDATED
    return device


def give_up(device: Device) -> float:
    """Run the receiver's timers until it stops waiting for the FinishAck; the time then."""
    rx = device.receiver
    now = 2.0
    while rx.phase is ReceiverPhase.VALIDATED:
        deadline = rx.next_deadline()
        assert deadline is not None
        now = deadline
        device.apply(rx.poll(now))
    assert rx.phase is ReceiverPhase.IDLE
    (failure,) = device.failures
    assert failure.status is TransferStatus.TIMEOUT and "never confirmed" in failure.reason
    return now


def test_a_late_finish_ack_applies_the_validated_file() -> None:
    device = validated_device()
    now = give_up(device)
    rx = device.receiver
    assert rx.lapsed_transfer_id == 77 and rx.transfer_id is None
    assert rx.state is not None and rx.state.validated  # it still resumes as complete
    assert rx.next_deadline() == now + 60.0  # it only asks again, slowly
    out = rx.handle(FinishAck(77), now + 30.0)
    device.apply(out)
    (ready,) = device.ready
    assert ready.start.transfer_id == 77 and ready.stats.received == N
    assert rx.phase is ReceiverPhase.DONE and rx.lapsed_transfer_id is None
    # Applied once: a duplicate of the late FinishAck does nothing.
    assert rx.handle(FinishAck(77), now + 61.0) == []


def test_an_ack_in_time_is_unchanged() -> None:
    device = validated_device()
    assert device.receiver.lapsed_transfer_id is None
    device.apply(device.receiver.handle(FinishAck(77), 2.5))
    assert len(device.ready) == 1 and device.failures == []


def test_another_transfers_finish_ack_is_ignored() -> None:
    device = validated_device()
    assert device.receiver.handle(FinishAck(78), 2.5) == []  # while waiting
    now = give_up(device)
    assert device.receiver.handle(FinishAck(78), now + 1.0) == []  # and once lapsed
    assert device.ready == [] and device.receiver.lapsed_transfer_id == 77


def test_a_finish_ack_after_a_new_update_start_is_stale() -> None:
    device = validated_device()
    now = give_up(device)
    rx = device.receiver
    out = rx.handle(start_msg(tid=78), now + 1.0)
    device.apply(out)
    assert of(StartReply, out)[0].resume_offset == N  # resumes as complete, no download
    assert rx.lapsed_transfer_id is None
    assert rx.handle(FinishAck(77), now + 2.0) == []
    assert device.ready == []
    # The new transfer finishes as usual.
    device.apply(rx.handle(UpdateFinish(78), now + 3.0))
    device.apply(rx.handle(FinishAck(78), now + 4.0))
    assert [r.start.transfer_id for r in device.ready] == [78]


def test_a_refused_new_start_also_ends_the_lapse() -> None:
    device = validated_device()
    now = give_up(device)
    out = device.receiver.handle(start_msg(tid=78, file_size=10**9), now + 1.0)
    assert of(StartReply, out)[0].status is TransferStatus.TOO_LARGE
    assert device.receiver.handle(FinishAck(77), now + 2.0) == []


def test_a_finish_ack_after_a_cancel_is_stale() -> None:
    device = validated_device()
    now = give_up(device)
    rx = device.receiver
    assert rx.handle(Cancel(78, TransferStatus.CANCELLED, ""), now + 1.0) == []
    assert rx.lapsed_transfer_id == 77  # another transfer's Cancel changes nothing
    assert rx.handle(Cancel(77, TransferStatus.CANCELLED, "superseded"), now + 1.0) == []
    assert rx.lapsed_transfer_id is None
    assert rx.handle(FinishAck(77), now + 2.0) == []
    assert device.ready == []


def test_a_finish_ack_after_the_device_cancelled_is_stale() -> None:
    device = validated_device()
    now = give_up(device)
    rx = device.receiver
    assert rx.cancel(now + 1.0, "the link was lost") == []  # nothing active to tell
    assert rx.handle(FinishAck(77), now + 2.0) == []
    assert device.ready == []


def test_a_late_ack_validates_again_and_never_applies_other_bytes() -> None:
    device = validated_device()
    now = give_up(device)
    device.slot[100] ^= 0xFF  # the slot changed after the validation
    out = device.receiver.handle(FinishAck(77), now + 1.0)
    device.apply(out)
    assert device.ready == []
    assert of(SaveState, out) == [SaveState(None)]  # never resumed from these bytes
    assert of(TransferFailed, out)[0].status is TransferStatus.SHA256_MISMATCH
    assert device.receiver.handle(FinishAck(77), now + 2.0) == []


def test_an_update_finish_after_the_lapse_is_answered_not_cancelled() -> None:
    """The server never heard the FinishReply and asks again after the device stopped
    waiting: an UNKNOWN_TRANSFER Cancel would fail an update whose file is validated."""
    device = validated_device()
    now = give_up(device)
    rx = device.receiver
    out = rx.handle(UpdateFinish(77), now + 10.0)
    (reply,) = out
    assert isinstance(reply, FinishReply) and reply.status is TransferStatus.OK
    assert rx.next_deadline() == now + 60.0  # answered; its slow cadence is unchanged
    device.apply(rx.handle(FinishAck(77), now + 11.0))
    assert len(device.ready) == 1


def test_sender_and_receiver_with_a_slow_completion_write() -> None:
    """The whole exchange, both state machines: the server holds its FinishAck back (its
    completion write) past the device's FinishReply budget, then sends it."""
    sender = TransferSender(IMAGE, 512, 8, 77, module_function=5, module_index=1,
                            module_version=7)
    device = Device(len(IMAGE), **RETRY)
    rx = device.receiver
    to_device: list[Message] = [m for m in sender.start(0.0) if isinstance(m, Message)]
    held: list[Message] = []
    now = 0.0
    for _ in range(1000):
        if not to_device:
            break
        now += 0.01
        message = to_device.pop(0)
        for reply in device.apply(rx.handle(message, now)):
            answer = sender.handle(reply, now)
            if any(isinstance(item, TransferCompleted) for item in answer):
                held += [m for m in answer if isinstance(m, FinishAck)]  # the slow write
            else:
                to_device += [m for m in answer if isinstance(m, Message)]
    assert held == [FinishAck(77)] and device.ready == []
    # Meanwhile the device repeats its FinishReply, then stops waiting (in the server those
    # repeats wait behind the write too, and are dropped once it sent its FinishAck).
    give_up(device)
    # The write is done; the FinishAck leaves, late.
    device.apply(rx.handle(held[0], now + 120.0))
    (ready,) = device.ready
    assert bytes(device.slot[: len(IMAGE)]) == IMAGE and ready.start.transfer_id == 77


# --- any order of what may follow the FinishReply ------------------------------------------

#: What may reach a validated receiver: the server's messages for this (77) or another (78)
#: transfer, time passing, the device's own cancel.
STEPS = st.sampled_from([
    "ack77", "ack78", "finish77", "cancel77", "cancel78", "start78", "wait", "device_cancel",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(STEPS, max_size=12))
def test_only_the_validated_transfers_own_ack_applies_it(steps: Sequence[str]) -> None:
    """Model: the file of transfer 77 is applied exactly when FinishAck(77) arrives while
    transfer 77 is still the device's (waiting, or lapsed after giving up) and neither a
    new UpdateStart, a Cancel of it nor the device's cancel came first; never twice, and
    never anything but transfer 77's validated file."""
    device = validated_device()
    rx = device.receiver
    now = 2.0
    alive = True  # transfer 77 may still be applied
    applied = False
    for step in steps:
        now += 1.0
        out: list[object] = []
        if step == "ack77":
            out = list(rx.handle(FinishAck(77), now))
            if alive and not applied:
                applied = True
                assert [r.start.transfer_id for r in of(ReadyToApply, out)] == [77]
            else:
                assert of(ReadyToApply, out) == []
        elif step == "ack78":
            out = list(rx.handle(FinishAck(78), now))
        elif step == "finish77":
            out = list(rx.handle(UpdateFinish(77), now))
            if alive and not applied:
                assert [m.status for m in of(FinishReply, out)] == [TransferStatus.OK]
        elif step in ("cancel77", "cancel78"):
            tid = 77 if step == "cancel77" else 78
            out = list(rx.handle(Cancel(tid, TransferStatus.CANCELLED, ""), now))
            alive = alive and tid != 77
        elif step == "start78":
            out = list(rx.handle(start_msg(tid=78), now))
            alive = False
        elif step == "wait":
            now += 400.0  # past any FinishReply deadline: at most one expires per poll
            out = list(rx.poll(now))
            # It asks again (repeats, then slow re-asks) only for a transfer still its own.
            assert of(FinishReply, out) == [] or (alive and not applied)
        elif step == "device_cancel":
            out = list(rx.cancel(now))
            alive = False
        device.apply(out)
        assert of(ReadyToApply, out) == [] or step == "ack77"
    assert len(device.ready) == (1 if applied else 0)
    for ready in device.ready:
        assert ready.start == start_msg() and bytes(device.slot[: len(IMAGE)]) == IMAGE
    if applied:
        assert rx.lapsed_transfer_id is None


def test_a_chunk_of_the_lapsed_transfer_is_not_answered_as_known() -> None:
    """A stray chunk of the lapsed transfer gets the usual Cancel (the sender, DONE, ignores
    it) and does not end the lapse."""
    device = validated_device()
    now = give_up(device)
    out = device.receiver.handle(chunk(3), now + 1.0)
    assert [m.status for m in of(Cancel, out)] == [TransferStatus.UNKNOWN_TRANSFER]
    device.apply(device.receiver.handle(FinishAck(77), now + 2.0))
    assert len(device.ready) == 1


def test_update_start_of_the_lapsed_transfer_itself_is_a_new_start() -> None:
    """The same UpdateStart again (the server offered anew with the same id) resumes at the
    end, as any start of the validated file does."""
    device = validated_device()
    now = give_up(device)
    out = device.receiver.handle(start_msg(tid=77), now + 1.0)
    assert of(StartReply, out)[0].resume_offset == N
    assert device.receiver.lapsed_transfer_id is None


# --- the lapsed transfer asks again, slowly -------------------------------------------------


def reasks(device: Device, since: float, until: float) -> list[float]:
    """Run the receiver's timers from ``since`` to ``until``: when it sent a FinishReply."""
    rx = device.receiver
    times = []
    while (deadline := rx.next_deadline()) is not None and deadline <= until:
        assert deadline > since
        since = deadline
        for message in device.apply(rx.poll(deadline)):
            assert message == FinishReply(77, TransferStatus.OK, message.stats)
            times.append(deadline)
    return times


def test_a_lapsed_transfer_asks_again_at_a_doubling_bounded_interval() -> None:
    """A FinishAck lost after the repeats (one NON datagram over DTLS) must not leave the
    device on its old firmware for the rest of the session: once lapsed it sends its
    FinishReply again 60 s later, then every 120, 240, then 300 s at most."""
    device = validated_device()
    lapsed_at = give_up(device)
    times = reasks(device, lapsed_at, lapsed_at + 3000.0)
    gaps = [round(b - a, 6) for a, b in zip([lapsed_at, *times], times, strict=False)]
    assert gaps[:4] == [60.0, 120.0, 240.0, 300.0] and set(gaps[3:]) == {300.0}
    assert len(times) == 11  # 60 + 120 + 240 + 8 * 300 <= 3000 < 60 + 120 + 240 + 9 * 300
    # The FinishAck answering the third re-ask applies the file.
    device.apply(device.receiver.handle(FinishAck(77), times[2] + 0.1))
    assert len(device.ready) == 1 and device.receiver.next_deadline() is None


def test_the_reasks_stop_when_the_lapse_ends() -> None:
    """The re-asks belong to the lapse: a Cancel of that transfer (the server's answer when
    it knows no completion of it), the device's own cancel or a new UpdateStart ends them."""
    for end in ("cancel", "device_cancel", "start"):
        device = validated_device()
        now = give_up(device)
        rx = device.receiver
        assert reasks(device, now, now + 100.0) == [now + 60.0]
        now += 100.0
        if end == "cancel":
            out = rx.handle(Cancel(77, TransferStatus.UNKNOWN_TRANSFER, "not completed"), now)
        elif end == "device_cancel":
            out = rx.cancel(now)
        else:
            out = rx.handle(start_msg(tid=78), now)
        assert of(FinishReply, device.apply(out)) == [], end
        assert rx.lapsed_transfer_id is None
        if end != "start":
            assert rx.next_deadline() is None, end
        assert of(FinishReply, rx.poll(now + 10_000.0)) == [], end
        assert device.ready == []


def test_every_finish_ack_of_the_repeats_lost_then_a_reask_is_confirmed() -> None:
    """Both state machines: the server's FinishAck and its answers to every repeat are lost
    (the device gives up); the device's first re-ask reaches the sender, DONE, whose
    FinishAck applies the file."""
    sender = TransferSender(IMAGE, 512, 8, 77, module_function=5, module_index=1,
                            module_version=7)
    device = Device(len(IMAGE), **RETRY)
    rx = device.receiver
    to_device: list[Message] = [m for m in sender.start(0.0) if isinstance(m, Message)]
    lost: list[Message] = []
    now = 0.0
    while to_device or rx.phase is ReceiverPhase.VALIDATED:
        if to_device:
            now += 0.01
            replies = device.apply(rx.handle(to_device.pop(0), now))
        else:
            deadline = rx.next_deadline()
            assert deadline is not None
            now = deadline
            replies = device.apply(rx.poll(now))
        for reply in replies:
            for item in sender.handle(reply, now):
                if isinstance(item, FinishAck):
                    lost.append(item)  # every FinishAck is lost while the device waits
                elif isinstance(item, Message):
                    to_device.append(item)
    assert lost == [FinishAck(77)] * 3 and device.ready == []  # the first and 2 repeats
    assert rx.lapsed_transfer_id == 77
    (reask,) = device.apply(rx.poll(now + 60.0))
    (answer,) = [m for m in sender.handle(reask, now + 60.0) if isinstance(m, Message)]
    device.apply(rx.handle(answer, now + 60.1))
    (ready,) = device.ready
    assert bytes(device.slot[: len(IMAGE)]) == IMAGE and ready.start.transfer_id == 77


# --- the server's answer once its transfer is over (otacore.transfer.late_finish) ----------


def test_the_server_confirms_only_its_recorded_completion() -> None:
    ok = FinishReply(77, TransferStatus.OK, ReceiverStats(0, N, 0, 0, 0, 0, 1, 5))
    assert answer_late_finish_reply(ok, 77) == FinishAck(77)
    for confirmed in (None, 78):  # none recorded since the last offer, or another one
        answer = answer_late_finish_reply(ok, confirmed)
        assert isinstance(answer, Cancel) and answer.transfer_id == 77
        assert answer.status is TransferStatus.UNKNOWN_TRANSFER and "offers again" in answer.reason
    refused = FinishReply(77, TransferStatus.SHA256_MISMATCH, ok.stats)
    assert answer_late_finish_reply(refused, 77) is None
    assert answer_late_finish_reply(refused, None) is None


def test_a_reask_answered_from_the_servers_memory_applies_or_ends_the_lapse() -> None:
    """The device's re-ask reaches a session whose transfer is over: confirmed, it applies
    the file; unknown as completed, the Cancel ends the lapse (no more asks) and the next
    offer resumes the validated file as complete."""
    for confirmed in (77, None):
        device = validated_device()
        now = give_up(device)
        rx = device.receiver
        (reask,) = device.apply(rx.poll(now + 60.0))
        assert isinstance(reask, FinishReply)
        answer = answer_late_finish_reply(reask, confirmed)
        assert answer is not None
        device.apply(rx.handle(answer, now + 60.1))
        if confirmed == 77:
            assert [r.start.transfer_id for r in device.ready] == [77]
            continue
        assert device.ready == [] and rx.lapsed_transfer_id is None
        assert rx.next_deadline() is None  # it stops asking
        out = rx.handle(start_msg(tid=78), now + 100.0)
        assert of(StartReply, out)[0].resume_offset == N
