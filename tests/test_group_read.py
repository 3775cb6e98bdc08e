"""Group read on a real SQLite store: concurrent small reads share one worker-thread hop and
one read transaction, yet each sees every change committed before it asked (by this process
or another one on the same file), and failures and cancellation stay per caller."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.errors import UnknownDeviceError
from server.store import Store, StoreUnavailableError, Tx
from server.store import schema as t
from server.store.group_commit import GroupReader
from server.store.store import TransactionLostError

DEVICE = "0123456789abcdef01234567"


class ReadFailedError(Exception):
    """What a deliberately failing read raises."""


def get(key: str) -> Callable[[Tx], str | None]:
    """A read of meta row ``key``'s value."""

    def op(tx: Tx) -> str | None:
        row = tx.conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == key)).first()
        return None if row is None else str(row[0])

    return op


def put_now(store: Store, key: str, value: str) -> None:
    with store.write() as tx:
        tx.conn.execute(sa.insert(t.meta).values(key=key, value=value))


async def test_concurrent_reads_share_few_hops_and_answer_the_right_caller(store: Store) -> None:
    for i in range(200):
        put_now(store, f"r{i}", f"value-{i}")
    results: dict[int, str | None] = {}

    async def caller(i: int) -> None:
        results[i] = await store.group_read.run(get(f"r{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(caller, i)
    assert results == {i: f"value-{i}" for i in range(200)}
    reader = store.group_read
    print(f"200 reads in {reader.batches} worker-thread hops")
    assert reader.operations == 200 and 1 <= reader.batches < 200 / 4


async def test_a_read_sees_what_another_process_committed_before_it_asked(
    store: Store, reopen: Callable[..., Store]
) -> None:
    """A batch's snapshot is taken after all its reads were queued: a change committed by
    another Store on the same file (another process) before a read was asked is seen."""
    gate, snapshot_taken = threading.Event(), threading.Event()
    other = reopen()
    try:
        async with trio.open_nursery() as nursery:
            held: dict[str, str | None] = {}

            async def held_read() -> None:  # keeps a batch in its worker thread
                held["v"] = await store.group_read.run(
                    blocking(gate, get("g-key"), snapshot_taken))

            nursery.start_soon(held_read)
            # Wait until the first batch's snapshot exists (its first statement ran in the
            # worker thread), not merely until trio's tasks are blocked: the thread may not
            # have run yet.
            assert await trio.to_thread.run_sync(snapshot_taken.wait, 10)
            put_now(other, "g-key", "committed-meanwhile")  # after the first batch began
            seen: list[str | None] = []

            async def later_read() -> None:
                seen.append(await store.group_read.run(get("g-key")))

            nursery.start_soon(later_read)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert held["v"] is None  # its snapshot predates the change (it asked before)
        assert seen == ["committed-meanwhile"]
    finally:
        other.close()


def blocking(gate: threading.Event, inner: Callable[[Tx], str | None],
             started: threading.Event | None = None) -> Callable[[Tx], str | None]:
    """A read that, after its first statement (``started`` is then set), waits in its
    worker thread until ``gate`` is set."""

    def op(tx: Tx) -> str | None:
        value = inner(tx)  # the snapshot starts at the first statement
        if started is not None:
            started.set()
        assert gate.wait(10), "the test never opened the gate"
        return value

    return op


async def test_a_failing_read_reaches_only_its_caller(store: Store) -> None:
    put_now(store, "f-ok", "fine")

    def failing(tx: Tx) -> None:
        get("f-ok")(tx)
        raise ReadFailedError("this read fails on purpose")

    outcomes: dict[str, object] = {}

    async def caller(name: str, op: Callable[[Tx], object]) -> None:
        try:
            outcomes[name] = await store.group_read.run(op)
        except ReadFailedError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "before", get("f-ok"))
        nursery.start_soon(caller, "failing", failing)
        nursery.start_soon(caller, "after", get("f-ok"))
    assert outcomes["before"] == "fine" and outcomes["after"] == "fine"
    assert isinstance(outcomes["failing"], ReadFailedError)
    assert store.group_read.batches == 1


async def test_a_read_that_ends_the_transaction_fails_its_batch(
    store: Store, store_backend: str
) -> None:
    """SQLite: later reads would autocommit one by one, outside the batch's snapshot, so the
    whole batch fails. PostgreSQL: the next read simply begins a new snapshot (which still
    sees everything committed before its caller asked), so the batch goes on."""
    def sabotage(tx: Tx) -> None:
        tx.conn.exec_driver_sql("ROLLBACK")  # as SQLite does itself after an I/O error

    outcomes: dict[str, object] = {}

    async def caller(name: str, op: Callable[[Tx], object]) -> None:
        try:
            outcomes[name] = await store.group_read.run(op)
        except TransactionLostError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "sabotage", sabotage)
        nursery.start_soon(caller, "other", get("nothing"))
    if store_backend == "sqlite":
        assert all(isinstance(value, TransactionLostError) for value in outcomes.values()), (
            outcomes)
        assert "retry" in str(outcomes["other"])
    else:
        assert outcomes == {"sabotage": None, "other": None}
    assert await store.group_read.run(get("nothing")) is None  # the next batch is fine


