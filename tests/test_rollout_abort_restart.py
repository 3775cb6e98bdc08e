"""Phase membership survives a real server restart (issue 15, done-when: "the same devices
are in phase 1 after a server restart"), and the rollout goes on from where it was: a real
``serve`` on a real SQLite file is shut down mid-rollout (phase 1 open, some outcomes
recorded) and a new one started on the same data directory; it places the same devices in
phase 1, keeps their outcomes, and opens phase 2 once phase 1 succeeds. Then the same over
real TLS 1.3 and DTLS 1.2 sockets: emulated devices ride through a graceful restart of a
paused rollout, which the new server resumes and completes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from otacore.signing import TrustStore
from server.app import ServerConfig, ServerHandle, serve
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.fleet import EmulatedFleet
from server.fleet import SYSTEM_ACTOR
from tests.device_server import start_device_server
from tests.test_device_session_restart_twice import start_first_server
from tests.test_ota_e2e_kit import (
    APP_V1,
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    EventLog,
    OtaRig,
    app,
    running,
)

DEVICES = 12


async def _serve_again(nursery: trio.Nursery, data_dir: Path) -> ServerHandle:
    config = ServerConfig(data_dir=data_dir, api_port=0, device_port=0, store_threads=4,
                          graceful_timeout=0.5)
    handle: ServerHandle = await nursery.start(serve, config)
    return handle


async def test_phase_membership_and_progress_survive_a_server_restart(tmp_path: Path) -> None:
    async with trio.open_nursery() as first_nursery:
        kit = await start_device_server(first_nursery, tmp_path, count=DEVICES)
        async with kit.api() as api:
            files = {"binary": ("firmware.bin", app(2), "application/octet-stream")}
            response = await api.post(f"/v1/products/{kit.product_id}/firmware",
                                      data={"version": "2", "title": "v2"}, files=files)
            assert response.status_code == 201, response.text
            response = await api.post(f"/v1/products/{kit.product_id}/rollouts",
                                      json={"version": 2, "phases": "50,100", "force": True})
            assert response.status_code == 201, response.text
            rollout_id = response.json()["rollout"]["id"]
        fleet = kit.handle.fleet
        view = await fleet.get_rollout(kit.product_id, rollout_id)
        first = sorted(view.rollout.members(0))
        later = sorted(view.rollout.members(1))
        print("phase 1:", first, "phase 2:", later)  # the device ids are random
        # Half of 12 by a stable hash: neither phase is empty but once in 2000 runs.
        assert first and later and len(first) + len(later) == DEVICES, (first, later)
        # Mid-rollout: the first device of phase 1 took the update, the second is offered.
        await fleet.record_rollout_outcome(kit.product_id, rollout_id, first[0], "succeeded")
        if len(first) > 1:
            await fleet.record_rollout_outcome(kit.product_id, rollout_id, first[1], "offered")
        kit.handle.shutdown.set()  # a graceful stop, then the first server is gone

    async with trio.open_nursery() as second_nursery:
        handle = await _serve_again(second_nursery, kit.data_dir)
        fleet = handle.fleet
        view = await fleet.get_rollout(kit.product_id, rollout_id)
        assert sorted(view.rollout.members(0)) == first
        assert sorted(view.rollout.members(1)) == later
        shown = view.to_dict()
        assert shown["state"] == "running", shown
        assert [p["opened_at"] is not None for p in shown["phases"]] == [True, False]
        assert shown["phases"][0]["counts"]["succeeded"] == 1, shown["phases"][0]
        # A device of phase 2 may not be offered yet; the rollout goes on from here.
        decision = await fleet.rollout_offer_decision(kit.product_id, rollout_id, later[0])
        assert not decision.allowed and decision.verdict.value == "phase_not_open"
        for device_id in first[1:]:
            await fleet.record_rollout_outcome(kit.product_id, rollout_id, device_id,
                                               "succeeded")
        view = await fleet.get_rollout(kit.product_id, rollout_id)
        shown = view.to_dict()
        assert [p["opened_at"] is not None for p in shown["phases"]] == [True, True], shown
        assert [e["kind"] for e in shown["events"]].count("phase_started") == 2
        decision = await fleet.rollout_offer_decision(kit.product_id, rollout_id, later[0])
        assert decision.allowed, decision
        handle.shutdown.set()


async def test_a_paused_rollout_goes_on_over_real_sockets_after_a_restart(
    tmp_path: Path,
) -> None:
    """Emulated devices (both transports) stay connected through a graceful restart of the
    server mid-rollout (paused in phase 1); the new server places the same devices in phase
    1, and once resumed the rollout completes with every device on v2."""
    async with trio.open_nursery() as outer:
        kit_box: list[Any] = []
        stopped = trio.Event()

        async def first_server(task_status: trio.TaskStatus[None]) -> None:
            async with trio.open_nursery() as nursery:
                kit_box.append(await start_first_server(nursery, tmp_path, count=DEVICES))
                task_status.started()
            stopped.set()  # serve returned: its shutdown finished, its ports are free

        await outer.start(first_server)
        kit = kit_box[0]
        trust = TrustStore.initial(kit.product_id, read_trust_file(kit.creds_dir / TRUST_FILE))
        async with kit.api() as api:
            rig = OtaRig(kit, api, EventLog(), trust, tmp_path / "state", outer)
            await rig.upload_device_os(SYSTEM_5003)
            await rig.upload(1, APP_V1)
            await rig.release(1, product_default=True)
            await rig.upload(2, app(2))
            fleet = rig.fleet([(d, TRANSPORTS[i % 2]) for i, d in enumerate(rig.ids)])
            async with running(fleet):
                await fleet.wait_until(_on(1, rig.ids), timeout=4 * STEP)
                response = await api.post(f"/v1/products/{kit.product_id}/rollouts",
                                          json={"version": 2, "phases": "#3,all",
                                                "force": True})
                assert response.status_code == 201, response.text
                rollout_id = response.json()["rollout"]["id"]
                response = await api.post(
                    f"/v1/products/{kit.product_id}/rollouts/{rollout_id}/pause", json={})
                assert response.status_code == 200, response.text
                view = await kit.handle.fleet.get_rollout(kit.product_id, rollout_id)
                first = sorted(view.rollout.members(0))
                assert len(first) == 3, first
                kit.handle.shutdown.set()  # a graceful stop mid-rollout
                with trio.fail_after(STEP):
                    await stopped.wait()

                async with trio.open_nursery() as second_nursery:
                    config = ServerConfig(data_dir=kit.data_dir, api_port=0,
                                          device_port=kit.udp[1], store_threads=4,
                                          graceful_timeout=0.5)
                    handle: ServerHandle = await second_nursery.start(serve, config)
                    service = handle.fleet
                    view = await service.get_rollout(kit.product_id, rollout_id)
                    assert sorted(view.rollout.members(0)) == first
                    assert view.state.value == "paused"
                    await service.resume_rollout(SYSTEM_ACTOR, kit.product_id, rollout_id)
                    with trio.fail_after(4 * STEP):
                        while (await service.get_rollout(kit.product_id, rollout_id)
                               ).state.value != "completed":
                            await trio.sleep(0.1)
                    await fleet.wait_until(_on(2, rig.ids), timeout=4 * STEP)
                    handle.shutdown.set()
        outer.cancel_scope.cancel()


def _on(version: int, devices: list[str]) -> Any:
    def check(fleet: EmulatedFleet) -> bool:
        return all(
            fleet.device(d).device.status().product_version == version
            and fleet.device(d).device.status().phase.value == "online"
            for d in devices
        )

    return check
