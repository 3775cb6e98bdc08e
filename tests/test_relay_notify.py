"""The store event relay on PostgreSQL: appends NOTIFY, relays LISTEN, and catch up.

Over a real PostgreSQL database (the ``pg_database`` fixture: the throwaway cluster of
``scripts/run-tests.sh``, or one the fixtures start): two relays in this process on two
``Store`` objects, as two nodes would open the database. The relays' safety poll is set to
an hour, so anything that arrives within a test's timeouts arrived because a notification
(or a reconnection's catch-up read) asked for it. The node id and the relay's wiring in
``serve`` are checked here too.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import trio

from otacore.errors import ValidationError
from server.app import ServerConfig, serve
from server.events import Event, EventBus
from server.node_id import NODE_ID_MAX, check_node_id, default_node_id
from server.relay import EventRelay, RelaySettings
from server.store import Store
from server.store.pg_listen import EventLogListener
from server.store.tx_events import append_events, read_events_after
from server.workers import process_origin
from tests.test_multiprocess_server import take

#: Reads happen when notified (or after a reconnection) only: the safety poll is an hour.
NOTIFIED_ONLY = RelaySettings(flush_interval=0.01, missed_notification_poll=3600.0,
                              listen_retry_min=0.2, listen_retry_max=1.0)


def open_pg_store(url: str, tmp_path: Path, name: str) -> Store:
    """A store on the database ``url`` (its own blob directory: unused here)."""
    return Store.open(url, tmp_path / name / "blobs", pool_size=2)


@asynccontextmanager
async def relay_pair(
    url: str, tmp_path: Path, settings: RelaySettings = NOTIFIED_ONLY
) -> AsyncIterator[tuple[EventRelay, EventRelay]]:
    """Relays "node-a" and "node-b" on two stores of one PostgreSQL database, listening."""
    stores = [open_pg_store(url, tmp_path, name) for name in ("a", "b")]
    try:
        a = EventRelay(stores[0], EventBus(), "node-a:main-1", settings=settings)
        b = EventRelay(stores[1], EventBus(), "node-b:main-1", settings=settings)
        assert a.listen and b.listen  # on PostgreSQL, without being told
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            assert a.stats.listener_connects == b.stats.listener_connects == 1
            yield a, b
            nursery.cancel_scope.cancel()
    finally:
        for store in stores:
            store.close()


def admin_connection(url: str) -> psycopg.Connection[Any]:
    """A plain connection to the database ``url`` (what an operator's psql would be)."""
    engine_url = sa.make_url(url)
    args, params = sa.create_engine(engine_url).dialect.create_connect_args(engine_url)
    return psycopg.connect(*args, **params, autocommit=True)


async def wait_until(condition: Any, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def test_an_append_notifies_at_its_commit_and_a_rolled_back_one_never(
    pg_database: str, tmp_path: Path
) -> None:
    store = open_pg_store(pg_database, tmp_path, "a")
    listener = EventLogListener.connect(store.engine)
    try:
        with pytest.raises(RuntimeError), store.write() as tx:
            append_events(tx.conn, "ghost", [Event("test/ghost", "0")])
            raise RuntimeError("roll back")
        with store.write() as tx:
            append_events(tx.conn, "real", [Event("test/real", "1"), Event("test/real", "2")])
        # Notifications arrive in commit order: had the rolled-back append notified, its
        # notification would come first. The rows are visible once it has come.
        assert listener.wait(20.0) == {"real"}
        with store.read() as tx:
            events, _ = read_events_after(tx.conn, 0, exclude_origin="nobody")
        assert [(e.name, e.data) for e in events] == [("test/real", "1"), ("test/real", "2")]
        # One notification per append transaction, however many rows: the next is the
        # next append's.
        with store.write() as tx:
            append_events(tx.conn, "later", [Event("test/later", "3")])
        assert listener.wait(20.0) == {"later"}
    finally:
        listener.close()
        store.close()


async def test_a_relay_reads_when_notified(pg_database: str, tmp_path: Path) -> None:
    async with relay_pair(pg_database, tmp_path) as (a, b):
        with b.bus.subscribe(buffer=100) as at_b:
            # Round by round: after the first (maybe read at b's start), each event can only
            # reach b through a notification (b's safety poll is an hour away).
            for n in range(3):
                a.bus.publish(Event("test/round", str(n), device_id="d1"))
                (event,) = await take(at_b.receive, 1)
                assert (event.name, event.data, event.device_id) == ("test/round", str(n), "d1")
        assert b.stats.notifications >= 2
        assert b.stats.received == 3
        # a's own appends notify a too, but it does not read for them.
        assert a.stats.notifications == 0 and a.stats.received == 0


async def test_a_relay_whose_listening_connection_dies_catches_up_once_and_in_order(
    pg_database: str, tmp_path: Path
) -> None:
    async with relay_pair(pg_database, tmp_path) as (a, b):
        with b.bus.subscribe(buffer=1000) as at_b:
            a.bus.publish(Event("test/before", "0"))
            assert [e.data for e in await take(at_b.receive, 1)] == ["0"]
            old_pid = b.stats.listener_pid
            assert old_pid is not None
            with admin_connection(pg_database) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
            await wait_until(lambda: b.stats.listener_losses == 1)
            # Appended while b listens to nobody (it waits listen_retry_min to reconnect),
            # in several transactions.
            for batch in range(4):
                for n in range(5):
                    a.bus.publish(Event("test/away", f"{batch}.{n}"))
                await wait_until(lambda count=5 * (batch + 1) + 1: a.stats.appended >= count)
            got = await take(at_b.receive, 20)
            assert [e.data for e in got] == [f"{b_}.{n}" for b_ in range(4) for n in range(5)]
            # Nothing twice: a marker appended after them is the very next event.
            a.bus.publish(Event("test/marker", "last"))
            assert [e.data for e in await take(at_b.receive, 1)] == ["last"]
        assert b.stats.listener_connects == 2
        assert b.stats.listener_pid not in (None, old_pid)
        assert b.stats.received == 22


async def test_a_relay_keeps_trying_to_listen_and_catches_up_when_it_can(
    pg_database: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """Every new listening connection is refused for a while (the role may not connect):
    the relay retries with back-off, the store's pooled connections still relay, and once
    it listens again it is notified again."""
    async with relay_pair(pg_database, tmp_path) as (a, b):
        with admin_connection(pg_admin_url) as admin, b.bus.subscribe(buffer=100) as at_b:
            database = sa.make_url(pg_database).database
            admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
            try:
                admin.execute("SELECT pg_terminate_backend(%s)", (b.stats.listener_pid,))
                await wait_until(lambda: b.stats.store_errors >= 2)  # refused, twice
                assert b.stats.listener_pid is None
                a.bus.publish(Event("test/while-refused", "1"))
                await wait_until(lambda: a.stats.appended >= 1)
            finally:
                admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
            assert [e.data for e in await take(at_b.receive, 1)] == ["1"]  # the catch-up
            a.bus.publish(Event("test/notified", "2"))
            assert [e.data for e in await take(at_b.receive, 1)] == ["2"]
        assert b.stats.listener_connects == 2


def test_a_sqlite_relay_polls(tmp_path: Path) -> None:
    store = Store.open_dir(tmp_path, pool_size=1)
    try:
        assert not EventRelay(store, EventBus(), "x").listen
    finally:
        store.close()


def test_node_ids_and_origins() -> None:
    host = "build-host.example.com"
    # The host name and the API port: stable across restarts, distinct between nodes.
    assert default_node_id(8080, host) == f"{host}-8080" == default_node_id(8080, host)
    assert default_node_id(8081, host) != default_node_id(8080, host)
    assert default_node_id(0, host) == f"{host}-pid{os.getpid()}"  # a free API port
    long = default_node_id(8080, "h" * 100 + "/ü x")
    assert len(long) == NODE_ID_MAX and check_node_id(long) == long
    assert default_node_id(8080, "///").startswith("node-")
    origin = process_origin("worker1023", "n" * NODE_ID_MAX)
    assert len(origin) <= 64 and "/" not in origin  # event_log.origin; "<origin>/<serial>"
    assert origin.rpartition("-")[2].isdigit()  # the pid comes last
    for bad in ("", "a/b", "a:b", "a b", "n" * (NODE_ID_MAX + 1)):
        with pytest.raises(ValidationError, match="node id"):
            check_node_id(bad)
        with pytest.raises(ValidationError, match="node id"):
            ServerConfig(data_dir=Path("x"), node_id=bad)


async def test_a_server_on_postgresql_runs_a_listening_relay_under_its_node_id(
    pg_database: str, tmp_path: Path
) -> None:
    config = ServerConfig(data_dir=tmp_path, db_url=pg_database, api_port=0, device_port=None,
                          node_id="node-7")
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve, config)
        assert handle.node_id == "node-7" and handle.workers is None
        assert handle.relay is not None and handle.relay.listen
        assert handle.relay.origin.startswith("node-7:main-")
        handle.shutdown.set()


async def test_a_server_on_a_named_sqlite_file_runs_a_polling_relay(tmp_path: Path) -> None:
    """Another node may share a SQLite file named by --db-url: the relay runs (polling)."""
    database = (tmp_path / "shared.db").resolve()
    config = ServerConfig(data_dir=tmp_path / "data", db_url=f"sqlite:///{database}",
                          api_port=0, device_port=None)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve, config)
        assert handle.relay is not None and not handle.relay.listen
        assert handle.relay.origin.startswith(f"{handle.node_id}:main-")
        handle.shutdown.set()
