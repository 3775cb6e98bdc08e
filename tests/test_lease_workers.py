"""Every server process keeps the session leases of its own sessions (issue 16 item 3 with
``ota server --workers``): the main process and each worker process run their own lease
keeper, which renews exactly the leases whose session tokens ("<process origin>/<serial>")
name that process, closes that process's sessions whose lease went elsewhere, and frees its
sessions that ended while the store could not record it. So a worker closes its own stale
session, a worker's session that ended unrecorded does not stay "online", and the leases of
a process that hangs or died (any process but the live one renewing) run out.

The renewal statement on SQLite and PostgreSQL (two "nodes" on one database, a settable
wall clock), then a real ``ota server --workers 2`` on PostgreSQL with real TLS devices;
the other node's takeover and an unrecorded session end are direct store writes, as the
in-process tests (tests/test_lease_stale_sessions.py, tests/test_lease_ended_sessions.py)
do them. Every wait is for a condition.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from server.app import ServerConfig, ServerHandle, serve
from server.store import Store
from server.store import schema as t
from tests.device_client import LinkDevice
from tests.server_nodes import Node, provisioned_product, running_node
from tests.test_leases import LEASE_MS, T0, Clock, _fleet

# -- the renewal statement ---------------------------------------------------------------------

#: Devices of the renewal test and the session (token, node) each is written with.
PRESENCES = {
    "0123456789abcdef00000001": ("node-a:main-1/1", "node-a"),  # the renewing process
    "0123456789abcdef00000002": ("node-a:main-1/7", "node-a"),  # ... its other session
    "0123456789abcdef00000003": ("node-a:worker1-2/1", "node-a"),  # another process here
    "0123456789abcdef00000004": ("node-a:main-12/1", "node-a"),  # "main-1" is its prefix
    "0123456789abcdef00000005": ("node-a:main-1/3", "node-b"),  # same token, other node
}
RENEWING = "node-a:main-1"


async def test_a_renewal_extends_only_the_leases_of_its_own_process(
    store: Store, reopen: Callable[..., Store]
) -> None:
    with store.write() as tx:
        product = tx.insert_product(slug="p", name="P", platform_id=13, description="", now=1)
        for device_id in PRESENCES:
            tx.insert_device(device_id, product.id, 1)
    clock = Clock()
    fleets = {"node-a": _fleet(store, "node-a", clock)[0],
              "node-b": _fleet(reopen(), "node-b", clock)[0]}
    for device_id, (token, node) in PRESENCES.items():
        await fleets[node].device_online(device_id, session=token)
    clock.advance(10_000)
    renewed = await fleets["node-a"].renew_session_leases(RENEWING)
    mine = {(d, token) for d, (token, node) in PRESENCES.items()
            if node == "node-a" and token.startswith(f"{RENEWING}/")}
    assert renewed == mine and len(mine) == 2
    d = t.devices.c
    with store.read() as tx:
        until = dict(tx.conn.execute(sa.select(d.id, d.session_lease_until)).all())
    for device_id in PRESENCES:
        expected = T0 + 10_000 + LEASE_MS if (device_id, PRESENCES[device_id][0]) in mine \
            else T0 + LEASE_MS  # the other processes' and nodes' leases: theirs to renew
        assert until[device_id] == expected, device_id
    # The other process renews its own (and finds nothing else).
    assert await fleets["node-a"].renew_session_leases("node-a:worker1-2") == {
        ("0123456789abcdef00000003", "node-a:worker1-2/1")}
    with pytest.raises(ValueError, match="origin"):
        await fleets["node-a"].renew_session_leases("node-a:main-1/1")


async def test_a_server_without_device_listeners_renews_no_session_lease(tmp_path: Path) -> None:
    """Without a device plane a process holds no session: it runs no lease keeper (nor
    renews its node's other processes' leases)."""
    config = ServerConfig(data_dir=tmp_path, api_port=0, device_port=None)
    async with trio.open_nursery() as nursery:
        handle: ServerHandle = await nursery.start(serve, config)
        assert handle.devices is None and handle.session_leases is None
        handle.shutdown.set()


# -- ota server --workers 2 ----------------------------------------------------------------------

#: Short leases so an unrenewed one runs out within seconds; a renewal may be late by
#: 3.5 s (a busy machine) before a live session's lease expires.
LEASE_SECONDS = 4.0
LEASE = ["--session-lease", str(LEASE_SECONDS), "--lease-renew-interval", "0.5"]
DEVICES = 8
#: Seconds each condition may take (a few renew intervals normally; slack for busy CPUs).
WAIT = 30.0


def _presence(engine: sa.Engine, device_id: str) -> tuple[bool, str | None, str | None, int]:
    """(online, session owner, session node, lease until) of a device."""
    d = t.devices.c
    with engine.connect() as conn:
        row = conn.execute(sa.select(d.online, d.session_owner, d.session_node,
                                     d.session_lease_until).where(d.id == device_id)).one()
    return bool(row[0]), row[1], row[2], int(row[3] or 0)


def _write_presence(engine: sa.Engine, device_id: str, owner: str, node: str,
                    until: int) -> None:
    """What a session (of any process, any node) leaves in the store while it holds the
    device."""
    d = t.devices.c
    with engine.begin() as conn:
        conn.execute(sa.update(t.devices).where(d.id == device_id).values(
            online=True, session_owner=owner, session_node=node, session_lease_until=until))


async def _wait(engine: sa.Engine, check: Callable[[], bool], what: str, node: Node) -> None:
    """Poll ``check()`` (store reads: in a thread) until true; fail after WAIT seconds with
    the end of the server's log."""
    try:
        with trio.fail_after(WAIT):
            while not await trio.to_thread.run_sync(check):
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"not within {WAIT} s: {what}; server log: "
                             f"{node.log_path.read_text()[-3000:]}") from None
    print("reached:", what)


