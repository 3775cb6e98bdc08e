"""Concurrent writers of several stores on one database (several server processes or nodes)
lose nothing and never collide, on SQLite and on PostgreSQL: writers run one at a time
(SQLite's write lock; PostgreSQL's writers' advisory lock, server/store/postgresql.py), and
read transactions are snapshots. Real databases: a SQLite file, the throwaway PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio
import trio.testing

from otacore.errors import ValidationError
from server.store import (
    Store,
    StoreConfigError,
    StoreConflictError,
    StoreUnavailableError,
    StoreValueError,
    Tx,
)
from server.store import schema as t
from server.store.store import TransactionLostError
from server.store.tx_ota import OtaMemoryRecord

DEVICE = "0123456789abcdef01234567"
#: Writer threads per store, stores ("nodes") on the database, transactions per thread.
THREADS, NODES, ROUNDS = 3, 2, 12


def _product(store: Store) -> int:
    with store.write() as tx:
        product = tx.insert_product(slug="w", name="W", platform_id=13, description="", now=1)
        tx.insert_device(DEVICE, product.id, 1)
    return product.id


def _read_modify_write(tx: Tx, product_id: int, writer: str, round_: int) -> None:
    """Each step reads, then writes what depends on what it read: the races SQLite's one
    writer never had (a counter row created on first use, an update-else-insert, a name
    derived from a count)."""
    tx.add_transfer_bytes(product_id, 1, bytes_sent=1, bytes_full=2, transfer="delta")
    memory = tx.get_ota_memory(DEVICE)
    tx.put_ota_memory(
        OtaMemoryRecord(DEVICE, refused=(*memory.refused, f"{writer}-{round_}")), now=round_
    )
    taken = len(tx.list_groups(product_id))
    tx.insert_group(product_id, f"g{taken}", description="", color="", now=round_)


def test_concurrent_read_modify_write_transactions_of_several_nodes_lose_nothing(
    store: Store, reopen: Callable[..., Store]
) -> None:
    product_id = _product(store)
    stores = [store, *(reopen(pool_size=THREADS) for _ in range(NODES - 1))]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS * NODES)

    def writer(node: int, thread: int) -> None:
        try:
            start.wait()
            for round_ in range(ROUNDS):
                with stores[node].write() as tx:
                    _read_modify_write(tx, product_id, f"{node}.{thread}", round_)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(node, thread))
               for node in range(NODES) for thread in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    total = THREADS * NODES * ROUNDS
    with store.read() as tx:
        counters = tx.get_transfer_bytes(product_id, 1)
        assert (counters["delta_transfers"], counters["bytes_sent"]) == (total, total)
        # Every group name g0..g<total-1> once: no two writers saw the same count.
        assert sorted(g.name for g in tx.list_groups(product_id)) == sorted(
            f"g{i}" for i in range(total))
        # The refused list keeps its newest 32 entries: no append was lost in between.
        refused = tx.get_ota_memory(DEVICE).refused
        assert len(refused) == 32 and len(set(refused)) == 32


async def test_group_commit_batches_of_several_nodes_lose_nothing(
    store: Store, reopen: Callable[..., Store]
) -> None:
    """The device-session path: each node's group committer runs its callers' operations
    in shared transactions; batches of different nodes interleave without conflicts."""
    product_id = _product(store)
    other = reopen(pool_size=4)
    per_node = 60

    def op(writer: str, round_: int) -> Callable[[Tx], None]:
        return lambda tx: _read_modify_write(tx, product_id, writer, round_)

    async with trio.open_nursery() as nursery:
        for round_ in range(per_node):
            for node, node_store in enumerate((store, other)):
                nursery.start_soon(node_store.group_commit.run, op(str(node), round_))
    with store.read() as tx:
        assert tx.get_transfer_bytes(product_id, 1)["delta_transfers"] == 2 * per_node
        assert len(tx.list_groups(product_id)) == 2 * per_node
    print(f"batches: {store.group_commit.batches} + {other.group_commit.batches}")


def test_a_read_transaction_is_one_snapshot(
    store: Store, reopen: Callable[..., Store]
) -> None:
    """What another node commits during a read transaction is not seen by that transaction
    (PostgreSQL: REPEATABLE READ; SQLite: WAL read transactions), only by the next one."""
    writer = reopen()
    with store.write() as tx:
        tx.conn.execute(sa.insert(t.meta).values(key="snap", value="before"))

    def value(tx: Tx) -> str:
        return str(tx.conn.execute(
            sa.select(t.meta.c.value).where(t.meta.c.key == "snap")).scalar_one())

    with store.read() as tx:
        assert value(tx) == "before"
        with writer.write() as other:
            other.conn.execute(sa.update(t.meta).where(t.meta.c.key == "snap")
                               .values(value="after"))
        assert value(tx) == "before"
    with store.read() as tx:
        assert value(tx) == "after"


def test_a_write_block_that_caught_a_database_error_commits_only_where_that_is_safe(
    store: Store, store_backend: str
) -> None:
    """SQLite undoes only the failed statement and the transaction goes on; PostgreSQL
    refuses the rest of the transaction and would answer COMMIT with a silent ROLLBACK:
    the store raises instead, so an acknowledged write is never a lost one."""
    product_id = _product(store)

    def block() -> None:
        with store.write() as tx:
            tx.insert_group(product_id, "kept", description="", color="", now=1)
            with pytest.raises(StoreConflictError):  # the translated unique violation
                from server.store.store import _translated_errors

                with _translated_errors():
                    tx.insert_group(product_id, "kept", description="", color="", now=1)

    if store_backend == "sqlite":
        block()
        expected = ["kept"]
    else:
        with pytest.raises(TransactionLostError, match="retry"):
            block()
        expected = []
    with store.read() as tx:
        assert [g.name for g in tx.list_groups(product_id)] == expected


def _waiting_for_the_writers_lock(store: Store) -> int:
    """Sessions of the database waiting for the writers' advisory lock (pg_locks)."""
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )).scalar_one())


