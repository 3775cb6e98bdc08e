"""Two real ``ota server`` nodes ride out a restart of their PostgreSQL database.

Nodes A and B (``tests.test_relay_nodes.two_nodes``) share a database on a private
throwaway cluster of this test's own (restarting the session's shared cluster would break
the other tests' databases); emulated devices of both transports are online on node B and
the test talks to node A's API. The database is taken away, first as an operator's
``pg_ctl stop -m fast`` (every session terminated), then as a crash (``-m immediate``: the
server processes killed, crash recovery at the next start), and brought back. Meanwhile a
client keeps asking both nodes' APIs to read and to write. Then:

* every API answer was a 2xx or, while the database was away, a 503 with a message that
  says so: never a 500, and both APIs answer 2xx again soon after the database is back;
* every write the API acknowledged (2xx) is in the database afterwards (the cluster runs
  with ``synchronous_commit = on`` here, so a commit PostgreSQL acknowledged survives its
  crash: the test checks the server, not the throwaway cluster's durability shortcuts);
* the devices are still online, in their sessions (no reconnection) and in the store;
* an immediate release made through node A after the restart reaches every device on node
  B in its session: node B's relay is LISTENing again (its safety poll is set to an hour
  here, so only a notification, or the catch-up read of a new listening connection,
  delivers it);
* neither node exited.

A second test keeps the database away for longer than a session lease (short leases
here): no node can renew meanwhile, so every lease has expired when it returns. The
sweeper must let the nodes renew first (``server.leases.sweep_expired_sessions``), yet
still sweep the device of a node that really died: B's devices stay online, in their
sessions. (Whether the sweeper or B's renewal comes first without that grace depends on
timing; tests/test_lease_outage.py is the deterministic check of it.)

The times printed (database away -> first 503, back -> first 2xx) are this run's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import trio

from server.emulator.fleet import EmulatedFleet
from server.events import FLASH_STATUS, STATUS
from server.fleet.sessions import DESCRIBE_CHANGED
from server.leases import now_ms
from server.store import Store
from server.store import schema as t
from server.store.pg_cluster import PgCluster, create_database
from tests.server_nodes import release, upload
from tests.test_ota_e2e_kit import app, updated_to
from tests.test_relay_nodes import DEVICES, Installation, two_nodes

#: Only a notification (or a new listening connection's catch-up) makes a relay read.
NOTIFIED_ONLY = ("--set", "relay.missed_notification_poll=3600")
#: Generous bound on each wait (a busy 2-core machine; the printed figures are the truth).
STEP = 60.0


@pytest.fixture
def private_cluster() -> Iterator[PgCluster]:
    """A throwaway cluster of this test's own; commits are synchronous (see module doc)."""
    cluster = PgCluster.start(settings={"synchronous_commit": "on"})
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Prober:
    """Keeps asking one node's API to read (list devices) and to write (create a group),
    and notes every answer."""

    api: httpx.AsyncClient
    product: int
    name: str
    statuses: list[tuple[float, int, str]] = field(default_factory=list)
    #: Groups whose creation the API acknowledged (2xx).
    acknowledged: list[str] = field(default_factory=list)
    serial: Iterator[int] = field(default_factory=itertools.count)

    async def run(self) -> None:
        while True:
            group = f"{self.name}-{next(self.serial)}"
            response = await self.api.post(f"/v1/products/{self.product}/groups",
                                           json={"name": group})
            self.note(response)
            if response.is_success:
                self.acknowledged.append(group)
            self.note(await self.api.get(f"/v1/products/{self.product}/devices"))
            await trio.sleep(0.02)

    def note(self, response: httpx.Response) -> None:
        self.statuses.append((trio.current_time(), response.status_code, response.text))

    def seen(self, status: int, after: float) -> float | None:
        """When the first answer with ``status`` after ``after`` came (None: none yet)."""
        return next((at for at, code, _ in self.statuses if code == status and at > after),
                    None)

    def unexpected(self) -> list[tuple[int, str]]:
        """Answers other than 2xx and a 503 that says the database is unavailable."""
        return [(code, text) for _, code, text in self.statuses
                if not (200 <= code < 300 or (code == 503 and "database" in text))]


