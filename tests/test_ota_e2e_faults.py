"""End to end over real sockets: updates under faults.

Links cut mid-transfer, devices killed mid-download and mid-apply, an image that fails its
self-test, a device that does not trust the signer, and an image altered after its chunks
were checked.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from otacore.coap import decode_udp
from otacore.device.emulated import DevicePhase
from otacore.protocol.link import Transport
from otacore.protocol.ota_wire import is_transfer
from otacore.signing import SigningKey, TrustStore
from otacore.transfer import RetransmitPolicy
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    OtaRig,
    WatchedFlash,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    running,
    sha,
    updated_to,
)

FLASH_STATUS = "spark/flash/status"
#: Engine settings that keep a few chunks in flight, so a cut lands mid-transfer.
CHUNK = 1024
WINDOW = 4
SMALL_WINDOWS = {
    "tcp_chunk_size": CHUNK,
    "udp_chunk_size": CHUNK,
    "window_limit": WINDOW,
    "progress_step": 4096,
}


async def _no_second_offer(rig: OtaRig, device_id: str, offers: int) -> None:
    """After a reconnect, the device is offered nothing more: checked once the engine has
    handled this session's Hello and Describe (and every other kick so far)."""
    updater = await rig.engine_done(device_id)
    assert updater.offers == 0
    assert flash_statuses(rig.events, device_id).count("started") == offers


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_link_cut_mid_transfer_resumes(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(**SMALL_WINDOWS)
        v2 = app(2, size=48_000)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        # Three cuts at random points around 1/4, 1/2 and 3/4 of the image (fixed seed).
        rng = random.Random(f"cuts {transport}")
        marks = [len(v2) * q // 4 + rng.randrange(-len(v2) // 20, len(v2) // 20) for q in (1, 2, 3)]
        cuts: list[bool] = []
        fleet = rig.fleet([(device_id, transport)], ota_chunk_size=CHUNK)
        watched = WatchedFlash.install(
            fleet, device_id, marks=marks, on_mark=lambda _: cuts.append(rig.cut(device_id))
        )
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, device_id, "success")
        assert cuts == [True, True, True]  # each cut closed a live session
        runner = fleet.device(device_id)
        assert runner.device.sessions >= 5  # first, three after cuts, one after the reset
        # Resumed, never restarted: one download from zero, and at most the chunks in
        # flight at each cut were sent twice.
        assert watched.restarts == 1
        assert len(v2) <= watched.written <= len(v2) + len(cuts) * WINDOW * CHUNK
        (user,) = [m for m in runner.device.status().modules if m.function == 5]
        assert runner.device.flash.read_slot(5, 1, user.slot) == v2
        assert flash_statuses(rig.events, device_id) == ["started", "success"]
        # Every session that ended took its updater with it.
        rig.cut(device_id)  # the powered-off device's last session (it sent no goodbye)
        await rig.wait_device(device_id, lambda d: not d["online"])
        assert rig.engine.updaters == {}


async def test_a_transfer_the_device_stops_hearing_is_retried_and_resumes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Over UDP, halfway through, no transfer datagram reaches the device for a while (its
    session lives on). The server's sender gives up (TIMEOUT); the updater pauses, offers
    again in the same session, and the device resumes from the chunks it holds."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        fast_give_up = RetransmitPolicy(initial_rto=0.1, min_rto=0.1, max_rto=0.2, max_rounds=2)
        rig.tune_engine(**SMALL_WINDOWS, transfer_policy=fast_give_up, retry_pause=0.3)
        v2 = app(2, size=48_000)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, "udp")], ota_chunk_size=CHUNK)
        deaf_for = 1.2

        def go_deaf(_: int) -> None:
            device = fleet.device(device_id).device
            hear = device.receive
            until = trio.current_time() + deaf_for

            def receive(data: bytes, now: float) -> None:
                if now < until and is_transfer(decode_udp(data)):
                    return  # lost on the way (pings and other requests still pass)
                hear(data, now)

            device.receive = receive  # type: ignore[method-assign]

        watched = WatchedFlash.install(fleet, device_id, marks=[len(v2) // 2], on_mark=go_deaf)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, device_id, "success")
        # The first offer timed out; a later one (within the engine's three attempts,
        # however the timers fell) resumed it, in the same session: one update, one download
        # from zero, and at most a window of chunks written twice per timed-out attempt.
        assert flash_statuses(rig.events, device_id) == ["started", "success"]
        assert fleet.device(device_id).device.sessions == 2  # the first, then after the reset
        assert watched.restarts == 1
        assert len(v2) <= watched.written <= len(v2) + 2 * WINDOW * CHUNK


async def test_a_transfer_that_timed_out_every_attempt_is_offered_again_later(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """With a single attempt, a device deaf to transfers for a while fails the update
    (TIMEOUT) though its session lives; the updater offers it again later in the same
    session instead of leaving the device mid-download until it reconnects."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        fast_give_up = RetransmitPolicy(initial_rto=0.1, min_rto=0.1, max_rto=0.2, max_rounds=2)
        rig.tune_engine(**SMALL_WINDOWS, transfer_policy=fast_give_up, transfer_attempts=1,
                        retry_later=0.5)
        v2 = app(2, size=48_000)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, "udp")], ota_chunk_size=CHUNK)

        def go_deaf(_: int) -> None:
            device = fleet.device(device_id).device
            hear = device.receive
            until = trio.current_time() + 1.2

            def receive(data: bytes, now: float) -> None:
                if now < until and is_transfer(decode_udp(data)):
                    return  # lost on the way (pings and other requests still pass)
                hear(data, now)

            device.receive = receive  # type: ignore[method-assign]

        WatchedFlash.install(fleet, device_id, marks=[len(v2) // 2], on_mark=go_deaf)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, device_id, "success")
        # One or more timed-out updates (however the timers fell against the deaf spell),
        # each offered again later, then the success: all in the first session.
        statuses = flash_statuses(rig.events, device_id)
        assert statuses[:2] == ["started", "failed"] and statuses[-2:] == ["started", "success"]
        assert statuses == ["started", "failed"] * ((len(statuses) - 2) // 2) + [
            "started", "success"]
        assert fleet.device(device_id).device.sessions == 2  # the first, then after the reset


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_killed_mid_download_and_mid_apply(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(**SMALL_WINDOWS)
        v2, v3 = app(2, size=40_000), app(3, size=40_000)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.upload(3, v3)
        await rig.release(2, product_default=True)
        settings = {"ota_chunk_size": CHUNK}

        # 1. Power cut at 40% of the download.
        fleet = rig.fleet([(device_id, transport)], **settings)
        async with trio.open_nursery() as power:
            WatchedFlash.install(
                fleet,
                device_id,
                marks=[len(v2) * 2 // 5],
                on_mark=lambda _: power.cancel_scope.cancel(),
            )
            await power.start(fleet.run)
        assert fleet.device(device_id).device.phase is DevicePhase.DOWNLOADING
        # The cloud shows the transfer in flight (a dead device's session lingers until
        # it comes back or its idle timeout: a power cut sends nothing).
        body = await rig.wait_device(
            device_id, lambda d: d["update"] is not None and d["update"]["bytes_done"] > 0
        )
        update = body["update"]
        assert update["status"] == "in_progress" and update["sha256"] == sha(v2)
        assert 0 < update["bytes_done"] < update["bytes_total"] == len(v2)
        # The same flash, a new power-on: it resumes and boots a valid image.
        fleet = rig.fleet([(device_id, transport)], **settings)
        watched = WatchedFlash.install(fleet, device_id)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, device_id, "success")
        assert watched.restarts == 0 and watched.written < len(v2)

        # 2. Power cut while the validated image waits for its (held) reset.
        fleet = rig.fleet([(device_id, transport)], **settings)
        async with trio.open_nursery() as power:
            await power.start(fleet.run)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            fleet.device(device_id).disable_reset()
            await rig.release(3, product_default=True, intelligent=True)
            await fleet.wait_until(
                lambda f: f.device(device_id).device.phase is DevicePhase.APPLYING, timeout=STEP
            )
            body = await rig.wait_device(device_id, lambda d: d["reset_pending"])
            assert body["update"] is not None and body["update"]["status"] == "applying"
            power.cancel_scope.cancel()
        fleet = rig.fleet([(device_id, transport)], **settings)
        watched = WatchedFlash.install(fleet, device_id)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, device_id, "success", count=2)
            status = fleet.device(device_id).device.status()
            assert status.boots == 1 and status.last_result is not None
            assert status.last_result.status == "committed"
            body = await rig.wait_device(device_id, lambda d: sha(v3) in str(d["modules"]))
            # The dead sessions it left behind did not mark the live device offline.
            assert (body["firmware_version"], body["update"], body["reset_pending"]) == (
                3,
                None,
                False,
            )
            assert body["online"] is True
        assert watched.written == 0  # booted the staged image: nothing downloaded again
        assert flash_statuses(rig.events, device_id) == ["started", "success"] * 2


async def test_bad_image_rolls_back_and_is_not_offered_again(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from otacore.device import make_test_marker

    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        bad = app(2, marker=make_test_marker(selftest_fail_after=0.3))
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, bad)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, "udp")])
        async with running(fleet):
            await rig.events.wait_for(FLASH_STATUS, device_id, "failed")
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            status = fleet.device(device_id).device.status()
            assert status.last_result is not None
            assert status.last_result.status == "rolled_back"
            assert status.boots == 3  # the bad image, then the old one again
            result = rig.events.named("ota/device/update/result", device_id)
            assert result and '"status":"rolled_back"' in (result[-1] or "")
            body = await rig.device(device_id)
            assert (body["firmware_version"], body["targeted_firmware_release_version"]) == (1, 2)
            # Not offered again: neither now nor at the next handshake.
            await rig.reconnect(fleet, device_id)
            await _no_second_offer(rig, device_id, offers=1)
            assert fleet.device(device_id).device.status().boots == 3
            # The memory is in the store: a process that never saw the device (here the
            # engine's caches emptied, as after a restart) does not offer it again either.
            for cache in (rig.engine.failed, rig.engine.delivered, rig.engine.updating):
                cache.clear()
            await rig.reconnect(fleet, device_id)
            await _no_second_offer(rig, device_id, offers=1)
            stats = (await rig.firmware(2))["release_stats"]
            assert (stats["succeeded"], stats["failed"], stats["running"]) == (0, 1, 0)
            # An operator flashing it anew makes the image eligible again (it fails again).
            await rig.put_device(device_id, desired_firmware_version=2, flash=True)
            await rig.events.wait_for(FLASH_STATUS, device_id, "failed", count=2)
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
        assert flash_statuses(rig.events, device_id) == ["started", "failed"] * 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_untrusted_signer_is_refused(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """A device whose trust store holds another key refuses the offer; the server records
    the failure and does not offer the image again."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2))
        stranger = SigningKey.from_private_bytes(bytes(range(7, 39)))
        fleet = rig.fleet(
            [(device_id, transport)], trust=TrustStore.initial(rig.product, [stranger.public_key])
        )
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True, intelligent=True)
            await rig.events.wait_for(FLASH_STATUS, device_id, "failed")
            device = fleet.device(device_id).device
            assert "UNKNOWN_KEY" in device.status().last_error
            assert device.status().bytes_received == 0  # refused before any download
            await rig.reconnect(fleet, device_id)
            await _no_second_offer(rig, device_id, offers=0)
            assert product_version(fleet, device_id) == 1
        stats = (await rig.firmware(2))["release_stats"]
        assert (stats["succeeded"], stats["failed"]) == (0, 1)
        assert flash_statuses(rig.events, device_id) == ["failed"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_image_altered_after_transfer_is_refused(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """The stored bytes differ from the signed manifest (one byte flipped after its chunk
    passed the CRC check): the device refuses the file, the server records the failure,
    and the next attempt (clean) succeeds."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        v2 = app(2)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        fleet = rig.fleet([(device_id, transport)])
        WatchedFlash.install(fleet, device_id, corrupt_at=len(v2) // 3)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True, intelligent=True)
            await rig.events.wait_for(FLASH_STATUS, device_id, "failed")
            device = fleet.device(device_id).device
            assert "SHA256_MISMATCH" in device.status().last_error
            assert product_version(fleet, device_id) == 1
            stats = (await rig.firmware(2))["release_stats"]
            assert (stats["succeeded"], stats["failed"]) == (0, 1)
            # A transfer fault is not the image's fault: the next handshake tries again.
            await rig.reconnect(fleet, device_id)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, device_id, "success")
        assert flash_statuses(rig.events, device_id) == ["started", "failed", "started", "success"]
