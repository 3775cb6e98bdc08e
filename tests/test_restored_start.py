"""``ota server`` starts the DTLS sessions it restored after a graceful restart in batches
(``server.devices.restored_start``: one presence write and one target read for many
sessions) and loses neither a device nor an update doing so: every restored device is
online with its own session's lease, and a release made while the server was down reaches
every restored device, on its restored session.

Real ``ota server`` processes (in this process, one after the other) on one data directory
and UDP port; real DTLS devices (trio's, OpenSSL inside) that outlive them.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
import trio

from otacore.signing import TrustStore
from server.app import ServerConfig, ServerHandle, serve
from server.devices.keys import TRUST_FILE, read_trust_file
from server.devices.session import DeviceSessionHandler
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.store import Store
from server.store import schema as t
from tests.device_client import LinkDevice
from tests.test_device_session_restart_twice import (
    _connect_all,
    _served_on_old_sessions,
    start_first_server,
)
from tests.test_ota_e2e_kit import SYSTEM_5003, EventLog, OtaRig, app, updated_to

PATIENCE = 30
#: Devices of the update test: several per batch, few enough for a quick test.
DEVICES = 8


def _handlers(handle: ServerHandle, device_ids: list[str]) -> dict[str, DeviceSessionHandler]:
    assert handle.devices is not None
    found = {d: handle.devices.live.get(d) for d in device_ids}
    return {d: h for d, h in found.items() if isinstance(h, DeviceSessionHandler)}


async def _until_restored(handle: ServerHandle, count: int) -> None:
    assert handle.device_server is not None and handle.device_server.udp_endpoint
    endpoint = handle.device_server.udp_endpoint
    with trio.fail_after(PATIENCE):
        while endpoint.stats.restored < count:
            await trio.sleep(0.01)


async def test_every_restored_device_is_online_with_its_sessions_lease(tmp_path: Path) -> None:
    """After the restart every restored device is served on its old session, and the store
    says what one presence write per session said: online, owned by that session (its
    token), on this node, with a lease running; written in fewer batches than sessions."""
    devices: list[LinkDevice] = []
    try:
        async with trio.open_nursery() as first_nursery:
            kit = await start_first_server(first_nursery, tmp_path)
            devices = await _connect_all(kit)
            kit.handle.shutdown.set()
        async with trio.open_nursery() as nursery:
            config = ServerConfig(data_dir=kit.data_dir, api_port=0, device_port=kit.udp[1],
                                  store_threads=4, graceful_timeout=0.5)
            second: ServerHandle = await nursery.start(serve, config)
            await _served_on_old_sessions(devices)
            await _until_restored(second, len(devices))
            handlers = _handlers(second, kit.device_ids)
            assert sorted(handlers) == sorted(kit.device_ids)
            fleet = second.fleet
            with fleet.store.read() as tx:
                rows = {row.id: row for row in tx.conn.execute(
                    sa.select(t.devices).where(t.devices.c.id.in_(kit.device_ids)))}
            now = fleet.clock()
            for device_id, handler in handlers.items():
                row = rows[device_id]
                assert row.online, device_id
                assert row.session_owner == handler.presence, device_id
                assert row.session_node == fleet.session_node
                assert row.session_lease_until > now
                assert row.last_ip_address == "127.0.0.1"
            assert second.devices is not None
            batches = second.devices.restored_starts.batches
            with trio.fail_after(PATIENCE):  # the target read follows the devices' answers
                while batches[1] < 1:
                    await trio.sleep(0.01)
            assert batches[0] < len(devices) and batches[1] < len(devices)
            second.shutdown.set()
    finally:
        for device in devices:
            await device.aclose()


async def test_a_release_made_while_down_reaches_every_restored_device(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Emulated DTLS devices online when ``ota server`` restarts gracefully; a release made
    while it is down (straight into the store) is offered to every device on its restored
    session by the next process, from the grouped target read, and each installs it."""
    async with trio.open_nursery() as devices:  # the devices outlive both servers
        async with trio.open_nursery() as first_nursery:
            kit = await start_first_server(first_nursery, tmp_path, count=DEVICES)
            async with kit.api() as api:
                trust = TrustStore.initial(kit.product_id,
                                           read_trust_file(kit.creds_dir / TRUST_FILE))
                rig = OtaRig(kit, api, EventLog(), trust, tmp_path / "state", first_nursery)
                await rig.upload_device_os(SYSTEM_5003)
                await rig.upload(2, app(2, size=4_000))
            fleet = rig.fleet([(device_id, "udp") for device_id in kit.device_ids])
            await devices.start(fleet.run)
            with trio.fail_after(PATIENCE):
                while len([h for h in _handlers(kit.handle, kit.device_ids).values()
                           if h.described.is_set()]) < DEVICES:  # fmt: skip
                    await trio.sleep(0.01)
            kit.handle.shutdown.set()
        assert kit.handle.device_server is not None
        endpoint = kit.handle.device_server.udp_endpoint
        assert endpoint is not None and endpoint.stats.saved == DEVICES
        store = Store.open_dir(kit.data_dir, pool_size=1)
        try:
            await Fleet(store, EventBus()).release_firmware(
                SYSTEM_ACTOR, kit.product_id, 2, product_default=True, force=True)
        finally:
            store.close()
        config = ServerConfig(data_dir=kit.data_dir, api_port=0, device_port=kit.udp[1],
                              store_threads=4, graceful_timeout=0.5)
        second: ServerHandle = await nursery.start(serve, config)
        await _until_restored(second, DEVICES)
        for device_id in kit.device_ids:
            await fleet.wait_until(updated_to(device_id, 2), timeout=PATIENCE)
        assert second.devices is not None
        assert 1 <= second.devices.restored_starts.batches[1] < DEVICES
        devices.cancel_scope.cancel()
    second.shutdown.set()
