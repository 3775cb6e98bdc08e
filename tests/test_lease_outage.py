"""The session sweeper after the database was away longer than a session lease (a restart,
a crash, a cut): no node could renew its sessions' leases meanwhile, so every lease in the
database has expired although the sessions are alive. The sweeper must give the nodes one
lease's time to renew before it sweeps, else it marks the whole fleet offline and every
node then closes every session as "lease lost" (a reconnection of every device at once).

Two "nodes" are Store objects on one database (SQLite and PostgreSQL) with a settable wall
clock (tests/test_leases.py); the sweeper's own time is trio's MockClock, so its rounds
are causal steps, not waits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import trio
from trio.testing import MockClock

from server.devices.tally import Tally
from server.leases import sweep_expired_sessions
from server.store import Store
from tests.test_leases import (
    DEVICE,
    LEASE_MS,
    OTHER,
    Clock,
    _add_devices,
    _fleet,
    _presence,
    _statuses,
)


async def test_the_sweeper_spares_the_leases_their_nodes_renew_after_an_outage(
    store: Store, reopen: Callable[..., Store], autojump_clock: MockClock
) -> None:
    _add_devices(store)
    clock = Clock()
    sweeper_node, sweeper_events = _fleet(store, "node-a", clock)
    store_b = reopen()
    live_node, _ = _fleet(store_b, "node-b", clock)
    dead_node, _ = _fleet(reopen(), "node-c", clock)
    await live_node.device_online(DEVICE, session="main-7/1")
    await dead_node.device_online(OTHER, session="main-9/1")
    # The database was away for two leases: nobody renewed, every lease has expired.
    clock.advance(2 * LEASE_MS)
    steps = Tally()
    interval = LEASE_MS / 1000 / 3  # the lease renewal interval
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(sweep_expired_sessions, sweeper_node, interval,
                                   steps=steps))
        await steps.reached(1)  # the sweeper's first round since the database is back
        # Node B's next renewal, within one renewal interval of the return (in the trio
        # thread: no MockClock time passes meanwhile). Node C is dead: it never renews.
        with store_b.write() as tx:
            renewed = tx.renew_session_leases("node-b", "main-7", clock.now + LEASE_MS)
        assert renewed == [(DEVICE, "main-7/1")]
        await steps.reached(5)  # one lease later: it has swept
        nursery.cancel_scope.cancel()
    assert _presence(store, DEVICE)[:3] == (True, "main-7/1", "node-b")  # spared
    assert _presence(store, OTHER)[0] is False  # the dead node's device: swept
    assert _statuses(sweeper_events) == [("offline", OTHER)]
