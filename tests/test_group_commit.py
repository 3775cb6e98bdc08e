"""Group commit on a real SQLite store: concurrent writes share transactions, each in its own
savepoint; failures, cancellation and backpressure stay per caller; commits are durable."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from server.events import STATUS, EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.errors import UnknownDeviceError
from server.store import Store, StoreConflictError, Tx
from server.store import schema as t
from server.store.group_commit import GroupCommitter
from server.store.sqlite import BUSY_TIMEOUT_MS, WRITE_OPTION
from server.store.store import TransactionLostError


class OpFailedError(Exception):
    """What a deliberately failing operation raises."""


@pytest.fixture
def commits(store: Store) -> Iterator[list[int]]:
    """One entry per committed write transaction on ``store``'s engine (reads also end in a
    COMMIT; they are not counted)."""
    seen: list[int] = []

    def on_commit(conn: sa.Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            seen.append(1)

    sa.event.listen(store.engine, "commit", on_commit)
    yield seen
    sa.event.remove(store.engine, "commit", on_commit)


def put(key: str, value: str, *, then_fail: bool = False) -> Callable[[Tx], str]:
    """An operation that inserts meta row ``key`` and returns ``value`` (or then raises)."""

    def op(tx: Tx) -> str:
        tx.conn.execute(sa.insert(t.meta).values(key=key, value=value))
        if then_fail:
            raise OpFailedError(f"op {key} failed on purpose")
        return value

    return op


def keys_in(store: Store, prefix: str) -> set[str]:
    with store.read() as tx:
        rows = tx.conn.execute(sa.select(t.meta.c.key).where(t.meta.c.key.like(f"{prefix}%")))
        return {row[0] for row in rows}


async def test_concurrent_ops_share_few_commits_and_answer_the_right_caller(
    store: Store, commits: list[int]
) -> None:
    results: dict[int, str] = {}

    async def caller(i: int) -> None:
        results[i] = await store.group_commit.run(put(f"c{i}", f"value-{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(caller, i)
    assert results == {i: f"value-{i}" for i in range(200)}
    assert keys_in(store, "c") == {f"c{i}" for i in range(200)}
    assert 1 <= len(commits) < 200 / 4  # callers of one tick share one transaction


async def test_max_batch_bounds_each_transaction(store: Store, commits: list[int]) -> None:
    committer = GroupCommitter(store, max_batch=16)
    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(committer.run, put(f"m{i}", "x"))
    assert keys_in(store, "m") == {f"m{i}" for i in range(100)}
    assert committer.operations == 100
    assert len(commits) == committer.batches >= 100 // 16 + 1


async def test_a_failing_op_rolls_back_alone_and_reaches_only_its_caller(
    store: Store, commits: list[int]
) -> None:
    outcomes: dict[str, object] = {}

    async def caller(key: str, fail: bool) -> None:
        try:
            outcomes[key] = await store.group_commit.run(put(key, "ok", then_fail=fail))
        except OpFailedError as exc:
            outcomes[key] = exc

    async with trio.open_nursery() as nursery:
        for key, fail in (("f-a", False), ("f-bad", True), ("f-c", False)):
            nursery.start_soon(caller, key, fail)
    assert len(commits) == 1  # all three were in one transaction
    assert outcomes["f-a"] == "ok" and outcomes["f-c"] == "ok"
    assert isinstance(outcomes["f-bad"], OpFailedError)
    assert "f-bad failed" in str(outcomes["f-bad"])
    assert keys_in(store, "f-") == {"f-a", "f-c"}


async def test_a_constraint_violation_is_a_conflict_for_its_caller_only(
    store: Store, commits: list[int]
) -> None:
    await store.group_commit.run(put("dup", "first"))
    outcomes: dict[str, object] = {}

    async def caller(key: str) -> None:
        try:
            outcomes[key] = await store.group_commit.run(put(key, "second"))
        except StoreConflictError as exc:
            outcomes[key] = exc

    commits.clear()
    async with trio.open_nursery() as nursery:
        for key in ("dup", "fresh"):
            nursery.start_soon(caller, key)
    assert len(commits) == 1
    assert isinstance(outcomes["dup"], StoreConflictError)
    assert outcomes["fresh"] == "second"
    with store.read() as tx:
        value = tx.conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == "dup")).scalar()
    assert value == "first"


def blocking(gate: threading.Event, key: str) -> Callable[[Tx], str]:
    """An operation that holds its batch (in the worker thread) until ``gate`` opens."""

    def op(tx: Tx) -> str:
        gate.wait(10)
        tx.conn.execute(sa.insert(t.meta).values(key=key, value="held"))
        return key

    return op


async def test_cancelling_a_queued_caller_drops_its_op_and_spares_the_rest(store: Store) -> None:
    gate = threading.Event()
    results: dict[str, str] = {}

    async def caller(key: str, op: Callable[[Tx], str]) -> None:
        results[key] = await store.group_commit.run(op)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "q-held", blocking(gate, "q-held"))
        await trio.testing.wait_all_tasks_blocked()  # the first batch is in its thread
        victim = trio.CancelScope()

        async def cancelled_caller() -> None:
            with victim:
                await store.group_commit.run(put("q-victim", "never"))

        nursery.start_soon(cancelled_caller)  # queued first: it would lead the next batch
        nursery.start_soon(caller, "q-after", put("q-after", "q-after"))
        await trio.testing.wait_all_tasks_blocked()
        assert store.group_commit.queued() == 2
        victim.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert store.group_commit.queued() == 1
        gate.set()
    assert victim.cancelled_caught
    assert results == {"q-held": "q-held", "q-after": "q-after"}
    assert keys_in(store, "q-") == {"q-held", "q-after"}


async def test_a_caller_made_leader_then_cancelled_hands_the_lead_on(store: Store) -> None:
    committer = GroupCommitter(store, max_batch=1)
    gate = threading.Event()
    results: dict[str, str] = {}
    victim = trio.CancelScope()

    async def first() -> None:
        results["l-first"] = await committer.run(blocking(gate, "l-first"))
        # No checkpoint since the leader handed the lead to the victim: cancel it before
        # it ever runs as leader.
        victim.cancel()

    async def cancelled_caller() -> None:
        with victim:
            await committer.run(put("l-victim", "never"))

    async def last() -> None:
        results["l-last"] = await committer.run(put("l-last", "l-last"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(cancelled_caller)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(last)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert victim.cancelled_caught
    assert results == {"l-first": "l-first", "l-last": "l-last"}
    assert keys_in(store, "l-") == {"l-first", "l-last"}


async def test_a_caller_cancelled_after_its_op_was_taken_still_commits(store: Store) -> None:
    gate = threading.Event()
    published: list[str] = []
    leader_scope, waiter_scope = trio.CancelScope(), trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await store.group_commit.run(blocking(gate, "t-leader"), on_commit=published.append)
            await trio.lowlevel.checkpoint()  # a leader sees its cancellation here at last

    async def waiter() -> None:  # (trio may start this one first: then it leads)
        with waiter_scope:
            await store.group_commit.run(put("t-waiter", "t-waiter"), on_commit=published.append)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        nursery.start_soon(waiter)  # same tick: both ops go into the first batch
        await trio.testing.wait_all_tasks_blocked()
        assert store.group_commit.queued() == 0
        leader_scope.cancel()
        waiter_scope.cancel()  # the batch is in its thread: it runs to completion
        await trio.testing.wait_all_tasks_blocked()
        assert not published
        gate.set()
    assert leader_scope.cancelled_caught and waiter_scope.cancelled_caught
    assert sorted(published) == ["t-leader", "t-waiter"]  # events match the committed state
    assert keys_in(store, "t-") == {"t-leader", "t-waiter"}


async def test_pending_queue_is_bounded(store: Store) -> None:
    committer = GroupCommitter(store, max_batch=4, max_pending=5)
    gate = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run, blocking(gate, "b-held"))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(30):
            nursery.start_soon(committer.run, put(f"b{i}", "x"))
        await trio.testing.wait_all_tasks_blocked()
        assert committer.queued() == 4  # +1 in flight = max_pending; the other 25 wait
        gate.set()
    assert keys_in(store, "b") == {"b-held"} | {f"b{i}" for i in range(30)}
    assert committer.batches >= 1 + 30 // 4


async def test_a_lost_transaction_fails_the_whole_batch_and_saves_nothing(store: Store) -> None:
    def sabotage(tx: Tx) -> None:
        tx.conn.execute(sa.insert(t.meta).values(key="x-sabotage", value="x"))
        tx.conn.exec_driver_sql("ROLLBACK")  # as SQLite does itself after SQLITE_FULL/IOERR

    outcomes: dict[str, object] = {}

    async def caller(key: str, op: Callable[[Tx], Any]) -> None:
        try:
            outcomes[key] = await store.group_commit.run(op)
        except Exception as exc:
            outcomes[key] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "x-before", put("x-before", "v"))
        nursery.start_soon(caller, "x-sabotage", sabotage)
        nursery.start_soon(caller, "x-after", put("x-after", "v"))
    # SQLite: no transaction any more; PostgreSQL: none open (the next statement would
    # begin one without the writers' lock). Either way the batch is lost, for every caller.
    assert all(isinstance(outcome, TransactionLostError) for outcome in outcomes.values()), (
        outcomes)
    assert len({id(outcome) for outcome in outcomes.values()}) == 3  # one object per caller
    assert keys_in(store, "x-") == set()  # nothing autocommitted after the rollback
    assert await store.group_commit.run(put("x-later", "ok")) == "ok"  # the store still works


async def test_committed_change_is_durable_for_a_fresh_store(
    store: Store, reopen: Callable[..., Store]
) -> None:
    assert await store.group_commit.run(put("durable", "yes")) == "yes"
    fresh = reopen(pool_size=1)
    try:
        with fresh.read() as tx:
            value = tx.conn.execute(
                sa.select(t.meta.c.value).where(t.meta.c.key == "durable")
            ).scalar()
    finally:
        fresh.close()
    assert value == "yes"


def test_connections_wait_on_a_busy_timeout(sqlite_store: Store) -> None:
    with sqlite_store.read() as tx:
        assert tx.conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == BUSY_TIMEOUT_MS


async def test_two_stores_on_one_database_write_without_locked_errors(
    store: Store, reopen: Callable[..., Store]
) -> None:
    """A second Store (own engine, own write lock) stands in for another server process."""
    other = reopen(pool_size=2)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(store.group_commit.run, put(f"p-a{i}", "a"))
                nursery.start_soon(other.group_commit.run, put(f"p-b{i}", "b"))
                nursery.start_soon(trio.to_thread.run_sync, _plain_write, other, f"p-c{i}")
    finally:
        other.close()
    expected = {f"p-{side}{i}" for side in "abc" for i in range(60)}
    assert keys_in(store, "p-") == expected


def _plain_write(store: Store, key: str) -> None:
    with store.write() as tx:
        put(key, "c")(tx)


# --- the fleet's device-session path ---------------------------------------------------------


def provision(fleet: Fleet, count: int) -> list[str]:
    product = fleet.create_product_sync(SYSTEM_ACTOR, "Widget", 13)
    ids = [f"{i:024x}" for i in range(1, count + 1)]
    with fleet.store.write() as tx:
        for device_id in ids:
            tx.insert_device(device_id, product.id, 0)
    return ids


async def test_concurrent_hellos_batch_and_publish_after_commit(
    store: Store, commits: list[int]
) -> None:
    bus = EventBus(buffer=1024)
    fleet = Fleet(store, bus)
    ids = provision(fleet, 100)
    unknown = "f" * 24
    targets: dict[str, object] = {}

    async def hello(device_id: str) -> None:
        try:
            view = await fleet.record_device_hello(
                device_id, platform_id=13, product_version=3, system_version=5000
            )
            targets[device_id] = view.device
        except UnknownDeviceError as exc:
            targets[device_id] = exc

    commits.clear()
    with bus.subscribe() as events:
        async with trio.open_nursery() as nursery:
            for device_id in [*ids[:50], unknown, *ids[50:]]:
                nursery.start_soon(hello, device_id)
        assert len(commits) < 20
        assert isinstance(targets.pop(unknown), UnknownDeviceError)
        assert sorted(targets) == ids
        online: list[str] = []
        while True:
            try:
                event = events.receive.receive_nowait()
            except trio.WouldBlock:
                break
            if event.name == STATUS:
                online.append(str(event.device_id))
        assert sorted(online) == ids  # one "online" per device, none for the unknown one
    with store.read() as tx:
        stored = {device_id: tx.get_device(device_id) for device_id in ids}
    assert stored == targets  # each caller got its own device, exactly as committed
    assert all(device is not None and device.online for device in stored.values())

    await fleet.device_offline(ids[0])
    with store.read() as tx:
        device = tx.get_device(ids[0])
    assert device is not None and not device.online


async def test_updates_pending_flips_return_the_committed_device(
    store: Store, make_firmware: Callable[..., bytes]
) -> None:
    bus = EventBus()
    fleet = Fleet(store, bus)
    device_id = provision(fleet, 1)[0]
    await fleet.upload_firmware(SYSTEM_ACTOR, "widget", make_firmware(2), version=2, title="v2")
    await fleet.release_firmware(SYSTEM_ACTOR, "widget", 2, product_default=True, force=True)
    await fleet.record_device_hello(device_id, platform_id=13, product_version=1, system_version=1)

    def stored() -> object:
        with store.read() as tx:
            return tx.get_device(device_id)

    with bus.subscribe(device_id=device_id) as events:
        view = await fleet.set_updates_enabled(device_id, False)  # target 2, runs 1: pending
        assert view.device.updates_pending and view.device == stored()
        assert events.receive.receive_nowait().data == "true"
        view = await fleet.record_device_hello(
            device_id, platform_id=13, product_version=2, system_version=1
        )
        assert not view.device.updates_pending and view.device == stored()
        assert view.target.version == 2
        assert events.receive.receive_nowait().data == "false"


async def test_time_budget_splits_batches_and_keeps_queue_order(store: Store) -> None:
    committer = GroupCommitter(store, max_batch=512, max_batch_seconds=0.01)
    gate = threading.Event()
    ran: list[int] = []

    def slow(i: int) -> Callable[[Tx], int]:
        def op(tx: Tx) -> int:
            time.sleep(0.004)
            tx.conn.execute(sa.insert(t.meta).values(key=f"s{i}", value="x"))
            ran.append(i)
            return i

        return op

    results: dict[int, int] = {}

    async def caller(i: int) -> None:
        results[i] = await committer.run(slow(i))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run, blocking(gate, "s-held"))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(20):  # queued one by one: queue order is 0..19
            nursery.start_soon(caller, i)
            await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == {i: i for i in range(20)}
    assert ran == list(range(20))  # left-over ops went back to the front, in order
    assert committer.batches >= 1 + 20 * 0.004 / 0.01 - 1  # the budget split the 20
    assert committer.operations == 21


async def test_a_left_over_op_of_a_cancelled_caller_is_dropped(store: Store) -> None:
    committer = GroupCommitter(store, max_batch_seconds=0.01)
    first_gate, second_gate = threading.Event(), threading.Event()
    results: dict[str, str] = {}
    victim = trio.CancelScope()

    async def caller(key: str, op: Callable[[Tx], str]) -> None:
        results[key] = await committer.run(op)

    async def cancelled_caller() -> None:
        with victim:
            await committer.run(put("d-victim", "never"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "d-held", blocking(first_gate, "d-held"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(caller, "d-slow", blocking(second_gate, "d-slow"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(cancelled_caller)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(caller, "d-after", put("d-after", "d-after"))
        await trio.testing.wait_all_tasks_blocked()
        first_gate.set()  # next batch: d-slow, d-victim, d-after
        with trio.fail_after(20):
            while committer.queued():
                await trio.sleep(0.001)
        victim.cancel()  # taken: it would run, but the budget will leave it over
        await trio.sleep(0.03)  # past the budget before d-slow finishes
        second_gate.set()
    assert victim.cancelled_caught
    assert results == {"d-held": "d-held", "d-slow": "d-slow", "d-after": "d-after"}
    assert keys_in(store, "d-") == {"d-held", "d-slow", "d-after"}
    assert committer.batches == 3 and committer.operations == 3
