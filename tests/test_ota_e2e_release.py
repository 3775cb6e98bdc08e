"""End to end over real sockets: releases reach emulated devices through the real server.

Standard releases apply at the next handshake, immediate (intelligent) ones at once; group
releases take precedence over the product default and the highest version wins.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from otacore.protocol.link import Transport
from server.events import FIRMWARE_RELEASED
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    release_data,
    running,
    sha,
    updated_to,
)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_standard_release_at_next_handshake_immediate_release_at_once(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        v2, v3 = app(2), app(3)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.upload(3, v3)
        fleet = rig.fleet([(device_id, transport)])
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            body = await rig.wait_device(device_id, lambda d: d["online"] and d["modules"])
            assert body["firmware_version"] == 1
            assert body["targeted_firmware_release_version"] is None
            assert body["update"] is None
            assert [(m["function"], m["index"], m["version"]) for m in body["modules"]] == [
                (4, 1, 5003),
                (5, 1, 6),
            ]

            # A standard release: the online device is not disturbed (checked once the
            # engine has handled the release and every kick so far)...
            released = rig.engine.handled[FIRMWARE_RELEASED].value
            await rig.release(2, product_default=True)
            body = await rig.device(device_id)
            assert body["targeted_firmware_release_version"] == 2
            updater = await rig.engine_done(device_id, releases=released + 1)
            assert updater.offers == 0
            assert flash_statuses(rig.events, device_id) == []
            assert product_version(fleet, device_id) == 1
            # ...until its next handshake (the link drops, it reconnects with a Hello).
            assert rig.cut(device_id)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
            body = await rig.device(device_id)
            assert (body["firmware_version"], body["update"]) == (2, None)
            assert flash_statuses(rig.events, device_id) == ["started", "success"]
            assert (await rig.firmware(2))["release_stats"]["succeeded"] == 1

            # An immediate release reaches the online device without any new handshake.
            sessions = fleet.device(device_id).device.sessions
            await rig.release(3, product_default=True, intelligent=True)
            await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
            # One more session only: the one after the reset into the new image.
            assert fleet.device(device_id).device.sessions == sessions + 1
            # Hello reports the product version, the Describe that follows the modules.
            body = await rig.wait_device(device_id, lambda d: sha(v3) in str(d["modules"]))
            assert body["firmware_version"] == 3
            await rig.events.wait_for("spark/flash/status", device_id, "success", count=2)
            stats = (await rig.firmware(3))["release_stats"]
            assert (stats["succeeded"], stats["failed"], stats["running"]) == (1, 0, 1)
            # After its resets the device resumed its TLS / DTLS session (as Device OS
            # does): no full handshake for each reboot.
            plane = rig.kit.handle.devices
            assert plane is not None and plane.server is not None
            assert plane.server.host.stats.resumed_handshakes[transport] >= 1
        assert [r["immediate"] for r in release_data(rig.events)] == [False, True]


def _runs(version: int) -> Callable[[dict[str, Any]], bool]:
    return lambda body: bool(body["firmware_version"] == version)


async def test_group_precedence_highest_version_and_product_default(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Device A is in groups "north" (v3) and "south" (v4): it gets v4; device B is in
    "north" only: v3; device C in no group: the product default v2."""
    async with ota_rig(nursery, tmp_path, count=3) as rig:
        a, b, c = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        for version in (2, 3, 4):
            await rig.upload(version, app(version))
        for group in ("north", "south"):
            await rig.create_group(group)
        await rig.put_device(a, groups=["north", "south"])
        await rig.put_device(b, groups=["north"])
        await rig.release(2, product_default=True)
        await rig.release(3, groups=["north"])
        await rig.release(4, groups=["south"])
        expected = {a: 4, b: 3, c: 2}
        for device_id, version in expected.items():
            body = await rig.device(device_id)
            assert body["targeted_firmware_release_version"] == version
        fleet = rig.fleet([(a, "tcp"), (b, "udp"), (c, "tcp")])
        async with running(fleet):
            for device_id, version in expected.items():
                await fleet.wait_until(updated_to(device_id, version), timeout=STEP)
            for device_id, version in expected.items():
                await rig.events.wait_for("spark/flash/status", device_id, "success")
                body = await rig.wait_device(device_id, _runs(version))
                assert body["target_reason"] == (
                    "product_default" if device_id == c else "group_release"
                )
        for version in (2, 3, 4):
            stats = (await rig.firmware(version))["release_stats"]
            assert (stats["succeeded"], stats["failed"]) == (1, 0), (version, stats)


async def test_release_kick_plans_from_its_view_only_when_it_follows_the_describe(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """An immediate release hands each updater the target it read for every device at
    once; the updater uses it instead of reading again only when that read began after the
    session's Describe was recorded (an older read may hold the previous session's modules)."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2))
        fleet = rig.fleet([(device_id, "tcp")])
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.wait_device(device_id, lambda d: d["online"] and d["modules"])
            engine = rig.engine
            updater = engine.updaters[device_id]
            # The API shows the modules once the Describe's write committed; the handler
            # notes the time just after that write returns to it: wait for that, too.
            with trio.fail_after(STEP):
                await updater.handler.described.wait()
            described_at = updater.handler.described_at
            assert described_at is not None
            view = await engine.fleet.target_for_device(device_id)

            updater.kick_with(view, described_at - 0.001)
            assert updater._view is None  # the read may predate the Describe: read again
            read_at = trio.current_time()
            updater.kick_with(view, read_at)
            assert updater._view is view
            updater.kick()  # a kick without a view: something changed, read again
            assert updater._view is None
            updater.kick_with(view, read_at)  # read before that change: stale
            assert updater._view is None
            updater.kick_with(view, trio.current_time())
            assert updater._view is view
            updater.forget_view()  # e.g. a standard release: views read so far are stale
            assert updater._view is None

            # The release's own read is recent: the device updates from it.
            await rig.release(2, product_default=True, intelligent=True)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success", count=1)
