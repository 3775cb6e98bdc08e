"""A silent cut between the store and PostgreSQL: the path stops carrying anything (no FIN,
no RST) and later comes back.

A small TCP relay in the test (trio, real sockets) sits between the store and the
database; cutting it stops forwarding both ways without closing anything, and restoring it
forwards what was held, as a network whose packets are lost for a while and then
retransmitted would. A user-space relay cannot stop its kernel from acknowledging what the
store sends, so ``tcp_user_timeout`` and keep-alive probes (which end a connection whose
data or probes go unacknowledged on a real cut) cannot fire through it: that the store's
connections carry them is checked on their sockets instead. What the relay does show:

* a connection attempt into the dead path ends after ``connect_timeout`` with a store
  error the API answers 503 (never a wait without end), again and again while the cut
  lasts;
* once the path is back, the store works again, and a statement that was in flight when
  the path died completes (nothing was lost, only held).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from server.store import Store, StoreUnavailableError
from server.store.postgresql import CONNECTION_DEFAULTS
from tests.test_group_commit import keys_in, put

REPO = Path(__file__).resolve().parent.parent
#: A short connection attempt (the operator's override through the URL): each attempt into
#: the dead path ends after it.
CONNECT_TIMEOUT = 2
#: Generous bound on what should take about CONNECT_TIMEOUT (a busy 2-core machine).
BOUND = 25.0


class CuttableRelay:
    """A TCP relay to ``target`` on a free loopback port whose path can be cut (nothing
    forwarded, nothing closed) and restored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        #: Chunks received while the path was cut (held, forwarded once restored).
        self.held = 0
        self._open = trio.Event()
        self._open.set()

    def cut(self) -> None:
        self._open = trio.Event()

    def restore(self) -> None:
        self._open.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._relay, listeners, task_status=task_status)

    async def _relay(self, client: trio.SocketStream) -> None:
        await self._open.wait()  # a cut path: the SYN was answered, nothing more
        async with client, await trio.open_tcp_stream(*self.target) as server, \
                trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream,
                    done: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                if not self._open.is_set():
                    self.held += 1
                await self._open.wait()  # held while cut, forwarded once restored
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        done.cancel()  # one side closed: close both


@asynccontextmanager
async def relayed_store(pg_database: str, tmp_path: Path, query: str = ""
                        ) -> AsyncIterator[tuple[CuttableRelay, Store]]:
    """A store on ``pg_database`` reached through a :class:`CuttableRelay`."""
    url = sa.make_url(pg_database)
    assert url.host and url.port
    relay = CuttableRelay((url.host, url.port))
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        relayed = url.set(host="127.0.0.1", port=relay.port)
        store = await trio.to_thread.run_sync(lambda: Store.open(
            f"{relayed.render_as_string(hide_password=False)}{query}", tmp_path / "blobs",
            pool_size=2))
        try:
            yield relay, store
        finally:
            relay.restore()
            await trio.to_thread.run_sync(store.close)
            nursery.cancel_scope.cancel()


async def test_new_connections_into_a_cut_path_fail_in_bounded_time_and_recover(
    pg_database: str, tmp_path: Path
) -> None:
    async with relayed_store(pg_database, tmp_path,
                             f"?connect_timeout={CONNECT_TIMEOUT}") as (relay, store):
        await trio.to_thread.run_sync(lambda: keys_in(store, "c-"))
        relay.cut()
        # The pool's connections are gone (as after a restart); each new attempt runs
        # into the dead path and ends after connect_timeout, as a 503-able store error.
        await trio.to_thread.run_sync(store.engine.dispose)
        for attempt in range(2):
            began = trio.current_time()
            with pytest.raises(StoreUnavailableError, match="timeout expired"):
                await trio.to_thread.run_sync(lambda: keys_in(store, "c-"))
            took = trio.current_time() - began
            print(f"attempt {attempt} into the cut path failed after {took:.2f} s "
                  f"(connect_timeout={CONNECT_TIMEOUT})")
            assert CONNECT_TIMEOUT * 0.5 <= took < BOUND
        relay.restore()

        def write_and_read() -> set[str]:
            with store.write() as tx:
                put("c-after", "v")(tx)
            return keys_in(store, "c-")

        with trio.fail_after(BOUND):
            assert await trio.to_thread.run_sync(write_and_read) == {"c-after"}


async def test_a_write_in_flight_when_the_path_dies_completes_once_it_is_back(
    pg_database: str, tmp_path: Path
) -> None:
    async with relayed_store(pg_database, tmp_path) as (relay, store):
        await trio.to_thread.run_sync(lambda: keys_in(store, "f-"))
        relay.cut()
        done = trio.Event()

        async def write() -> None:
            def work() -> None:
                with store.write() as tx:
                    put("f-held", "v")(tx)
            await trio.to_thread.run_sync(work)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            with trio.fail_after(BOUND):  # the write's first bytes are in the dead path
                while not relay.held:
                    await trio.sleep(0.01)
            assert not done.is_set()
            relay.restore()
            with trio.fail_after(BOUND):
                await done.wait()
        assert await trio.to_thread.run_sync(lambda: keys_in(store, "f-")) == {"f-held"}


@pytest.fixture
def tcp_store(pg_database: str, tmp_path: Path) -> Iterator[Store]:
    store = Store.open(f"{pg_database}?tcp_user_timeout=7000&keepalives_idle=4",
                       tmp_path / "blobs", pool_size=1)
    try:
        yield store
    finally:
        store.close()


def test_every_store_connection_carries_the_dead_path_bounds(tcp_store: Store) -> None:
    """Pooled connections have TCP keep-alive and a user timeout (the URL's own values win
    over the defaults): a silent cut ends them instead of leaving a node waiting."""
    with tcp_store.engine.connect() as conn:
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        # A second descriptor of the same socket (closed here; the connection's stays).
        with socket.socket(fileno=socket.dup(dbapi_connection.fileno())) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 4
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == (
                CONNECTION_DEFAULTS["keepalives_interval"])
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == (
                CONNECTION_DEFAULTS["keepalives_count"])


def _can_unshare_the_network() -> str | None:
    """Why a real cut cannot be made here (None: it can)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare(1) and ip(8) (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        return f"cannot make a network namespace here: {probe.stderr.decode().strip()}"
    return None


@pytest.mark.skipif(_can_unshare_the_network() is not None,
                    reason=str(_can_unshare_the_network()))
def test_a_real_silent_cut_ends_statements_and_the_listener_in_bounded_time(
    tmp_path: Path,
) -> None:
    """A real cut (packets dropped, nothing closed) in a network namespace of its own
    (tests/pg_cut_probe.py): the idle LISTEN connection is found dead by its keep-alive,
    a statement sent into the dead path fails after tcp_user_timeout (and the pool's new
    attempt after connect_timeout), both as store errors, and all works again once the
    path is back."""
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.pg_cut_probe", str(tmp_path)],
        capture_output=True, text=True, timeout=180, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    listener, read, write = result["listener"], result["read"], result["write"]
    # Bounds: 2 s of unacknowledged data, 2 s per attempt, keep-alive after 1 + 1 * 2 s.
    assert "broke" in listener[1] and listener[0] < BOUND
    assert "database is unavailable" in read[1] and 2.0 <= read[0] < BOUND
    assert "database is unavailable" in write[1] and write[0] < BOUND
    assert result["keys"] == ["cut-after", "cut-before"]  # the failed write saved nothing
    assert result["recovered"] < BOUND
