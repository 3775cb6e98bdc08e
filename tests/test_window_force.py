"""Releases and flash-now respect maintenance windows unless forced (issue 15), over real
TLS 1.3 / DTLS 1.2 sockets and a real SQLite file, on a frozen fleet wall clock: an
immediate release, a standard one and a flash-now made while the device's window is closed
are not offered until the window opens, then are without a new cause; ``force_window``
sends them at once and writes an audit entry; a product without a window pays no store
read for the window gate; REST and the CLI refuse bad values with a specific error."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from otacore.protocol.link import Transport
from otacore.transfer import RetransmitPolicy
from server.cli.main import app as cli_app
from server.events import FLASH_REQUESTED
from server.fleet import SYSTEM_ACTOR
from server.fleet.windows import FORCED_WINDOW_ACTION, FORCED_WINDOW_NOTE
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    OtaRig,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    running,
    updated_to,
)
from tests.test_ota_e2e_stale import hold_at_halfway
from tests.test_rollout_offers import HOUR_MS, MIN_MS, FakeWallClock, _two_am_today

runner = CliRunner()
#: The window gate's store read (the session path's only added cost, and only for a
#: product with a window).
GATE_READ = "WindowService.window_gate.<locals>.work"


async def _v1_fleet_and_v2(rig: OtaRig) -> None:
    """v1 released to the product default (the emulated devices run it); v2 uploaded."""
    await rig.upload_device_os(SYSTEM_5003)
    await rig.upload(1, app(1))
    await rig.release(1, product_default=True)
    await rig.upload(2, app(2, size=12_000))


async def _closed_window(rig: OtaRig, before_ms: int = 1000) -> tuple[FakeWallClock, int]:
    """The product's window ``0 2 * * *`` (60 min, UTC), the fleet's clock ``before_ms``
    before it opens; returns the clock and the opening (epoch ms)."""
    opening = _two_am_today()
    clock = FakeWallClock(opening - before_ms)
    rig.kit.handle.fleet.clock = clock
    await rig.kit.handle.fleet.set_window(SYSTEM_ACTOR, rig.product, cron="0 2 * * *",
                                          duration=60, timezone="UTC")
    return clock, opening


async def _forced_entries(rig: OtaRig) -> list[Any]:
    def read() -> list[Any]:
        with rig.kit.handle.store.read() as tx:
            return [a for a in tx.list_audit(rig.product) if a.action == FORCED_WINDOW_ACTION]

    return await trio.to_thread.run_sync(read)


async def _flash_handled(rig: OtaRig, device_id: str, flashes: int) -> None:
    """The engine handled ``flashes`` flash requests and its checks since have finished."""
    with trio.fail_after(STEP):
        await rig.engine.handled[FLASH_REQUESTED].reached(flashes)
    await rig.engine_done(device_id, releases=1)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_immediate_release_waits_for_the_window_then_goes(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        clock, opening = await _closed_window(rig)
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            body = await rig.release(2, product_default=True, intelligent=True)
            assert body["affected_online_devices"] == 1
            updater = await rig.engine_done(device_id, releases=2)
            # Held: nothing offered, nothing started; the updater waits for the opening.
            assert updater.offers == 0 and product_version(fleet, device_id) == 1
            assert flash_statuses(rig.events, device_id) == []
            assert updater.rollout_retry_at == opening
            clock.now = opening  # the window opens: the updater asks again by itself
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
        assert await _forced_entries(rig) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_forced_immediate_release_goes_at_once_and_is_audited(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        await _closed_window(rig)  # the clock never reaches the opening
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True, intelligent=True, force_window=True)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
        (entry,) = await _forced_entries(rig)
        assert entry.actor not in ("", SYSTEM_ACTOR.subject)  # the API token's user
        assert entry.target == "firmware:2" and entry.product_id == rig.product
        assert entry.details["note"] == FORCED_WINDOW_NOTE and entry.details["release"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_clearing_the_window_lets_held_offers_start_at_once(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        # An hour before the opening: the held updater would sleep an hour, unless the
        # window's change kicks it.
        await _closed_window(rig, before_ms=HOUR_MS)
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True, intelligent=True)
            updater = await rig.engine_done(device_id, releases=2)
            assert updater.offers == 0 and updater.rollout_retry_at is not None
            await rig.kit.handle.fleet.clear_window(SYSTEM_ACTOR, rig.product)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            assert rig.engine.window_events_handled.value >= 2  # set, then cleared


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_release_transfer_in_progress_when_the_window_closes_finishes(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """The window closes mid-transfer and the link drops: the device's next session
    resumes the update (it is in progress, not a new offer) and it completes."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        patient = RetransmitPolicy(initial_rto=2.0, min_rto=2.0, max_rto=8.0, max_rounds=8)
        rig.tune_engine(tcp_chunk_size=1024, udp_chunk_size=1024, window_limit=4,
                        progress_step=4096, transfer_policy=patient)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(1, app(1))
        await rig.release(1, product_default=True)
        v2 = app(2, size=48_000)
        await rig.upload(2, v2)
        opening = _two_am_today()
        clock = FakeWallClock(opening + 30_000)  # inside a one-minute window
        rig.kit.handle.fleet.clock = clock
        await rig.kit.handle.fleet.set_window(SYSTEM_ACTOR, rig.product, cron="0 2 * * *",
                                              duration=1, timezone="UTC")
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, app(1)),
                          ota_chunk_size=1024)
        fleet.open()
        link, halfway, _ = hold_at_halfway(fleet, device_id, v2)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True, intelligent=True)
            with trio.fail_after(STEP):
                await halfway.wait()
            clock.now = opening + 5 * MIN_MS  # the window closed mid-transfer
            rig.cut(device_id)
            link.let_go()
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
        assert "failed" not in flash_statuses(rig.events, device_id)


