"""Session leases and the named leases of once-per-installation jobs (issue 16 item 3), on
SQLite and PostgreSQL: two "nodes" are two Store objects on one database, each with a
settable clock (epoch ms), so expiry is a clock step, never a wait."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa
import trio
from trio.testing import MockClock

from otacore.errors import ValidationError
from server.events import STATUS, Event, EventBus
from server.fleet import Fleet
from server.leases import JobLease, LeaseTimings, check_lease_timings, sweep_unreferenced_blobs
from server.store import Store
from server.store import schema as t
from server.store.tx_leases import get_lease, list_leases, release_lease, take_lease

T0 = 1_800_000_000_000
LEASE_MS = 30_000
DEVICE = "0123456789abcdef01234567"
OTHER = "0123456789abcdef01234568"


class Clock:
    """A settable wall clock in epoch ms."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


# -- named leases, straight on the store -----------------------------------------------------


def _take(store: Store, holder: str, now: int, name: str = "job") -> bool:
    with store.write() as tx:
        return take_lease(tx.conn, name, holder, now, now + LEASE_MS)


def test_a_free_lease_is_taken_renewed_by_its_holder_and_refused_to_another(
    store: Store, reopen: Callable[..., Store]
) -> None:
    other = reopen()
    assert _take(store, "a/main-1", T0)
    assert not _take(other, "b/main-2", T0 + 1)  # held and not expired
    assert _take(store, "a/main-1", T0 + 20_000)  # renewed: ends 30 s from now
    with store.read() as tx:
        lease = get_lease(tx.conn, "job")
    assert lease is not None
    assert (lease.holder, lease.expires_at, lease.taken_at) == ("a/main-1", T0 + 50_000, T0)
    # The first expiry passed, the renewed one not: still refused.
    assert not _take(other, "b/main-2", T0 + 40_000)


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_renew_it(
    store: Store, reopen: Callable[..., Store]
) -> None:
    other = reopen()
    assert _take(store, "a/main-1", T0)
    assert _take(other, "b/main-2", T0 + LEASE_MS)  # expired exactly now: free
    assert not _take(store, "a/main-1", T0 + LEASE_MS + 1)  # stolen: a renewal fails
    with other.read() as tx:
        lease = get_lease(tx.conn, "job")
    assert lease is not None and (lease.holder, lease.taken_at) == ("b/main-2", T0 + LEASE_MS)


def test_a_released_lease_is_free_at_once_and_only_its_holder_releases_it(
    store: Store, reopen: Callable[..., Store]
) -> None:
    other = reopen()
    assert _take(store, "a/main-1", T0)
    assert _take(store, "a/main-1", T0, name="second")
    with other.write() as tx:
        assert not release_lease(tx.conn, "job", "b/main-2")
    with store.write() as tx:
        assert release_lease(tx.conn, "job", "a/main-1")
    assert _take(other, "b/main-2", T0 + 1)
    with store.read() as tx:
        assert [(lease.name, lease.holder) for lease in list_leases(tx.conn)] == [
            ("job", "b/main-2"), ("second", "a/main-1")]


def test_bad_lease_arguments_are_refused_with_a_reason(store: Store) -> None:
    with store.write() as tx:
        with pytest.raises(ValueError, match="lease name"):
            take_lease(tx.conn, "", "a", T0, T0 + 1)
        with pytest.raises(ValueError, match="lease holder"):
            take_lease(tx.conn, "job", "x" * 97, T0, T0 + 1)
        with pytest.raises(ValueError, match="end after"):
            take_lease(tx.conn, "job", "a", T0, T0)


async def test_racing_nodes_take_a_free_lease_once(
    store: Store, reopen: Callable[..., Store]
) -> None:
    """Eight holders on four stores try to take one free lease at the same moment (real
    threads, real transactions): exactly one gets it."""
    stores = [store, reopen(), reopen(), reopen()]
    results: dict[str, bool] = {}

    async def attempt(index: int) -> None:
        holder = f"node{index}/main-{index}"
        results[holder] = await trio.to_thread.run_sync(_take, stores[index % 4], holder, T0)

    async with trio.open_nursery() as nursery:
        for index in range(8):
            nursery.start_soon(attempt, index)
    assert sum(results.values()) == 1, results


# -- JobLease: a job runs only while its node holds the lease ---------------------------------


