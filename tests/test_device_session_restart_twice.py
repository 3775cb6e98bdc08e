"""Two graceful restarts of ``ota server`` in a row lose no DTLS session (issue 14, item 6).

A process that *restored* its sessions and is stopped gracefully in turn saves every one of
them again, whatever the shutdown's grace: a session is saved as the shutdown closes it,
before its handler's end. A saved session is not over for its device, so the device is not
written offline and gets no ``spark/status`` offline event; a session that is *not* saved
(saving turned off, or the sealed file cannot be written) is still written offline.

Real ``ota server`` processes (in this process, one after the other) on one data directory
and UDP port, real DTLS devices (trio's, OpenSSL inside) that outlive them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from otacore.coap import Code
from otacore.messages import Dependency, ModuleDescription
from server.app import ServerConfig, ServerHandle, serve
from server.cli.device_store_cmd import create_provisioned_product
from server.devices.tuning import DeviceTuning
from server.events import STATUS, Event, EventBus
from server.store import Store
from server.transport.session_host import RefuseReason
from server.transport.udp_saved import SAVED_SESSIONS_FILE
from tests.device_client import LinkDevice
from tests.device_server import DeviceServerKit
from tests.ota_server_process import free_device_port

PATIENCE = 30
#: Devices per test: enough that the sessions' ends overlap, few enough for a quick test.
DEVICES = 6
MODULES = [
    ModuleDescription(4, 1, 5003, 0, 600_000, bytes(range(32)), (Dependency(2, 0, 2001),)),
    ModuleDescription(5, 1, 7, 0, 90_000, bytes(32), (Dependency(4, 1, 5003),)),
]


class StatusLog:
    """The product's spark/status events published on one server's bus, from
    :meth:`attach` until the ``stack`` closes (it may outlive the server)."""

    def __init__(self, bus: EventBus, product_id: int, stack: ExitStack) -> None:
        self._subscription = stack.enter_context(
            bus.subscribe(product_id=product_id, name_prefix=STATUS))
        self.events: list[Event] = []

    def offline(self) -> list[str | None]:
        """Device ids of the offline events so far (each comes with its store write)."""
        while True:  # the bus never blocks: what was published is in the buffer
            try:
                self.events.append(self._subscription.receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        return [e.device_id for e in self.events if e.data == "offline"]


async def _connect_all(kit: DeviceServerKit) -> list[LinkDevice]:
    devices = []
    for device_id in kit.device_ids:
        device = await LinkDevice.connect(kit.creds_dir, device_id, "udp", kit.udp)
        devices.append(device)
        assert (await device.hello(product_version=7)).code == Code.CHANGED
        assert (await device.describe(MODULES)).code == Code.CHANGED
    return devices


async def _until_all_live(handle: ServerHandle, device_ids: list[str]) -> None:
    assert handle.devices is not None
    with trio.fail_after(PATIENCE):
        while any(handle.devices.live.get(d) is None for d in device_ids):
            await trio.sleep(0.01)


async def _served_on_old_sessions(devices: list[LinkDevice]) -> None:
    """Every device is served on its DTLS session: a 2.04 to an event, which only a
    session that knows the device's product gives."""
    for device in devices:
        assert not device.closed
        assert (await device.publish("temperature", "21")).code == Code.CHANGED


async def start_first_server(nursery: trio.Nursery, tmp_path: Path,
                             tuning: DeviceTuning | None = None,
                             count: int = DEVICES) -> DeviceServerKit:
    """The first server process of a restart test: a product with ``count`` provisioned
    devices, both device transports on one port free for both (see free_device_port)."""
    data_dir, creds_dir = tmp_path / "data", tmp_path / "creds"
    product_id, provisioned = await trio.to_thread.run_sync(
        create_provisioned_product, data_dir, creds_dir, "Sensors", 13, count)
    config = ServerConfig(data_dir=data_dir, api_port=0, device_port=free_device_port(),
                          store_threads=4, graceful_timeout=0.5,
                          device_tuning=tuning or DeviceTuning())
    handle: ServerHandle = await nursery.start(serve, config)
    token = handle.fleet.create_api_token_sync("owner").access_token
    return DeviceServerKit(handle, data_dir, creds_dir, [d.device_id for d in provisioned],
                           product_id, token)


@asynccontextmanager
async def _server(kit: DeviceServerKit, udp_port: int,
                  tuning: DeviceTuning | None = None) -> AsyncIterator[ServerHandle]:
    async with trio.open_nursery() as nursery:
        config = ServerConfig(data_dir=kit.data_dir, api_port=0, device_port=udp_port,
                              store_threads=4, graceful_timeout=0.5,
                              device_tuning=tuning or DeviceTuning())
        handle: ServerHandle = await nursery.start(serve, config)
        yield handle


