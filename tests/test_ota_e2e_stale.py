"""End to end over real sockets: a transfer made stale mid-way is cancelled.

An immediate release (or a lock with "flash now") arrives while the device downloads the
previous release: the delivery
planner (otacore.transfer.planner) finds the transfer in flight no longer serves the
device's target, the server cancels it (a transfer Cancel the device honours), records the
superseded update as failed, and offers the new release in the same session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from otacore.device.emulated import EmulatedDevice
from otacore.protocol.link import Transport
from otacore.transfer import RetransmitPolicy
from server.emulator.fleet import EmulatedFleet
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

FLASH_STATUS = "spark/flash/status"
CHUNK = 1024


class HeldLink:
    """Holds what the server sends a device (datagrams or TLS stream pieces, in order)
    from ``hold()`` until ``let_go()``: the transfer in flight can neither finish nor fail
    while the test changes the device's target."""

    def __init__(self, device: EmulatedDevice) -> None:
        self.device = device
        self.receive: Callable[[bytes, float], None] = device.receive
        self.held: list[bytes] | None = None

    def hold(self) -> None:
        self.held = []
        self.device.receive = self._receive  # type: ignore[method-assign]

    def _receive(self, data: bytes, now: float) -> None:
        if self.held is None:
            self.receive(data, now)
        else:
            self.held.append(data)

    def let_go(self) -> None:
        held, self.held = self.held or [], None
        for data in held:
            self.receive(data, trio.current_time())


def hold_at_halfway(fleet: EmulatedFleet, device_id: str,
                    image: bytes) -> tuple[HeldLink, trio.Event, WatchedFlash]:
    """Watch ``device_id``'s flash of ``image`` and hold its link once half of the image is
    written: returns the link (``let_go()`` to release what was held), the event set at
    that moment, and the watched flash."""
    link = HeldLink(fleet.device(device_id).device)
    halfway = trio.Event()

    def at_halfway(_: int) -> None:
        link.hold()
        halfway.set()

    watched = WatchedFlash.install(fleet, device_id, marks=[len(image) // 2],
                                   on_mark=at_halfway)
    return link, halfway, watched


@pytest.mark.parametrize("change", ["immediate release", "lock with flash now"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_new_target_mid_transfer_cancels_it_and_delivers_the_new_one(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport, change: str
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        # Small windows keep the transfer going long enough to be cut into; patient
        # retransmission timers keep it in flight while the device is held.
        patient = RetransmitPolicy(initial_rto=2.0, min_rto=2.0, max_rto=8.0, max_rounds=8)
        rig.tune_engine(tcp_chunk_size=CHUNK, udp_chunk_size=CHUNK, window_limit=4,
                        progress_step=4096, transfer_policy=patient)
        v2, v3 = app(2, size=48_000), app(3, size=48_000)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.upload(3, v3)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, transport)], ota_chunk_size=CHUNK)
        fleet.open()
        link, halfway, watched = hold_at_halfway(fleet, device_id, v2)
        async with running(fleet):
            with trio.fail_after(STEP):
                await halfway.wait()
            # Version 2 is half downloaded and its transfer in flight: version 3 is
            # released to the device at once, or the device is locked to it and flashed.
            if change == "immediate release":
                await rig.release(3, product_default=True, intelligent=True)
            else:
                await rig.put_device(device_id, desired_firmware_version=3, flash=True)
            # The server cancels the stale transfer before the device hears any more.
            await rig.events.wait_for(FLASH_STATUS, device_id, "failed")
            link.let_go()
            await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, device_id, "success")
            await rig.wait_device(device_id, lambda d: d["firmware_version"] == 3)
        # Version 2 never booted: one boot at power-on, one into version 3.
        assert fleet.device(device_id).device.status().boots == 2
        assert flash_statuses(rig.events, device_id) == ["started", "failed", "started",
                                                          "success"]
        # Two downloads from zero (version 2, cut; version 3, whole).
        assert watched.restarts == 2
        assert len(v2) // 2 + len(v3) <= watched.written


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_device_revoked_mid_transfer_gets_nothing_more(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """A revocation mid-transfer closes the device's session (the one registry names it):
    the transfer and its updater end with it, and nothing is delivered."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(tcp_chunk_size=CHUNK, udp_chunk_size=CHUNK, window_limit=4,
                        progress_step=4096)
        v2 = app(2, size=48_000)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, transport)], ota_chunk_size=CHUNK)
        fleet.open()
        link, halfway, watched = hold_at_halfway(fleet, device_id, v2)
        plane = rig.kit.handle.devices
        assert plane is not None
        async with running(fleet):
            with trio.fail_after(STEP):
                await halfway.wait()
            updater = rig.engine.updaters[device_id]
            assert updater.sender is not None  # the transfer is in flight
            revoked = await rig.api.post(f"/v1/products/{rig.product}/devices/{device_id}/revoke")
            assert revoked.status_code == 200, revoked.text
            await rig.wait_device(device_id, lambda d: not d["online"])
            assert device_id not in plane.live and rig.engine.updaters == {}
            assert updater.sender is None and updater.planner.in_flight is None
            written = watched.written
            link.let_go()  # what the server sent before the revocation
            assert watched.written <= written + 4 * CHUNK  # at most the window in flight
        assert written < len(v2)
        assert fleet.device(device_id).device.status().product_version == 1
        await rig.events.catch_up(rig.kit.handle.bus, rig.product)  # all published so far
        assert flash_statuses(rig.events, device_id) == ["started"]