def test_a_postgresql_writer_waits_for_another_nodes_writer_and_then_sees_its_change(
    pg_database: str, tmp_path: Path
) -> None:
    first = Store.open(pg_database, tmp_path / "blobs", pool_size=2)
    second = Store.open(pg_database, tmp_path / "blobs", pool_size=2)
    product_id = _product(first)
    seen: list[int] = []

    def second_writer() -> None:
        with second.write() as tx:  # waits at BEGIN for the first writer's commit
            seen.append(len(tx.list_groups(product_id)))
            tx.insert_group(product_id, f"g{seen[-1]}", description="", color="", now=2)

    try:
        with first.write() as tx:
            tx.insert_group(product_id, "g0", description="", color="", now=1)
            thread = threading.Thread(target=second_writer)
            thread.start()
            deadline = time.monotonic() + 30
            while _waiting_for_the_writers_lock(first) == 0:  # the condition, not a sleep
                assert time.monotonic() < deadline, "the second writer never queued"
                assert thread.is_alive(), "the second writer did not wait"
                time.sleep(0.01)
            assert seen == []
        thread.join(30)
        assert seen == [1]  # it saw the first writer's group, and named its own after it
        with first.read() as tx:
            assert sorted(g.name for g in tx.list_groups(product_id)) == ["g0", "g1"]
    finally:
        first.close()
        second.close()


def test_a_postgresql_writer_gives_up_after_the_lock_timeout_of_its_url(
    pg_database: str, tmp_path: Path
) -> None:
    """The URL's own server options override the store's lock timeout (30 s): here 200 ms;
    a writer still waiting then fails as "unavailable" (503, retry), not with a crash."""
    impatient_url = f"{pg_database}?options=-c%20lock_timeout%3D200"
    holder = Store.open(pg_database, tmp_path / "blobs", pool_size=1)
    impatient = Store.open(impatient_url, tmp_path / "blobs", pool_size=1)
    try:
        with impatient.read() as tx:
            assert tx.conn.execute(sa.text("SHOW lock_timeout")).scalar_one() == "200ms"
        with holder.write(), pytest.raises(StoreUnavailableError, match="lock timeout"), \
                impatient.write():
            pass
        with impatient.write() as tx:  # free again
            tx.conn.execute(sa.insert(t.meta).values(key="after", value="x"))
    finally:
        holder.close()
        impatient.close()