async def _on_worker(node: Node, creds: Path, engine: sa.Engine, device_id: str,
                     ) -> tuple[LinkDevice, str]:
    """``device_id`` connected (TLS, Hello answered) with its session in worker 1; its
    session token. The kernel spreads connections over the processes at random
    (SO_REUSEPORT hashes the source port): reconnect from a new port until it lands there."""
    with trio.fail_after(WAIT):
        while True:
            device = await LinkDevice.connect(creds, device_id, "tcp", node.address("TLS"))
            await device.hello()  # answered once the session's presence is stored
            owner = (await trio.to_thread.run_sync(_presence, engine, device_id))[1]
            assert owner is not None, f"{device_id}: no presence after its Hello"
            if ":worker1-" in owner:
                return device, owner
            await device.aclose()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_worker_keeps_the_leases_of_its_own_sessions(
    tmp_path: Path, pg_database: str
) -> None:
    data, creds = tmp_path / "data", tmp_path / "creds"
    _, ids, _ = await trio.to_thread.run_sync(
        partial(provisioned_product, data, creds, DEVICES, db_url=pg_database))
    stale_id, kept_id, ended_id, orphan_id = ids[:4]
    engine = sa.create_engine(pg_database)
    devices: list[LinkDevice] = []
    try:
        async with running_node(data, pg_database, tmp_path / "node.log", workers=2,
                                node_id="node-a", extra=LEASE) as node:
            stale, stale_token = await _on_worker(node, creds, engine, stale_id)
            kept, kept_token = await _on_worker(node, creds, engine, kept_id)
            devices += [stale, kept]
            worker = stale_token.rpartition("/")[0]  # "node-a:worker1-<pid>"
            assert kept_token.startswith(f"{worker}/")
            worker_pid = int(worker.rpartition("-")[2])
            kept_until = (await trio.to_thread.run_sync(_presence, engine, kept_id))[3]

            far = _now_ms() + 3_600_000
            # Node B took the stale device's lease (it reconnected there across a split).
            taken = ("node-b:main-1/1", "node-b")
            await trio.to_thread.run_sync(_write_presence, engine, stale_id, *taken, far)
            # A session of the worker that ended while its offline write failed.
            ended = f"{worker}/999999"
            await trio.to_thread.run_sync(_write_presence, engine, ended_id, ended, "node-a",
                                          _now_ms() + round(LEASE_SECONDS * 1000))
            # A session of a process of this node that is gone (its presence not cleared):
            # no live process renews its lease, so the sweeper frees the device.
            await trio.to_thread.run_sync(_write_presence, engine, orphan_id,
                                          "node-a:worker9-1/1", "node-a",
                                          _now_ms() + round(LEASE_SECONDS * 1000))

            # The worker closes its stale session (its lease is node B's) ...
            with trio.fail_after(WAIT):
                await stale.wait_closed(timeout=WAIT)
            assert _presence(engine, stale_id)[1:3] == taken  # ... leaving B's presence
            # ... and frees the device of its session that ended unrecorded.
            await _wait(engine, lambda: _presence(engine, ended_id)[:3] == (False, None, None),
                        "the worker's ended session's device is offline", node)
            await _wait(engine, lambda: _presence(engine, orphan_id)[:3] == (False, None, None),
                        "the gone process's device is offline (its lease ran out)", node)
            # The worker's live session keeps its lease: renewed past its first expiry.
            await _wait(engine, lambda: _presence(engine, kept_id)[3] > kept_until + 1000,
                        "the worker's live session's lease is renewed", node)
            assert _presence(engine, kept_id)[:3] == (True, kept_token, "node-a")

            # A hung worker: nobody renews its leases; the sweeper frees its devices ...
            os.kill(worker_pid, signal.SIGSTOP)
            try:  # (never leaves a stopped process behind)
                await _wait(engine, lambda: not _presence(engine, kept_id)[0],
                            "the hung worker's device is offline", node)
            finally:
                os.kill(worker_pid, signal.SIGCONT)
            # ... and once it runs again, it closes the session whose lease it lost.
            with trio.fail_after(WAIT):
                await kept.wait_closed(timeout=WAIT)
            assert _presence(engine, kept_id)[:3] == (False, None, None)
    finally:
        for device in devices:
            await device.aclose()
        engine.dispose()
