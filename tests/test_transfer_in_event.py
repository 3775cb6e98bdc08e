"""The OTA sender runs inside the event that feeds it (issue 14 item 5): over a real server
and emulated devices on real TLS 1.3 / DTLS 1.2 sockets, the device's acknowledgements
advance the transfer in the session reader's own call (the UDP endpoint's ``on_data``, the
TLS connection's reader), and its deadlines in the process's timer heap, so the updater's
task does not wake per acknowledgement. The counts are trio's (an instrument counts the
updater task's steps) and the server's own counters, never times.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from otacore.coap import decode_udp
from otacore.protocol.link import Transport
from otacore.protocol.ota_wire import is_transfer
from otacore.transfer import TransferSender
from server.devices.updater import SessionUpdater
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    WatchedFlash,
    app,
    flash_statuses,
    ota_rig,
    running,
    updated_to,
)

CHUNK = 1024
#: No progress write during the transfer: the updater's steps then do not depend on time.
NO_PROGRESS_WRITES = {"progress_interval": 3600.0}


class UpdaterSteps(trio.abc.Instrument):
    """Counts the steps (wake-ups) of every updater task (the on-demand tasks a session
    starts with a :meth:`SessionUpdater.run` as their work), and notes at each step how
    many transfer messages its updater had taken by then."""

    def __init__(self) -> None:
        self.updaters: dict[trio.lowlevel.Task, SessionUpdater] = {}
        self.steps = 0
        #: Per updater: the transfer messages taken so far, at each of its task's steps.
        self.seen: dict[int, list[int]] = {}

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        frame = getattr(task.coro, "cr_frame", None)
        work = frame.f_locals.get("work") if frame is not None else None
        if getattr(work, "__func__", None) is SessionUpdater.run:
            self.updaters[task] = work.__self__  # type: ignore[union-attr]

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        updater = self.updaters.get(task)
        if updater is not None:
            self.steps += 1
            taken = updater.fed_in_event + updater.fed_to_task
            self.seen.setdefault(id(updater), []).append(taken)

    def steps_mid_transfer(self, updater: SessionUpdater) -> int:
        """Steps of ``updater``'s task after its transfer's first message was taken and
        before its last (the completion, which the task records)."""
        last = updater.fed_in_event + updater.fed_to_task
        return sum(1 for taken in self.seen.get(id(updater), []) if 0 < taken < last)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_acknowledgements_advance_the_transfer_without_waking_the_updater(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """A 220-chunk transfer: every acknowledgement is handled in the reader's call, and the
    updater's task takes a fixed number of steps for the whole update (memory, offer,
    completion), far fewer than the acknowledgements (it took at least one per ack)."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(tcp_chunk_size=CHUNK, udp_chunk_size=CHUNK, **NO_PROGRESS_WRITES)
        v2 = app(2, size=220 * CHUNK)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, transport)], ota_chunk_size=CHUNK)
        fleet.open()
        updaters: list[SessionUpdater] = []
        watched = WatchedFlash.install(fleet, device_id, marks=[CHUNK],
                                       on_mark=lambda _: updaters.append(
                                           rig.engine.updaters[device_id]))
        steps = UpdaterSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            async with running(fleet):
                await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
                await rig.events.wait_for("spark/flash/status", device_id, "success")
        finally:
            trio.lowlevel.remove_instrument(steps)
        (updater,) = updaters  # the session that streamed the image
        acks = updater.fed_in_event + updater.fed_to_task
        print(f"{transport}: {acks} transfer messages, {updater.fed_in_event} in the "
              f"reader's call; updater task steps: {steps.steps} in all, "
              f"{steps.steps_mid_transfer(updater)} mid-transfer")
        assert watched.restarts == 1 and watched.written >= len(v2)
        assert acks >= 100  # the device acknowledges every second chunk
        assert updater.fed_in_event >= acks - 5  # at most a few came while the task sent
        assert steps.updaters  # the instrument saw the updater tasks
        # It took at least one per acknowledgement; now none while the chunks flow, but
        # for the transfer's first progress write (it carries the update's "started"):
        # the few steps of one store write.
        assert steps.steps_mid_transfer(updater) <= 10
        assert flash_statuses(rig.events, device_id) == ["started", "success"]


