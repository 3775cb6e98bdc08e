"""A session that ended while the store could not record it (its device's offline write
failed: the database was restarting, had crashed, or was cut off) must not leave its
device "online" for good: the process's lease renewal extends every lease of the process,
that one included, so nothing else would ever free it. The process's lease keeper marks
such a device offline at its second renewal (one renewal may come before a new session's
handler is registered), and only while that ended session still owns the device. (A
worker process runs its own keeper: tests/test_lease_workers.py.)

A real server and real devices; the ended session's presence is written as the session
left it (online, owned by a presence token of this process that no live session holds);
renewals are called directly (the renewal loop's period is long)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
import trio

from server.leases import SessionLeaseKeeper
from server.store import schema as t
from tests.device_client import LinkDevice
from tests.device_server import start_device_server
from tests.test_lease_stale_sessions import _presence


async def test_a_device_whose_session_here_ended_unrecorded_is_marked_offline(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=3, session_lease=600.0,
                                    lease_renew_interval=300.0, node_id="node-a")
    handle, plane = kit.handle, kit.handle.devices
    keeper = handle.session_leases
    assert isinstance(keeper, SessionLeaseKeeper) and plane is not None
    live_id, ended_id, other_process_id = kit.device_ids
    device = await LinkDevice.connect(kit.creds_dir, live_id, "tcp", kit.address("tcp"))
    try:
        await device.hello()
        with trio.fail_after(30):
            while _presence(handle.store, live_id)[::2] != (True, "node-a"):
                await trio.sleep(0.02)
        # What a session of this process leaves when its offline write failed, and a
        # session of another process of the node (a worker's: not this process's to judge).
        ended = f"{plane.origin}/999999"
        d = t.devices.c
        with handle.store.write() as tx:
            for device_id, owner in ((ended_id, ended), (other_process_id, "worker-2/7")):
                tx.conn.execute(sa.update(t.devices).where(d.id == device_id).values(
                    online=True, session_owner=owner, session_node="node-a",
                    session_lease_until=1))
        assert await keeper.renew() == 2  # every lease of the process, the ended one too
        assert _presence(handle.store, ended_id) == (True, ended, "node-a")  # once: maybe new
        assert await keeper.renew() == 2
        assert keeper.freed_ended == 1
        assert _presence(handle.store, ended_id) == (False, None, None)
        # The live session and the other process's lease are left alone.
        assert _presence(handle.store, live_id)[::2] == (True, "node-a")
        assert live_id in plane.live and keeper.closed_stale == 0
        assert _presence(handle.store, other_process_id) == (True, "worker-2/7", "node-a")
        with handle.store.read() as tx:  # not renewed: the other process renews its own
            assert tx.conn.execute(sa.select(d.session_lease_until)
                                   .where(d.id == other_process_id)).scalar_one() == 1
        assert await keeper.renew() == 1
        assert keeper.freed_ended == 1
    finally:
        await device.aclose()
