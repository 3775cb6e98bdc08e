"""An abort never downgrades a device that already succeeded (issue 15, decided as hawkBit
and AWS IoT Jobs do: an abort stops new offers and discards downloads in progress;
installed devices stay). Over real TLS 1.3 and DTLS 1.2 sockets: a rollout of v2 is
aborted by hand after its first phase succeeded; those devices stay on v2 across new
sessions and are never offered v1, the others stay on v1 and are never offered v2, until a
release of v1 made after the abort supersedes the rollout; a later rollout then completes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from otacore.rollout import Verdict
from server.emulator.fleet import EmulatedFleet
from server.store import ProductRecord
from tests.test_ota_e2e_kit import (
    APP_V1,
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    OtaRig,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    running,
    transfers_of,
)
from tests.test_rollout_e2e import create_rollout, show_rollout

DEVICES = 8
ROLLOUT_STEP = 4 * STEP
#: Phase 1 is three devices (a count: the device ids are random, a percentage could
#: place none); phase 2 waits an hour after phase 1 succeeded: it never opens here.
HELD_POLICY = {"phases": "#3,all", "phase_wait": 60, "force": True}


def _on(version: int, devices: set[str]) -> Any:
    def check(fleet: EmulatedFleet) -> bool:
        return all(
            fleet.device(d).device.status().product_version == version
            and fleet.device(d).device.status().phase.value == "online"
            for d in devices
        )

    return check


def _product_record(rig: OtaRig, product_id: int) -> ProductRecord:
    with rig.kit.handle.store.read() as tx:
        product = tx.get_product(product_id)
    assert product is not None
    return product


async def test_an_abort_keeps_the_devices_that_succeeded_on_the_version(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with ota_rig(nursery, tmp_path, count=DEVICES) as rig:
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(1, APP_V1)
        await rig.release(1, product_default=True)
        await rig.upload(2, app(2))
        await rig.upload(3, app(3))
        ids = rig.ids
        fleet = rig.fleet([(d, TRANSPORTS[i % 2]) for i, d in enumerate(ids)])
        async with running(fleet):
            await fleet.wait_until(_on(1, set(ids)), timeout=ROLLOUT_STEP)
            rollout = await create_rollout(rig, 2, **HELD_POLICY)
            service = rig.kit.handle.fleet
            view = await service.get_rollout(rig.product, rollout["id"])
            first = set(view.rollout.members(0))
            rest = set(ids) - first
            print("devices:", ids, "phase 1:", sorted(first))
            assert len(first) == 3 and rest, first
            await fleet.wait_until(_on(2, first), timeout=ROLLOUT_STEP)
            with trio.fail_after(ROLLOUT_STEP):
                while (await show_rollout(rig, rollout["id"]))["phases"][0]["counts"][
                        "succeeded"] < len(first):
                    await trio.sleep(0.05)

            response = await rig.api.post(
                f"/v1/products/{rig.product}/rollouts/{rollout['id']}/abort",
                json={"reason": "operator: stop here"})
            assert response.status_code == 200, response.text
            shown = await show_rollout(rig, rollout["id"])
            assert shown["state"] == "aborted" and "stop here" in shown["reason"]

            # Every device starts a fresh session after the abort: its target is decided
            # again from the store, and the engine's check of it finishes.
            for device_id in ids:
                await rig.reconnect(fleet, device_id)
                await rig.engine_done(device_id)
            for device_id in first:  # kept: the aborted rollout steers it to v2, no offer
                device = (await service.get_device(rig.product, device_id)).record
                product = await trio.to_thread.run_sync(_product_record, rig, rig.product)
                offer = await service.rollout_offer(device, product)
                assert offer is not None and offer.steers and not offer.new_offer
                assert offer.decision.verdict is Verdict.SUCCEEDED and offer.version == 2
                assert flash_statuses(rig.events, device_id).count("started") == 1
            assert all(product_version(fleet, d) == 2 for d in first)
            assert all(product_version(fleet, d) == 1 for d in rest)
            assert transfers_of(rig.events, 1) == {}  # nobody was ever offered v1
            assert set(transfers_of(rig.events, 2)) == first  # nor v2 outside phase 1

            # A release made after the abort supersedes it: the kept devices follow it.
            await rig.release(1, product_default=True, intelligent=True)
            await fleet.wait_until(_on(1, set(ids)), timeout=ROLLOUT_STEP)
            assert set(transfers_of(rig.events, 1)) == first

            # A later rollout reaches everyone and becomes the release.
            good = await create_rollout(rig, 3, phases="100", force=True)
            with trio.fail_after(ROLLOUT_STEP):
                while (await show_rollout(rig, good["id"]))["state"] != "completed":
                    await trio.sleep(0.1)
            await fleet.wait_until(_on(3, set(ids)), timeout=ROLLOUT_STEP)