async def test_two_graceful_restarts_in_a_row_lose_no_session(tmp_path: Path) -> None:
    devices: list[LinkDevice] = []
    try:
        # Process 1: N fresh sessions (handshake, Hello, Describe), stopped gracefully.
        with ExitStack() as stack:
            async with trio.open_nursery() as first_nursery:
                kit = await start_first_server(first_nursery, tmp_path)
                first, udp_port = kit.handle, kit.udp[1]
                devices = await _connect_all(kit)
                status = StatusLog(first.bus, kit.product_id, stack)
                first.shutdown.set()
            assert first.device_server is not None and first.device_server.udp_endpoint
            assert first.device_server.udp_endpoint.stats.saved == DEVICES
            # Saved sessions are not over for their devices: not written offline.
            assert status.offline() == []

        # Process 2: restores them all (no handshake), serves every device, then is
        # stopped with no grace at all: its sessions are saved as the shutdown closes
        # them, not once their ends have run.
        with ExitStack() as stack:
            async with _server(kit, udp_port) as second:
                await _served_on_old_sessions(devices)
                await _until_all_live(second, kit.device_ids)
                assert second.device_server is not None and second.device_server.udp_endpoint
                endpoint = second.device_server.udp_endpoint
                assert endpoint.stats.restored == DEVICES
                stats = second.device_server.stats
                assert stats.full_handshakes["udp"] + stats.resumed_handshakes["udp"] == 0
                for device_id in kit.device_ids:
                    assert (await second.fleet.target_for_device(device_id)).device.online
                status = StatusLog(second.bus, kit.product_id, stack)
                await second.device_server.shutdown(grace=0)
                assert endpoint.stats.saved == DEVICES
                second.shutdown.set()
            assert endpoint.stats.saved == DEVICES
            assert status.offline() == []

        # Process 3: every session again, still with no handshake.
        async with _server(kit, udp_port) as third:
            await _served_on_old_sessions(devices)
            assert third.device_server is not None and third.device_server.udp_endpoint
            assert third.device_server.udp_endpoint.stats.restored == DEVICES
            stats = third.device_server.stats
            assert stats.full_handshakes["udp"] + stats.resumed_handshakes["udp"] == 0
            for device_id in kit.device_ids:
                assert (await third.fleet.target_for_device(device_id)).device.online
            third.shutdown.set()
    finally:
        for device in devices:
            await device.aclose()


@pytest.mark.parametrize("why", ["saving turned off", "the sealed file cannot be written"])
async def test_sessions_not_saved_are_written_offline(tmp_path: Path, why: str) -> None:
    devices: list[LinkDevice] = []
    tuning = DeviceTuning()
    if why == "saving turned off":
        tuning = replace(tuning, save_dtls_sessions=False)
    try:
        with ExitStack() as stack:
            async with trio.open_nursery() as nursery:
                kit = await start_first_server(nursery, tmp_path, tuning)
                handle = kit.handle
                devices = await _connect_all(kit)
                assert handle.device_server is not None
                vault = handle.device_server.vault
                if why == "the sealed file cannot be written":
                    assert vault is not None
                    # A directory where the file goes: the atomic rename onto it fails.
                    (vault.directory / SAVED_SESSIONS_FILE).mkdir()
                else:
                    assert vault is None
                status = StatusLog(handle.bus, kit.product_id, stack)
                handle.shutdown.set()
            endpoint = handle.device_server.udp_endpoint
            assert endpoint is not None
            assert endpoint.stats.saved == (DEVICES if vault is not None else 0)
            # Every device written offline once (the event comes only with the write).
            assert sorted(status.offline()) == sorted(kit.device_ids)
        # The next process starts all the same, restores nothing, and serves handshakes.
        async with _server(kit, kit.udp[1], tuning) as second:
            assert second.device_server is not None and second.device_server.udp_endpoint
            assert second.device_server.udp_endpoint.stats.restored == 0
            device = await LinkDevice.connect(kit.creds_dir, kit.device_ids[0], "udp",
                                              second.device_server.udp_address or kit.udp)
            devices.append(device)
            assert (await device.hello(product_version=7)).code == Code.CHANGED
            second.shutdown.set()
    finally:
        for device in devices:
            await device.aclose()


async def test_restored_devices_are_authorized_again_all_at_once(tmp_path: Path) -> None:
    """The device plane authorizes the restored sessions in one read: a device revoked and
    one removed from its product while the server was down are refused (they get a
    close_notify), the others are served on their sessions."""
    devices: list[LinkDevice] = []
    try:
        async with trio.open_nursery() as first_nursery:
            kit = await start_first_server(first_nursery, tmp_path)
            devices = await _connect_all(kit)
            kit.handle.shutdown.set()
        revoked, removed = sorted(kit.device_ids)[:2]
        store = Store.open_dir(kit.data_dir, pool_size=1)
        try:
            with store.write() as tx:
                tx.revoke_device_certificates(revoked, by="test", now=1)
                tx.delete_device(removed)
        finally:
            store.close()
        async with _server(kit, kit.udp[1]) as second:
            staying = [d for d in devices if d.device_id not in (revoked, removed)]
            await _served_on_old_sessions(staying)
            assert second.device_server is not None and second.device_server.udp_endpoint
            endpoint = second.device_server.udp_endpoint
            with trio.fail_after(PATIENCE):
                while endpoint.stats.restored + sum(endpoint.stats.not_restored.values()) \
                        < DEVICES:
                    await trio.sleep(0.01)
            assert endpoint.stats.restored == DEVICES - 2
            assert endpoint.stats.not_restored == {RefuseReason.NOT_AUTHORIZED: 2}
            for device in devices:
                if device.device_id in (revoked, removed):
                    await device.wait_closed(timeout=PATIENCE)  # the close_notify
            second.shutdown.set()
    finally:
        for device in devices:
            await device.aclose()