async def test_a_deadline_retransmits_in_the_timer_heap_and_the_transfer_completes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Over UDP a whole window of chunks is lost (8 datagrams in a row, window 8): no
    acknowledgement can reveal it, so only the sender's deadline recovers it. That
    deadline lives in the process's timer heap and re-sends in the heap's call: the
    updater's task stays asleep, and the device downloads the image once."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(udp_chunk_size=CHUNK, window_limit=8, **NO_PROGRESS_WRITES)
        v2 = app(2, size=64 * CHUNK)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, "udp")], ota_chunk_size=CHUNK)
        fleet.open()
        lost: list[int] = []
        updaters: list[SessionUpdater] = []
        senders: list[TransferSender] = []

        def go_deaf(_: int) -> None:
            """From the mark on, the next 8 transfer datagrams are lost."""
            device = fleet.device(device_id).device
            hear = device.receive
            updater = rig.engine.updaters[device_id]
            assert updater.sender is not None
            updaters.append(updater)
            senders.append(updater.sender)

            def receive(data: bytes, now: float) -> None:
                if len(lost) < 8 and is_transfer(decode_udp(data)):
                    lost.append(len(data))
                    return
                hear(data, now)

            device.receive = receive  # type: ignore[method-assign]

        watched = WatchedFlash.install(fleet, device_id, marks=[16 * CHUNK], on_mark=go_deaf)
        steps = UpdaterSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            async with running(fleet):
                await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
        finally:
            trio.lowlevel.remove_instrument(steps)
        (updater,), (sender,) = updaters, senders
        stats = sender.stats()
        print(f"lost {len(lost)} datagrams; {stats}; updater steps mid-transfer: "
              f"{steps.steps_mid_transfer(updater)}")
        assert len(lost) == 8
        assert stats.timeouts + stats.probes >= 1  # the deadline fired
        assert stats.chunks_retransmitted >= 8
        assert steps.steps_mid_transfer(updater) <= 10  # the first progress write only
        assert watched.restarts == 1
        assert flash_statuses(rig.events, device_id)[:1] == ["started"]


async def test_a_full_tls_socket_buffer_hands_the_send_to_the_task_and_nothing_is_lost(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Over TLS with a tiny socket send buffer (4 KiB against windows of 64 chunks of
    1 KiB), the reader's write is taken only in part: the rest is held (never a queue), the
    updater's task sends it, waiting for room, and drives the transfer until it has caught
    up; the image arrives whole."""
    chunk = 1024
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(tcp_chunk_size=chunk, **NO_PROGRESS_WRITES)
        v2 = app(2, size=200 * chunk)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, "tcp")], ota_chunk_size=chunk)
        plane = rig.kit.handle.devices
        assert plane is not None
        updaters: list[SessionUpdater] = []

        def shrink_buffer(_: int) -> None:
            handler = plane.live[device_id]
            sock = handler.session.stream.socket  # type: ignore[attr-defined]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            assert handler.updater is not None
            updaters.append(handler.updater)

        watched = WatchedFlash.install(fleet, device_id, marks=[chunk], on_mark=shrink_buffer)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
        (updater,) = updaters
        print(f"in the reader's call: {updater.fed_in_event}, by the task: "
              f"{updater.fed_to_task}, sends handed to the task: {updater.sends_deferred}")
        assert updater.sends_deferred > 0
        assert updater.fed_in_event > 0
        assert watched.restarts == 1
        (user,) = [m for m in fleet.device(device_id).device.status().modules
                   if m.function == 5]
        assert fleet.device(device_id).device.flash.read_slot(5, 1, user.slot) == v2