async def test_a_groups_window_applies_instead_of_the_products(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The product's window is closed but the device's group has its own, open, window:
    the immediate release goes at once (the group's rule wins), and nothing is forced."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        await rig.create_group("night")
        await rig.put_device(device_id, groups=["night"])
        await _closed_window(rig)  # 01:59:59, the product's window opens at 02:00
        await rig.kit.handle.fleet.set_window(SYSTEM_ACTOR, rig.product, cron="0 1 * * *",
                                              duration=120, timezone="UTC", group="night")
        fleet = rig.fleet([(device_id, "tcp")], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True, intelligent=True)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
        assert await _forced_entries(rig) == []


async def test_a_standard_release_waits_for_the_window_at_the_next_session(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        clock, opening = await _closed_window(rig)
        fleet = rig.fleet([(device_id, "tcp")], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True)  # standard: at the next session
            await rig.reconnect(fleet, device_id)
            updater = await rig.engine_done(device_id, releases=2)
            assert updater.offers == 0 and product_version(fleet, device_id) == 1
            assert updater.rollout_retry_at == opening
            clock.now = opening + 30 * 60_000  # inside the window
            await rig.reconnect(fleet, device_id)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_flash_now_waits_for_the_window_unless_forced(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        await rig.upload(3, app(3, size=9_000))
        clock, opening = await _closed_window(rig)
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.put_device(device_id, desired_firmware_version=2, flash=True)
            await _flash_handled(rig, device_id, 1)
            updater = rig.engine.updaters[device_id]
            assert updater.offers == 0 and product_version(fleet, device_id) == 1
            assert updater.rollout_retry_at == opening
            assert await _forced_entries(rig) == []
            clock.now = opening
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            # Its success recorded first: a flash requested before that would be the one
            # the success finishes (see the report: the newest pending flash is finished).
            await rig.events.wait_for("spark/flash/status", device_id, "success")
            # The window closes; a forced flash-now goes at once, audit-logged.
            clock.now = opening + 2 * HOUR_MS
            await rig.put_device(device_id, desired_firmware_version=3, flash=True,
                                 force_window=True)
            await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
        (entry,) = await _forced_entries(rig)
        assert entry.target == f"device:{device_id}" and entry.details["version"] == 3
        assert entry.details["note"] == FORCED_WINDOW_NOTE


async def test_a_product_without_a_window_pays_no_gate_read(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        service = rig.kit.handle.fleet
        fleet = rig.fleet([(device_id, "tcp")], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            assert not await service.windows_may_apply(rig.product)  # known: no window
            before = Counter(service.round_trips.by_name)
            await rig.release(2, product_default=True, intelligent=True)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.reconnect(fleet, device_id)
            await rig.engine_done(device_id, releases=2)
            after = service.round_trips.by_name
            assert after[GATE_READ] == before[GATE_READ]
            assert (after["WindowService._products_with_windows"]
                    == before["WindowService._products_with_windows"])
            # A window set in this process is known at once: the next offer asks the gate.
            await _closed_window(rig)
            assert await service.windows_may_apply(rig.product)


async def test_a_later_plain_release_withdraws_the_force(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        _, opening = await _closed_window(rig)
        await rig.release(2, product_default=True, force_window=True)
        await rig.release(2, product_default=True)  # the same release, not forced
        fleet = rig.fleet([(device_id, "tcp")], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(lambda f: f.device(device_id).device.online, timeout=STEP)
            updater = await rig.engine_done(device_id, releases=3)
            assert updater.offers == 0 and product_version(fleet, device_id) == 1
            assert updater.rollout_retry_at == opening  # held by the window


async def test_rest_refuses_bad_force_window_values(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        url = f"/v1/products/{rig.product}"
        got = await rig.api.put(f"{url}/firmware/release",
                                json={"version": 2, "product_default": True, "force": True,
                                      "force_window": "maybe"})
        assert got.status_code == 400 and "force_window must be true or false" in got.text
        got = await rig.api.put(f"{url}/devices/{device_id}",
                                json={"desired_firmware_version": 2, "force_window": True})
        assert got.status_code == 400 and "give flash=true" in got.text
        got = await rig.api.put(f"{url}/devices/{device_id}",
                                json={"desired_firmware_version": 2, "flash": True,
                                      "force_window": 3})
        assert got.status_code == 400 and "force_window must be true or false" in got.text
        assert await _forced_entries(rig) == []


async def test_cli_force_window_flags(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        await _closed_window(rig)
        common = ["--product", str(rig.product), "--api-url", rig.kit.handle.api_url,
                  "--token", rig.kit.token]

        def invoke(*args: str) -> Any:
            return runner.invoke(cli_app, [*args, *common])

        refused = await trio.to_thread.run_sync(
            invoke, "device", "lock", device_id, "--version", "2", "--force-window")
        assert refused.exit_code == 2 and "--flash-now" in refused.output
        done = await trio.to_thread.run_sync(
            invoke, "firmware", "release", "--version", "2", "--product-default", "--force",
            "--immediate", "--force-window", "--json")
        assert done.exit_code == 0, done.output
        assert json.loads(done.output)["version"] == 2
        done = await trio.to_thread.run_sync(
            invoke, "device", "lock", device_id, "--version", "2", "--flash", "--force-window")
        assert done.exit_code == 0, done.output
        targets = sorted(entry.target for entry in await _forced_entries(rig))
        assert targets == [f"device:{device_id}", "firmware:2"]