async def wait_for(prober: Prober, status: int, after: float) -> float:
    with trio.fail_after(STEP):
        while (at := prober.seen(status, after)) is None:
            await trio.sleep(0.01)
    return at


async def test_two_nodes_ride_out_a_fast_and_a_crash_restart_of_the_database(
    private_cluster: PgCluster, tmp_path: Path
) -> None:
    db_url = create_database(private_cluster.url(), "ota")
    async with two_nodes(db_url, tmp_path, NOTIFIED_ONLY) as nodes, \
            trio.open_nursery() as nursery:
        product, api_a = nodes.product, nodes.api_a
        for version in (2, 3):
            await upload(api_a, product, version, app(version))
        fleet = nodes.fleet()
        await nursery.start(fleet.run)
        await fleet.wait_until(lambda f: f.summary().online == DEVICES, timeout=STEP)
        await settled(nodes, DESCRIBE_CHANGED, 0.0)
        sessions = {d: fleet.device(d).device.sessions for d in nodes.ids}

        async with httpx.AsyncClient(base_url=nodes.node_b.api_url, timeout=STEP,
                                     headers=dict(api_a.headers)) as api_b:
            probers = [Prober(api_a, product, "a"), Prober(api_b, product, "b")]
            async with trio.open_nursery() as probing:
                for prober in probers:
                    probing.start_soon(prober.run)
                for mode, version in (("fast", 2), ("immediate", 3)):
                    sessions = await restart_and_release(
                        private_cluster, mode, version, probers, nodes, fleet, sessions)
                probing.cancel_scope.cancel()
        for prober in probers:
            assert prober.unexpected() == [], prober.unexpected()[:3]
            print(f"node {prober.name}: {len(prober.statuses)} answers, "
                  f"{sum(code == 503 for _, code, _ in prober.statuses)} of them 503")
        # Every acknowledged write is in the database.
        response = await api_a.get(f"/v1/products/{product}/groups")
        assert response.status_code == 200, response.text
        stored = {group["name"] for group in response.json()["groups"]}
        for prober in probers:
            assert set(prober.acknowledged) <= stored
        nursery.cancel_scope.cancel()


async def settled(nodes: Installation, name: str, after: float, data: str | None = None
                  ) -> None:
    """Wait until node A's stream showed event ``name`` (with ``data``) of every device
    after ``after``: its write committed (node A relays it from the database)."""
    def seen(device_id: str) -> bool:
        return any(at >= after and event["event"] == name and event["coreid"] == device_id
                   and data in (None, event["data"]) for at, event in nodes.stream.events)

    with trio.fail_after(STEP):
        while not all(seen(d) for d in nodes.ids):
            await trio.sleep(0.01)


async def restart_and_release(cluster: PgCluster, mode: str, version: int,
                              probers: list[Prober], nodes: Installation,
                              fleet: EmulatedFleet, sessions: dict[str, int]
                              ) -> dict[str, int]:
    """Stop the database (``mode``) until both APIs said 503, start it again, check the
    nodes (module doc) and release ``version`` through node A; the devices' session counts
    after the release."""
    product, api_a = nodes.product, nodes.api_a
    await trio.to_thread.run_sync(cluster.shut_down, mode)
    down = trio.current_time()
    refused = [await wait_for(prober, 503, down) for prober in probers]
    await trio.to_thread.run_sync(cluster.start_again)
    up = trio.current_time()
    answered = [await wait_for(prober, 201, up) for prober in probers]
    print(f"database stopped ({mode}) -> first 503: {max(refused) - down:.2f} s; started "
          f"again -> first 201 on both nodes: {max(answered) - up:.2f} s")

    # The devices kept their sessions, and the store says they are online.
    assert fleet.summary().online == DEVICES
    assert {d: fleet.device(d).device.sessions for d in nodes.ids} == sessions
    response = await api_a.get(f"/v1/products/{product}/devices")
    assert response.status_code == 200, response.text
    assert all(d["online"] for d in response.json()["devices"]), response.text

    # An immediate release through A reaches B's devices, in their sessions.
    released = trio.current_time()
    await release(api_a, product, version)
    await fleet.wait_until(lambda f: all(updated_to(d, version)(f) for d in nodes.ids),
                           timeout=STEP)
    print(f"release v{version} through node A after the restart -> every device on node B "
          f"updated: {trio.current_time() - released:.2f} s")
    sessions = {d: n + 1 for d, n in sessions.items()}  # the reboot into the new version
    # Each device's session after the reboot recorded its update's result (the last thing
    # it says, after its Describe) before the next restart: a device whose write is under
    # way when the database goes may rightly lose its session (it is told to try again);
    # an idle one must not.
    await settled(nodes, FLASH_STATUS, released, "success ")
    assert {d: fleet.device(d).device.sessions for d in nodes.ids} == sessions
    assert nodes.node_a.process.returncode is None
    assert nodes.node_b.process.returncode is None
    return sessions


