"""Issue 15's done-when, end to end over real TLS 1.3 and DTLS 1.2 sockets: 60 emulated
devices (half on each transport) run v1; a v2 that fails its self-test, rolled out in
phases 10%, 50% and 100% with ``max_failure_percent 20`` and ``on_failure abort``, aborts
in its first phase, no device outside that phase is ever offered it, every device runs v1
at the end and the abort names the rollbacks; then a good v3 rolled out the same way
completes with every device on v3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from otacore.device import make_test_marker
from server.emulator.fleet import EmulatedFleet
from server.store.tx_rollouts import RolloutQueries
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
)

DEVICES = 60
#: The whole rollout's time budget (60 small transfers on two shared cores).
ROLLOUT_STEP = 4 * STEP
POLICY = {"phases": "10,50,100", "max_failure_percent": 20, "on_failure": "abort",
          "force": True}


async def create_rollout(rig: OtaRig, version: int, **policy: Any) -> dict[str, Any]:
    """Create a rollout of ``version`` over REST (``POLICY`` unless ``policy`` is given)."""
    response = await rig.api.post(f"/v1/products/{rig.product}/rollouts",
                                  json={"version": version, **(policy or POLICY)})
    assert response.status_code == 201, response.text
    rollout: dict[str, Any] = response.json()["rollout"]
    return rollout


async def show_rollout(rig: OtaRig, rollout_id: int) -> dict[str, Any]:
    """What ``ota rollout show --json`` prints (what a script polls)."""
    response = await rig.api.get(f"/v1/products/{rig.product}/rollouts/{rollout_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body.get("rollout", body)


async def _wait_state(rig: OtaRig, rollout_id: int, state: str) -> dict[str, Any]:
    with trio.fail_after(ROLLOUT_STEP):
        while True:
            shown = await show_rollout(rig, rollout_id)
            if shown["state"] == state:
                return shown
            assert shown["state"] in ("running", state), shown
            await trio.sleep(0.1)


def _all_on(version: int) -> Any:
    def check(fleet: EmulatedFleet) -> bool:
        return all(
            m.device.status().product_version == version
            and m.device.status().phase.value == "online"
            for m in (fleet.device(d) for d in fleet_ids(fleet))
        )

    return check


def fleet_ids(fleet: EmulatedFleet) -> list[str]:
    return [m.device_id for m in fleet.members]


async def _offered(rig: OtaRig, rollout_id: int) -> dict[str, str | None]:
    """Device -> its outcome in the rollout: the store's record, written (as ``offered``)
    in the write that claims each offer before it is sent (a row without an outcome is
    only the device's placement in a phase)."""
    store = rig.kit.handle.store

    def read() -> dict[str, str | None]:
        with store.read() as tx:
            return {o.device_id: o.outcome
                    for o in RolloutQueries(tx.conn).device_outcomes(rollout_id)
                    if o.outcome is not None}

    return await trio.to_thread.run_sync(read)


async def test_a_bad_release_aborts_in_phase_one_and_a_good_one_completes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with ota_rig(nursery, tmp_path, count=DEVICES) as rig:
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(1, APP_V1)
        await rig.release(1, product_default=True)
        await rig.upload(2, app(2, marker=make_test_marker(selftest_fail_after=0)))
        await rig.upload(3, app(3))
        ids = rig.ids
        fleet = rig.fleet([(d, TRANSPORTS[i % 2]) for i, d in enumerate(ids)])
        async with running(fleet):
            await fleet.wait_until(_all_on(1), timeout=ROLLOUT_STEP)

            bad = await create_rollout(rig, 2)
            view = await rig.kit.handle.fleet.get_rollout(rig.product, bad["id"])
            first = set(view.rollout.members(0))
            # Exactly 10% of 60, the lowest ranks by a stable hash of device and rollout.
            assert len(first) == DEVICES // 10, first
            shown = await _wait_state(rig, bad["id"], "aborted")
            assert "rolled_back" in shown["reason"], shown["reason"]
            aborted = [e for e in shown["events"] if e["kind"] == "aborted"]
            assert len(aborted) == 1 and "rolled_back" in aborted[0]["reason"]
            assert aborted[0]["data"]["failed_by_kind"]["rolled_back"] >= 1
            assert [p["opened_at"] is not None for p in shown["phases"]] == [True, False, False]
            await fleet.wait_until(_all_on(1), timeout=ROLLOUT_STEP)
            # Server side: only phase 1 devices were ever offered v2 (claimed, and a
            # transfer started) ...
            offered = await _offered(rig, bad["id"])
            assert offered and set(offered) <= first, set(offered) - first
            started = {d for d in ids if "started" in flash_statuses(rig.events, d)}
            assert started <= first, started - first
            # ... and after the abort nobody is: every engine check since has finished.
            for device_id in ids:
                await rig.engine_done(device_id)
            assert set(await _offered(rig, bad["id"])) == set(offered)
            # A device rebooting into v2 at the abort had installed it: its rollback still
            # arrives and counts (none is left "rebooting" once every device is on v1).
            counts = (await show_rollout(rig, bad["id"]))["counts"]
            assert counts["rebooting"] == 0 and counts["rolled_back"] >= 1, counts
            assert all(product_version(fleet, d) == 1 for d in ids)

            good = await create_rollout(rig, 3)
            shown = await _wait_state(rig, good["id"], "completed")
            assert shown["counts"]["succeeded"] == DEVICES, shown["counts"]
            kinds = [e["kind"] for e in shown["events"]]
            assert kinds.count("phase_started") == 3 and kinds[-1] == "completed", kinds
            await fleet.wait_until(_all_on(3), timeout=ROLLOUT_STEP)
            # The completed rollout is now the product default release.
            firmware = await rig.firmware(3)
            assert firmware["product_default"] is True, json.dumps(firmware)