def test_database_urls_say_what_is_wrong(tmp_path: Path, pg_database: str) -> None:
    for url, message in [
        ("postgresql+psycopg2://u:secret@localhost/db", "psycopg2 driver"),
        ("mysql+pymysql://u:secret@localhost/db", "not on mysql"),
    ]:
        with pytest.raises(StoreConfigError, match=message) as caught:
            Store.open(url, tmp_path / "blobs")
        assert "secret" not in str(caught.value)  # never echo a password
    # libpq's own form means psycopg 3.
    bare = Store.open(pg_database.replace("postgresql+psycopg://", "postgresql://"),
                      tmp_path / "blobs", pool_size=1)
    try:
        assert bare.backend == "postgresql" and bare.engine.dialect.driver == "psycopg"
        assert bare.check() == "ok"
    finally:
        bare.close()


def test_a_value_postgresql_cannot_hold_is_a_value_error_not_a_crash(
    store: Store, store_backend: str
) -> None:
    """Where the API's own checks were bypassed: too long for its column (SQLite keeps it,
    PostgreSQL refuses it with the store's own error type, a 400)."""
    product_id = _product(store)
    long_name = "g" * 101  # groups.name is VARCHAR(100)
    if store_backend == "sqlite":
        with store.write() as tx:
            tx.insert_group(product_id, long_name, description="", color="", now=1)
        return
    with pytest.raises(StoreValueError, match="too long"), store.write() as tx:
        tx.insert_group(product_id, long_name, description="", color="", now=1)
    assert isinstance(StoreValueError("x"), ValidationError)  # what the API maps to 400


def test_device_event_values_are_stored_as_far_as_the_database_can(store: Store,
                                                                   store_backend: str) -> None:
    """A device may send any uint32 ttl and any characters: the event log stores them
    (capped; NUL made U+FFFD on PostgreSQL) instead of failing the relay's batch forever."""
    from server.events import Event
    from server.store.tx_events import append_events, read_events_after

    event = Event("app/with\x00nul", "da\x00ta", coreid=DEVICE, ttl=2**32 - 1)
    with store.write() as tx:
        append_events(tx.conn, "node-a", [event])
    with store.read() as tx:
        (stored,), _ = read_events_after(tx.conn, 0, exclude_origin="node-b")
    nul = "\x00" if store_backend == "sqlite" else "\ufffd"
    assert (stored.name, stored.data) == (f"app/with{nul}nul", f"da{nul}ta")
    assert stored.ttl == 2**31 - 1


def test_sequences_move_past_rows_copied_with_their_ids(pg_database: str,
                                                        tmp_path: Path) -> None:
    """Rows inserted with explicit ids (a restore, a copy of a SQLite store) leave
    PostgreSQL's id sequences behind; advance_sequences moves them past the copied rows."""
    from server.store.postgresql import advance_sequences

    store = Store.open(pg_database, tmp_path / "blobs", pool_size=1)
    try:
        with store.write() as tx:
            tx.conn.execute(sa.insert(t.products), [
                {"id": n, "slug": f"p{n}", "name": f"P{n}", "platform_id": 13,
                 "description": "", "firmware_updates_forced": False, "created_at": 1}
                for n in (1, 2, 7)])
        with pytest.raises(StoreConflictError), store.write() as tx:  # the sequence says 1
            tx.insert_product(slug="new", name="New", platform_id=13, description="", now=2)
        with store.write() as tx:
            next_ids = advance_sequences(tx.conn, t.metadata)
        assert next_ids["products"] == 8 and next_ids["audit_log"] == 1
        assert "devices" not in next_ids  # string keys have no sequence
        with store.write() as tx:
            product = tx.insert_product(slug="new", name="New", platform_id=13,
                                        description="", now=2)
        assert product.id == 8
    finally:
        store.close()