async def test_a_job_runs_in_one_node_only_and_moves_when_its_holder_stops(
    store: Store, reopen: Callable[..., Store]
) -> None:
    clock = Clock()
    timings = LeaseTimings(lease=600.0, renew_interval=0.01)
    lease_a = JobLease(store, "job", "a/main-1", timings, clock=clock)
    lease_b = JobLease(reopen(), "job", "b/main-2", timings, clock=clock)
    running: list[str] = []

    def job(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            running.append(name)
            await trio.sleep_forever()
        return run

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as node_a:
            await node_a.start(lease_a.run, job("a"))
            await lease_a.taken.reached(1)
            await nursery.start(lease_b.run, job("b"))
            await lease_b.attempts.reached(3)  # B tried, renewals of A went on
            assert running == ["a"] and lease_a.held and not lease_b.held
            assert lease_a.attempts.value >= 2
            node_a.cancel_scope.cancel()  # a graceful stop releases the lease: B takes it
        await lease_b.taken.reached(1)
        assert running == ["a", "b"] and lease_b.held and not lease_a.held
        nursery.cancel_scope.cancel()
    with store.read() as tx:
        assert get_lease(tx.conn, "job") is None  # B released it too


async def test_a_job_whose_lease_was_stolen_stops_and_its_node_waits(
    store: Store, reopen: Callable[..., Store]
) -> None:
    """Node A stalls past its expiry (its clock stands still, the store's rows do not): B
    takes the lease; A's next renewal fails, and A's job ends when A's lease time is up
    (trio's clock: the job's cancel scope has the lease's deadline)."""
    clock_a, clock_b = Clock(), Clock()
    lease_a = JobLease(store, "job", "a/main-1", LeaseTimings(lease=1.0, renew_interval=0.5),
                       clock=clock_a)
    other = reopen()
    ended = trio.Event()

    async def job() -> None:
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(lease_a.run, job)
        await lease_a.taken.reached(1)
        clock_b.advance(60_000)  # B's view: A's lease expired long ago
        assert await trio.to_thread.run_sync(_take, other, "b/main-2", clock_b.now)
        with trio.fail_after(30):
            await ended.wait()  # A stops: a renewal could not extend its lease
        attempts = lease_a.attempts.value
        await lease_a.attempts.reached(attempts + 1)
        assert not lease_a.held  # B holds it: A keeps asking, and waits
        nursery.cancel_scope.cancel()


def test_lease_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="at most half"):
        check_lease_timings(10.0, 6.0)
    with pytest.raises(ValidationError, match="positive"):
        LeaseTimings(lease=-1.0)
    # Node ids: tests/test_relay_notify.py::test_node_ids_and_origins.


# -- session leases: presence on two nodes ------------------------------------------------------


def _fleet(store: Store, node: str, clock: Clock) -> tuple[Fleet, list[Event]]:
    bus = EventBus()
    published: list[Event] = []
    bus.tap = published.append
    fleet = Fleet(store, bus, clock=clock)
    fleet.configure_session_leases(node, LEASE_MS / 1000)
    return fleet, published


def _add_devices(store: Store) -> int:
    with store.write() as tx:
        product = tx.insert_product(slug="p", name="P", platform_id=13, description="", now=1)
        for device_id in (DEVICE, OTHER):
            tx.insert_device(device_id, product.id, 1)
        return product.id


def _presence(store: Store, device_id: str) -> tuple[bool, str | None, str | None, int | None]:
    d = t.devices.c
    with store.read() as tx:
        row = tx.conn.execute(
            sa.select(d.online, d.session_owner, d.session_node, d.session_lease_until)
            .where(d.id == device_id)).one()
    return bool(row[0]), row[1], row[2], row[3]


def _statuses(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(event.data, event.device_id) for event in events if event.name == STATUS]


async def test_a_session_takes_the_lease_and_its_node_renews_all_in_one_statement(
    store: Store, reopen: Callable[..., Store]
) -> None:
    _add_devices(store)
    clock = Clock()
    fleet_a, _ = _fleet(store, "node-a", clock)
    fleet_b, _ = _fleet(reopen(), "node-b", clock)
    await fleet_a.device_online(DEVICE, session="main-1/1")
    await fleet_b.device_online(OTHER, session="main-7/1")
    assert _presence(store, DEVICE) == (True, "main-1/1", "node-a", T0 + LEASE_MS)
    clock.advance(10_000)
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        assert await fleet_a.renew_session_leases("main-1") == {(DEVICE, "main-1/1")}
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    assert [s for s in statements if s.lstrip().upper().startswith("UPDATE")] != []
    assert len([s for s in statements if "UPDATE" in s.upper()]) == 1
    assert _presence(store, DEVICE)[3] == T0 + 10_000 + LEASE_MS
    assert _presence(store, OTHER)[3] == T0 + LEASE_MS  # node B's lease: not A's to renew


