"""The one registry of live device sessions (the transport's, read through
server.devices.live): a real server and an emulated device over each transport, its
sessions replaced and ended."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from otacore.protocol.link import Transport
from server.devices.plane import DevicePlane
from tests.test_ota_e2e_kit import STEP, SYSTEM_5003, TRANSPORTS, OtaRig, ota_rig, running


def _plane(rig: OtaRig) -> DevicePlane:
    plane = rig.kit.handle.devices
    assert plane is not None
    return plane


async def _live_session_with_updater(rig: OtaRig, device_id: str) -> None:
    plane = _plane(rig)
    with trio.fail_after(STEP):
        while plane.live.updater(device_id) is None:
            await trio.sleep(0.01)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_one_registry_follows_sessions_replaced_and_ended(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        plane, engine = _plane(rig), rig.engine
        fleet = rig.fleet([(device_id, transport)])
        async with running(fleet):
            await rig.wait_device(device_id, lambda d: d["online"] and d["modules"])
            await _live_session_with_updater(rig, device_id)
            first = plane.live[device_id]
            # One map: the plane's sessions, the engine's updaters and the transport's
            # session all name the same live session.
            assert plane.sessions is plane.live and len(plane.live) == 1
            assert engine.updaters[device_id] is first.updater
            assert dict(engine.updaters) == {device_id: first.updater}
            assert plane.registry.get(device_id) is first.session
            # The plane's map is a view of the transport's registry: no map of its own.
            assert first.session.handler is first
            assert plane.registry.handler(device_id) is first
            assert list(plane.live) == [device_id] and plane.live.owns(first)
            # A new session of the device takes it over; the old one's end leaves it alone.
            await rig.reconnect(fleet, device_id)
            await _live_session_with_updater(rig, device_id)
            second = plane.live[device_id]
            assert second is not first and second.updater is not first.updater
            assert not plane.live.owns(first) and plane.live.owns(second)
            assert engine.updaters[device_id] is second.updater
            assert plane.registry.get(device_id) is second.session
            assert plane.live[device_id] is second and len(plane.live) == 1
            await rig.engine_done(device_id)
        # The device is off (it sent no goodbye); its last session ends (by this cut, or
        # over TCP by then already: the emulator closes a cut device's sockets at once, as
        # a kernel does a killed process's): nothing of it is left in the registry, nor
        # its memory.
        rig.cut(device_id)
        await rig.wait_device(device_id, lambda d: not d["online"])
        with trio.fail_after(STEP):
            while device_id in plane.live:
                await trio.sleep(0.01)
        assert engine.updaters == {} and len(plane.live) == 0
        assert plane.live.updater(device_id) is None and plane.live.get(device_id) is None
        assert plane.registry.get(device_id) is None
        assert device_id not in engine.delivered and device_id not in engine.failed
        assert device_id not in engine.updating
