"""End to end: a completion write slower than the device's patience still updates it, in the
same session, without a second download.

The server writes a transfer's completion durably before its FinishAck leaves
(server.devices.transfer_run). Under overload (3,000 devices, 2 nodes on PostgreSQL) that
write took more than the device's FinishReply retries; the device gave up, ignored the late
FinishAck, and 1,351 devices stayed on v1 until their next session while the server waited
for them to reboot into v2.

Here the write is made genuinely slow with a real SQLite file: another connection holds the
database's write lock (``BEGIN IMMEDIATE``) from the middle of the download until the device
has given up waiting (a small FinishReply budget), then lets go. The server's completion
write then goes through, its FinishAck arrives late, and the device must still apply v2.
Over DTLS every FinishAck is one NON datagram: with every copy the transfer sent lost, the
device's slow re-asks, answered by the server from memory once the transfer is over, still
update it in that session.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from otacore.coap import decode_udp
from otacore.device.emulated import EmulatedDevice
from otacore.protocol.link import Transport
from otacore.protocol.ota_wire import is_transfer, parse_transfer
from otacore.transfer import FinishAck, FinishReply
from server.store.store import DB_FILENAME
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    WatchedFlash,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    running,
    updated_to,
)

CHUNK = 1024
WINDOW = 4
#: The FinishReplies the device sends before it stops waiting: the first and finish_retries
#: (2 here) repeats. The server answers each with at most one FinishAck.
REPLIES = 3
SMALL_WINDOWS = {
    "tcp_chunk_size": CHUNK,
    "udp_chunk_size": CHUNK,
    "window_limit": WINDOW,
    "progress_step": 4096,
}


def drop_finish_acks(device: EmulatedDevice, count: int) -> list[FinishAck]:
    """Lose the first ``count`` FinishAcks on their way to a UDP device; returns those lost."""
    hear = device.receive
    lost: list[FinishAck] = []

    def receive(data: bytes, now: float) -> None:
        if len(lost) < count and is_transfer(message := decode_udp(data)):
            transfer = parse_transfer(message)
            if isinstance(transfer, FinishAck):
                lost.append(transfer)
                return
        hear(data, now)

    device.receive = receive  # type: ignore[method-assign]
    return lost


def drop_reasks_while(device: EmulatedDevice, replies: int,
                      transfer_runs: Callable[[], bool]) -> list[float]:
    """Lose the device's FinishReplies after its first ``replies`` (its re-asks once lapsed)
    while ``transfer_runs()``: a re-ask that gets through reaches a server whose transfer
    is over. Returns when each re-ask that got through was sent."""
    take = device.take_outgoing
    seen = 0
    passed: list[float] = []

    def take_outgoing() -> list[bytes]:
        nonlocal seen
        out = []
        for data in take():
            message = decode_udp(data)
            if is_transfer(message) and isinstance(parse_transfer(message), FinishReply):
                seen += 1
                if seen > replies:
                    if transfer_runs():
                        continue
                    passed.append(trio.current_time())
            out.append(data)
        return out

    device.take_outgoing = take_outgoing  # type: ignore[method-assign]
    return passed


async def update_with_a_slow_completion_write(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport, *, lost_acks: int = 0
) -> None:
    """Release v2 to one device; hold the store's write lock from halfway through the
    download until the device has stopped waiting for its FinishAck, then let go; the
    device must end on v2 in the same session, downloaded once. The first ``lost_acks``
    FinishAcks are lost on the way (UDP); REPLIES of them are every copy the transfer can
    send, and then only a re-ask answered after the transfer may update the device."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(**SMALL_WINDOWS)
        database = rig.kit.data_dir / DB_FILENAME
        v2 = app(2, size=48_000)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, transport)], ota_chunk_size=CHUNK)
        lock: list[sqlite3.Connection] = []

        def hold_write_lock(_: int) -> None:
            # Taken in the device's flash write, so before the server can have finished
            # the transfer (it is halfway). Blocks the event loop only while a server write
            # under way (in a worker thread) commits.
            conn = sqlite3.connect(database, timeout=STEP, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            lock.append(conn)

        watched = WatchedFlash.install(
            fleet, device_id, marks=[len(v2) // 2], on_mark=hold_write_lock
        )
        device = fleet.device(device_id).device
        # A FinishReply budget of 0.2 + 0.4 + 0.8 s, well below the server's 30 s busy
        # timeout: the write waits out the lock and succeeds, late. (Its slow re-asks, 64 s
        # after giving up, never come here unless every FinishAck is lost.)
        device.config = replace(device.config, finish_retry=0.2, finish_retries=2)
        lost = drop_finish_acks(device, lost_acks)
        reasks: list[float] = []
        if lost_acks >= REPLIES:
            # Once lapsed, it asks again 0.3 s later, then every 0.6 s.
            device.config = replace(device.config, finish_reask=0.3, finish_reask_max=0.6)

            def transfer_runs() -> bool:
                updater = rig.engine.updaters.get(device_id)
                return updater is not None and updater.transfer is not None

            reasks = drop_reasks_while(device, REPLIES, transfer_runs)
        try:
            async with running(fleet):
                with trio.fail_after(STEP):
                    while "never confirmed" not in device.last_error:
                        await trio.sleep(0.01)
                print("device:", device.last_error)
                assert lock, "the write lock was never taken"
                assert product_version(fleet, device_id) == 1  # it still runs v1
                lock.pop().close()  # rolls back: the server's writes go through now
                await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
                await rig.events.wait_for("spark/flash/status", device_id, "success")
        finally:
            for conn in lock:
                conn.close()
        assert len(lost) == lost_acks
        print("re-asks that reached the server once its transfer was over:", reasks)
        assert bool(reasks) == (lost_acks >= REPLIES)
        # In the same session (the only other one is after the reset into v2), one update
        # and one download from zero: the file was applied from the late FinishAck, not
        # downloaded or offered again.
        assert device.sessions == 2
        assert flash_statuses(rig.events, device_id) == ["started", "success"]
        assert watched.restarts == 1
        assert len(v2) <= watched.written <= len(v2) + WINDOW * CHUNK


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_finish_ack_later_than_the_devices_retries_still_updates_it(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    await update_with_a_slow_completion_write(nursery, tmp_path, transport)


async def test_a_lost_late_finish_ack_is_made_up_by_the_answers_to_the_repeats(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Over DTLS the late FinishAck is one NON datagram, and the device no longer repeats
    its FinishReply: the server answers each repeat that queued behind its write, so losing
    one copy still updates the device."""
    await update_with_a_slow_completion_write(nursery, tmp_path, "udp", lost_acks=1)


async def test_every_finish_ack_of_the_transfer_lost_is_made_up_by_a_reask(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Over DTLS, every FinishAck the transfer sent is lost: its own and its answers to the
    device's repeats (one per FinishReply, so REPLIES of them). The lapsed device asks
    again, slowly; the server, its transfer over, answers from its memory of the
    completion it recorded, and the device applies v2 in the same session."""
    await update_with_a_slow_completion_write(nursery, tmp_path, "udp", lost_acks=REPLIES)
