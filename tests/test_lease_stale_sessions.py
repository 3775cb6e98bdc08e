"""A node never acts on a device whose session lease another node holds (issue 16 item 3):
when a renewal of the node's leases finds a live session's lease taken elsewhere (the device
reconnected to another node while this one still had its session, e.g. across a network
split), the node closes its stale session, and that session's end leaves the other node's
presence alone. A real server and real devices (TLS and DTLS); the other node is a second
Fleet on the same store; renewals are called directly (the renewal loop's period is long)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from server.events import EventBus
from server.fleet import Fleet
from server.leases import SessionLeaseKeeper
from server.store import Store
from server.store import schema as t
from tests.device_client import LinkDevice
from tests.device_server import start_device_server


def _presence(store: Store, device_id: str) -> tuple[bool, str | None, str | None]:
    d = t.devices.c
    with store.read() as tx:
        row = tx.conn.execute(sa.select(d.online, d.session_owner, d.session_node)
                              .where(d.id == device_id)).one()
    return bool(row[0]), row[1], row[2]


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_a_session_whose_lease_another_node_took_is_closed(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=2, session_lease=600.0,
                                    lease_renew_interval=300.0, node_id="node-a")
    handle = kit.handle
    keeper = handle.session_leases
    assert isinstance(keeper, SessionLeaseKeeper) and handle.node_id == "node-a"
    stale_id, kept_id = kit.device_ids
    devices = []
    for device_id in (stale_id, kept_id):
        device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                          kit.address(transport))
        await device.hello()
        devices.append(device)
    plane = handle.devices
    assert plane is not None
    with trio.fail_after(30):
        while not all(_presence(handle.store, d)[::2] == (True, "node-a")
                      for d in (stale_id, kept_id)):
            await trio.sleep(0.02)
    renewed = await keeper.renew()
    assert renewed == 2 and keeper.closed_stale == 0

    # Node B: the device reconnected there (its session there takes the lease).
    other = Store.open_dir(kit.data_dir, pool_size=1)
    try:
        fleet_b = Fleet(other, EventBus())
        fleet_b.configure_session_leases("node-b", 600.0)
        await fleet_b.device_online(stale_id, session="main-1/1")
        assert await keeper.renew() == 1
        assert stale_id in plane.live  # missing once: maybe a write not yet committed
        await keeper.renew()
        assert keeper.closed_stale == 1
        with trio.fail_after(30):
            while stale_id in plane.live:
                await trio.sleep(0.02)
        # The stale session's end left B's presence alone; the other device is served on.
        assert _presence(handle.store, stale_id) == (True, "main-1/1", "node-b")
        assert kept_id in plane.live and _presence(handle.store, kept_id)[::2] == (True, "node-a")
        await keeper.renew()
        assert keeper.closed_stale == 1
    finally:
        other.close()
        for device in devices:
            await device.aclose()
