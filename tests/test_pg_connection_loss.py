"""The store on PostgreSQL when the database ends its sessions (a restart, a crash, an
administrator's ``pg_terminate_backend``, a network cut): every caller gets a store error
it can act on (:class:`StoreUnavailableError`: the API's 503, a device session's "try
again"), never a raw SQLAlchemy error, nothing half-done commits, and the next call works
on a fresh connection.

A session's own ``pg_terminate_backend(pg_backend_pid())`` ends it exactly as a fast
shutdown (``pg_ctl stop -m fast``) ends every session: the backend sends the
"terminating connection due to administrator command" error (57P01) and closes the socket
(https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-ADMIN-SIGNAL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from server.store import Store, StoreUnavailableError, Tx
from server.store import schema as t
from server.store.group_commit import BatchOp
from server.store.store import TransactionLostError
from tests.test_group_commit import keys_in, put

_TERMINATE_SELF = "SELECT pg_terminate_backend(pg_backend_pid())"


@pytest.fixture
def pg_store(pg_database: str, tmp_path: Path) -> Iterator[Store]:
    """A store on a fresh PostgreSQL database (two pooled connections)."""
    store = Store.open(pg_database, tmp_path / "blobs", pool_size=2)
    try:
        yield store
    finally:
        store.close()


def killed(key: str) -> Callable[[Tx], None]:
    """An operation that writes, then loses its connection (its session is terminated)."""

    def op(tx: Tx) -> None:
        tx.conn.execute(sa.insert(t.meta).values(key=key, value="v"))
        tx.conn.exec_driver_sql(_TERMINATE_SELF)

    return op


def test_a_batch_whose_connection_is_terminated_is_lost_for_every_op(pg_store: Store) -> None:
    ops = [BatchOp(put("k-before", "v")), BatchOp(killed("k-killed")),
           BatchOp(put("k-after", "v"))]
    with pytest.raises(TransactionLostError, match="nothing was saved, retry"):
        pg_store.write_batch(ops)
    assert isinstance(ops[1].error, StoreUnavailableError), repr(ops[1].error)
    assert "terminating connection" in str(ops[1].error)
    assert not ops[2].ran
    assert keys_in(pg_store, "k-") == set()
    with pg_store.write() as tx:  # a fresh connection: the store works on
        put("k-later", "v")(tx)
    assert keys_in(pg_store, "k-") == {"k-later"}


async def test_group_commit_callers_of_a_terminated_batch_get_a_store_error(
    pg_store: Store,
) -> None:
    outcomes: dict[str, object] = {}

    async def caller(key: str, op: Callable[[Tx], object]) -> None:
        try:
            outcomes[key] = await pg_store.group_commit.run(op)
        except Exception as exc:
            outcomes[key] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "g-before", put("g-before", "v"))
        nursery.start_soon(caller, "g-killed", killed("g-killed"))
        nursery.start_soon(caller, "g-after", put("g-after", "v"))
    # Each caller learns the database went away (the API's 503), not an internal error.
    assert all(isinstance(outcome, StoreUnavailableError) for outcome in outcomes.values()), (
        outcomes)
    assert keys_in(pg_store, "g-") == set()
    assert await pg_store.group_commit.run(put("g-later", "ok")) == "ok"


def test_a_write_block_whose_connection_is_terminated_is_unavailable(pg_store: Store) -> None:
    with pytest.raises(StoreUnavailableError, match="terminating connection"), \
            pg_store.write() as tx:
        killed("w-killed")(tx)
    assert keys_in(pg_store, "w-") == set()


def test_pooled_connections_ended_while_idle_are_replaced_at_checkout(
    pg_store: Store, pg_database: str
) -> None:
    # Both pooled connections open and back in the pool, idle.
    with pg_store.read() as first, pg_store.read() as second:
        pids = {first.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one(),
                second.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()}
    admin = sa.create_engine(pg_database, poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            for pid in pids:
                # Waits (up to 10 s) until the backend is gone (PostgreSQL 14+).
                conn.execute(sa.select(sa.func.pg_terminate_backend(pid, 10_000)))
    finally:
        admin.dispose()
    # The pool checks each connection as it lends it out (pool_pre_ping): no error reaches
    # a caller.
    for n in range(3):
        assert keys_in(pg_store, "p-") == {f"p-{i}" for i in range(n)}
        with pg_store.write() as tx:
            put(f"p-{n}", "v")(tx)