#: Short session leases (seconds), so that an outage longer than one is short too.
LEASE = 3.0
SHORT_LEASES = ("--session-lease", str(LEASE), "--lease-renew-interval", "0.5")
#: A device a third node held when it died (not part of the emulated fleet).
DEAD_NODES_DEVICE = "0123456789abcdef0123dead"


def leave_a_dead_nodes_device(db_url: str, tmp_path: Path, product: int) -> None:
    """A device online under node C, whose lease expires within a second (C died)."""
    store = Store.open(db_url, tmp_path / "dead-node-blobs", pool_size=1)
    try:
        now = now_ms()
        with store.write() as tx:
            tx.insert_device(DEAD_NODES_DEVICE, product, now)
            tx.conn.execute(sa.update(t.devices).where(t.devices.c.id == DEAD_NODES_DEVICE)
                            .values(online=True, session_owner="node-c:main-1/1",
                                    session_node="node-c", session_lease_until=now + 1000))
    finally:
        store.close()


async def test_a_database_away_for_longer_than_a_session_lease_keeps_the_sessions(
    private_cluster: PgCluster, tmp_path: Path
) -> None:
    """While the database is away no node renews its leases: after an outage longer than a
    lease, every lease in it has expired although the sessions are alive. The sweeper must
    let the nodes renew first (one lease's grace), and still sweep a dead node's device."""
    db_url = create_database(private_cluster.url(), "ota")
    async with two_nodes(db_url, tmp_path, (*NOTIFIED_ONLY, *SHORT_LEASES)) as nodes, \
            trio.open_nursery() as nursery:
        product, api_a = nodes.product, nodes.api_a
        fleet = nodes.fleet()
        await nursery.start(fleet.run)
        await fleet.wait_until(lambda f: f.summary().online == DEVICES, timeout=STEP)
        await settled(nodes, DESCRIBE_CHANGED, 0.0)
        sessions = {d: fleet.device(d).device.sessions for d in nodes.ids}
        await trio.to_thread.run_sync(leave_a_dead_nodes_device, db_url, tmp_path, product)

        await trio.to_thread.run_sync(private_cluster.shut_down, "fast")
        await trio.sleep(2 * LEASE)  # every lease in the database expires meanwhile
        await trio.to_thread.run_sync(private_cluster.start_again)
        up = trio.current_time()
        # The sweeper's first sweep since the database came back: the dead node's device.
        swept = await nodes.stream.wait_for(STATUS, DEAD_NODES_DEVICE, "offline", timeout=STEP)
        print(f"database back -> the dead node's device swept: {swept - up:.2f} s")
        # By then node B had renewed its leases: its devices are online in the store, and
        # kept their sessions.
        response = await api_a.get(f"/v1/products/{product}/devices")
        assert response.status_code == 200, response.text
        online = {d["id"]: d["online"] for d in response.json()["devices"]}
        assert online == {**dict.fromkeys(nodes.ids, True), DEAD_NODES_DEVICE: False}
        assert all(nodes.stream.first(STATUS, d, "offline") is None for d in nodes.ids)
        assert fleet.summary().online == DEVICES
        assert {d: fleet.device(d).device.sessions for d in nodes.ids} == sessions
        assert nodes.node_a.process.returncode is None
        assert nodes.node_b.process.returncode is None
        nursery.cancel_scope.cancel()