async def test_an_expired_lease_is_swept_once_and_the_next_session_anywhere_takes_it(
    store: Store, reopen: Callable[..., Store]
) -> None:
    _add_devices(store)
    clock = Clock()
    fleet_a, _ = _fleet(store, "node-a", clock)
    fleet_b, events_b = _fleet(reopen(), "node-b", clock)
    await fleet_a.device_online(DEVICE, session="main-1/1")
    clock.advance(LEASE_MS - 1)
    assert await fleet_b.sweep_expired_sessions() == 0  # not yet
    clock.advance(2)  # node A died: no renewal
    assert await fleet_b.sweep_expired_sessions() == 1
    assert await fleet_b.sweep_expired_sessions() == 0  # offline once, reported once
    assert _statuses(events_b) == [("offline", DEVICE)]
    assert _presence(store, DEVICE) == (False, None, None, None)
    assert await fleet_a.renew_session_leases("main-1") == set()  # A (back) finds it lost
    await fleet_b.device_online(DEVICE, session="main-7/3")
    assert _presence(store, DEVICE) == (True, "main-7/3", "node-b", clock.now + LEASE_MS)
    assert _statuses(events_b)[-1] == ("online", DEVICE)


async def test_a_new_session_on_another_node_takes_a_live_lease_and_the_old_ones_end_is_ignored(
    store: Store, reopen: Callable[..., Store]
) -> None:
    _add_devices(store)
    clock = Clock()
    fleet_a, events_a = _fleet(store, "node-a", clock)
    fleet_b, _ = _fleet(reopen(), "node-b", clock)
    await fleet_a.device_online(DEVICE, session="main-1/1")
    clock.advance(1000)
    await fleet_b.device_online(DEVICE, session="main-1/1")  # same token, another node
    assert _presence(store, DEVICE)[1:3] == ("main-1/1", "node-b")
    # A's renewal no longer holds it (A then closes its stale session).
    assert await fleet_a.renew_session_leases("main-1") == set()
    # The stale session's end on A leaves B's presence alone, even with an equal token.
    await fleet_a.device_offline(DEVICE, session="main-1/1")
    assert _presence(store, DEVICE)[:3] == (True, "main-1/1", "node-b")
    assert ("offline", DEVICE) not in _statuses(events_a)


async def test_a_starting_node_frees_only_its_own_previous_leases(
    store: Store, reopen: Callable[..., Store]
) -> None:
    _add_devices(store)
    clock = Clock()
    fleet_a, _ = _fleet(store, "node-a", clock)
    await fleet_a.device_online(DEVICE, session="main-1/1")
    fleet_b, _ = _fleet(reopen(), "node-b", clock)
    await fleet_b.device_online(OTHER, session="main-2/1")
    # Node B restarts (same node id, a new process): its old session is gone.
    restarted, events = _fleet(reopen(), "node-b", clock)
    assert await restarted.startup(exclusive=False) == 1
    assert _presence(store, OTHER) == (False, None, None, None)
    assert _statuses(events) == [("offline", OTHER)]
    assert _presence(store, DEVICE)[:3] == (True, "main-1/1", "node-a")  # A's: untouched
    # A worker of node B that died: only node B's sessions of that process.
    await restarted.device_online(OTHER, session="worker1-5/1")
    assert await restarted.sessions_lost("worker1-5") == 1
    assert await fleet_b.sessions_lost("main-1") == 0  # node A's main-1 is not B's
    assert _presence(store, DEVICE)[0]


async def test_an_exclusive_store_start_marks_every_device_offline(store: Store) -> None:
    _add_devices(store)
    clock = Clock()
    fleet, _ = _fleet(store, "node-a", clock)
    await fleet.device_online(DEVICE, session="main-1/1")
    await fleet.device_online(OTHER)  # no session (an API-driven test path)
    assert await fleet.startup() == 2
    assert _presence(store, DEVICE) == (False, None, None, None)


async def test_a_session_owner_without_a_lease_is_swept(store: Store) -> None:
    """A device a server older than leases marked online (no lease column then)."""
    _add_devices(store)
    with store.write() as tx:
        tx.update_device(DEVICE, {"online": True, "session_owner": "main-9/1"}, 5)
    fleet, events = _fleet(store, "node-a", Clock())
    assert await fleet.sweep_expired_sessions() == 1
    assert _statuses(events) == [("offline", DEVICE)]


async def test_the_blob_sweeper_job_deletes_unreferenced_blobs_past_their_grace(
    store: Store, autojump_clock: MockClock
) -> None:
    """The blob sweeper (what a deleted firmware's image waits for) removes a blob no row
    names once it is older than the store's grace, and keeps one a row names."""
    store.blob_sweep_grace_s = 0.0
    orphan = store.blobs.put(b"a deleted firmware's image")
    kept = store.blobs.put(b"an image a row names")
    with store.write() as tx:  # a delta row names ``kept`` as its patch
        tx.conn.execute(sa.insert(t.deltas).values(
            base_sha256="a" * 64, target_sha256="b" * 64, patch_sha256=kept, patch_size=20,
            target_size=40, created_at=T0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweep_unreferenced_blobs, store, 60.0)
        while store.blobs.exists(orphan):
            await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert store.blobs.exists(kept)