async def test_postgresql_batches_stay_within_the_subtransaction_cache(
    store: Store, store_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each op of a batch is a savepoint; on PostgreSQL more than 64 writing ones in one
    transaction overflow every session's subtransaction cache, so batches stop at 64 there
    (SQLite: 512)."""
    sizes: list[int] = []
    write_batch = store.write_batch

    def recorded(ops: Any, **kwargs: Any) -> None:
        write_batch(ops, **kwargs)
        sizes.append(sum(op.ran for op in ops))

    monkeypatch.setattr(store, "write_batch", recorded)
    # A gate holds the first batch in its worker thread until every caller has queued.
    gate = threading.Event()

    def first(tx: Tx) -> None:
        gate.wait(30)

    def put(i: int) -> Callable[[Tx], None]:
        return lambda tx: tx.conn.execute(sa.insert(t.meta).values(key=f"s{i}", value="v"))

    limit = 512 if store_backend == "sqlite" else 64
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.group_commit.run, first)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(limit + 10):
            nursery.start_soon(store.group_commit.run, put(i))
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert sizes[0] == 1 and sum(sizes) == limit + 11
    # limit + 10 queued ops need two batches at least (the time budget may cut more).
    assert max(sizes) <= limit and len(sizes) >= 3, sizes


def test_readers_never_wait_for_a_connection_behind_queued_writers(
    pg_database: str, tmp_path: Path
) -> None:
    """While another node holds the writers' lock, this node's queued writers hold one
    pooled connection between them (the process lock comes before the checkout), so its
    reads still find a free connection and answer at once."""
    holder = Store.open(pg_database, tmp_path / "blobs", pool_size=2)  # 1 more: pg_locks
    node = Store.open(pg_database, tmp_path / "blobs", pool_size=2)
    writers: list[threading.Thread] = []
    try:
        with holder.write() as held:
            held.conn.execute(sa.insert(t.meta).values(key="held", value="x"))

            def queued_write(i: int) -> None:
                with node.write() as tx:
                    tx.conn.execute(sa.insert(t.meta).values(key=f"q{i}", value="x"))

            writers = [threading.Thread(target=queued_write, args=(i,)) for i in range(3)]
            for writer in writers:
                writer.start()
            deadline = time.monotonic() + 30
            while _waiting_for_the_writers_lock(holder) == 0:  # one of them reached it
                assert time.monotonic() < deadline, "no writer queued on the lock"
                time.sleep(0.01)
            answers: list[str | None] = []
            reader = threading.Thread(target=lambda: answers.append(_meta(node, "held")))
            reader.start()
            reader.join(20)  # the pool's own timeout is 60 s
            assert answers == [None]  # answered (the held write is not committed yet)
            assert _waiting_for_the_writers_lock(holder) == 1  # one connection waits
        for writer in writers:
            writer.join(30)
        assert [_meta(node, f"q{i}") for i in range(3)] == ["x"] * 3
    finally:
        holder.close()
        node.close()


def _meta(store: Store, key: str) -> str | None:
    with store.read() as tx:
        return tx.conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == key)).scalar()


def test_a_write_slipped_into_a_postgresql_read_transaction_fails_at_once(
    pg_database: str, tmp_path: Path
) -> None:
    """Reads are READ ONLY on PostgreSQL: a write there would bypass the writers' lock."""
    store = Store.open(pg_database, tmp_path / "blobs", pool_size=1)
    try:
        with pytest.raises(sa.exc.InternalError, match="read-only transaction"), \
                store.read() as tx:
            tx.conn.execute(sa.insert(t.meta).values(key="sneaky", value="x"))
        assert _meta(store, "sneaky") is None
        with store.write() as tx:  # the connection went back to the pool fit for writing
            tx.conn.execute(sa.insert(t.meta).values(key="proper", value="x"))
        assert _meta(store, "proper") == "x"
    finally:
        store.close()