async def test_a_read_whose_statement_fails_ends_its_batch_and_the_rest_run_next(
    store: Store, store_backend: str
) -> None:
    """A failed statement leaves a PostgreSQL transaction refusing every later statement:
    the batch stops after that read, and the reads queued behind it run in the next batch
    (never failed by another caller's error). On SQLite they share the batch."""
    def bad_statement(tx: Tx) -> None:
        tx.conn.exec_driver_sql("SELECT no_such_column FROM meta")

    put_now(store, "s-key", "value")
    outcomes: dict[str, object] = {}

    async def caller(name: str, op: Callable[[Tx], object]) -> None:
        try:
            outcomes[name] = await store.group_read.run(op)
        except Exception as exc:
            outcomes[name] = exc

    gate = threading.Event()
    async with trio.open_nursery() as nursery:
        # A first batch held in its worker thread, while the four queue behind it in order.
        nursery.start_soon(caller, "held", blocking(gate, get("s-key")))
        for name, op in [("before", get("s-key")), ("bad", bad_statement),
                         ("after", get("s-key")), ("last", get("s-key"))]:
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(caller, name, op)
        await trio.testing.wait_all_tasks_blocked()
        assert store.group_read.queued() == 4
        gate.set()
    assert outcomes["before"] == outcomes["after"] == outcomes["last"] == "value", outcomes
    # SQLite reports an unknown column as an OperationalError (the store: "unavailable").
    assert isinstance(outcomes["bad"], sa.exc.ProgrammingError | StoreUnavailableError)
    # The held batch, then [before, bad] and, on PostgreSQL, [after, last] apart.
    assert store.group_read.batches == (2 if store_backend == "sqlite" else 3)


async def test_cancelling_a_queued_reader_drops_its_read(store: Store) -> None:
    reader = GroupReader(store)
    gate = threading.Event()
    ran: list[str] = []

    def noted(name: str) -> Callable[[Tx], str]:
        def op(tx: Tx) -> str:
            ran.append(name)
            return name
        return op

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.run, blocking(gate, get("nothing")))
        await trio.testing.wait_all_tasks_blocked()
        victim = trio.CancelScope()

        async def cancelled_reader() -> None:
            with victim:
                await reader.run(noted("victim"))

        nursery.start_soon(cancelled_reader)
        nursery.start_soon(reader.run, noted("after"))
        await trio.testing.wait_all_tasks_blocked()
        assert reader.queued() == 2
        victim.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert reader.queued() == 1
        gate.set()
    assert victim.cancelled_caught
    assert ran == ["after"]


async def test_the_fleets_hot_reads_are_grouped_and_counted(store: Store) -> None:
    """Concurrent authorizations and target reads of a fleet share hops; each is still
    checked on its own (an unknown device fails only its own read)."""
    fleet = Fleet(store, EventBus())
    product = fleet.create_product_sync(SYSTEM_ACTOR, "Grouped", 13)
    with store.write() as tx:
        tx.insert_device(DEVICE, product.id, 0)
    views = []
    errors = []

    async def target(device_id: str) -> None:
        try:
            views.append(await fleet.target_for_device(device_id))
        except UnknownDeviceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(target, DEVICE)
        nursery.start_soon(target, "f" * 24)
    assert len(views) == 20 and all(view.device.id == DEVICE for view in views)
    assert len(errors) == 1 and "not in any product" in str(errors[0])
    assert store.group_read.operations == 21 and store.group_read.batches < 21
    assert fleet.round_trips.by_name["SessionService.target_for_device.<locals>.work"] == 21


def test_a_driver_level_statement_error_is_a_store_error(
    store: Store, store_backend: str
) -> None:
    """The batch's savepoint statements go straight to the driver: its errors still come out
    as the store's own error type. SQLite's transaction stays usable after it; PostgreSQL's
    refuses every later statement, so its write fails instead of silently rolling back."""
    from server.store.store import _driver_statement

    if store_backend == "postgresql":
        # A commit now would lose the block silently (PostgreSQL answers it with ROLLBACK).
        with (pytest.raises(TransactionLostError, match="failed after an error"),
              store.write() as tx, pytest.raises(StoreUnavailableError,
                                                 match=r"unavailable: .*syntax")):
            _driver_statement(tx.conn, "SAVEPOINTS are not spelled like this")
        with store.read() as tx:
            assert get("d-kept")(tx) is None
        return
    with store.write() as tx:
        with pytest.raises(StoreUnavailableError, match=r"unavailable: .*syntax"):
            _driver_statement(tx.conn, "SAVEPOINTS are not spelled like this")
        _driver_statement(tx.conn, "SAVEPOINT batch_op")
        tx.conn.execute(sa.insert(t.meta).values(key="d-kept", value="x"))
        _driver_statement(tx.conn, "RELEASE SAVEPOINT batch_op")
    assert store.group_read.operations == 0
    with store.read() as tx:
        assert get("d-kept")(tx) == "x"


def test_a_busy_begin_is_the_stores_unavailable_error(
    sqlite_store: Store, data_dir: Path
) -> None:
    """BEGIN goes straight to the driver (server.store.sqlite): when another connection
    holds the write lock past the busy timeout, it is still SQLAlchemy's OperationalError,
    which the store reports as StoreUnavailableError."""
    from server.store.sqlite import WRITE_OPTION
    from server.store.store import _translated_errors

    store = sqlite_store
    holder = sqlite3.connect(data_dir / "ota.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            conn.commit()  # the PRAGMA's own (deferred, read) transaction
            conn.execution_options(**{WRITE_OPTION: True})
            with pytest.raises(sa.exc.OperationalError, match="locked"):
                conn.begin()
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            conn.commit()  # the PRAGMA's own (deferred, read) transaction
            conn.execution_options(**{WRITE_OPTION: True})
            with pytest.raises(StoreUnavailableError, match="locked"), _translated_errors():
                conn.begin()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with store.write() as tx:  # the lock is free again: writes go on
        tx.conn.execute(sa.insert(t.meta).values(key="busy-after", value="x"))
