"""Several server processes on one store: the store event relay and ``ota server --workers``.

Relay tests run two relays in this process over one SQLite file (two ``Store`` objects, as
two processes would open it). The end-to-end test starts ``ota server --workers 2`` as a
subprocess on free ports, connects emulated devices over TLS and DTLS, proves from the
``event_log`` table (each row names the process that published it) that both processes
hold sessions, then drives releases and a flash through the main process's API, reads its
SSE stream, SIGKILLs the worker and shuts everything down with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import trio

from otacore.signing import TrustStore
from server.app import ServerConfig, serve
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from server.events import STATUS, Event, EventBus
from server.relay import EventRelay, RelaySettings
from server.store import Store
from server.store.schema import devices, event_log
from server.store.tx_events import append_events, last_event_id
from tests.server_nodes import provisioned_product
from tests.test_event_history import assert_stored_once
from tests.test_ota_e2e_kit import APP_V1, FAST, SYSTEM_5003, app, updated_to

REPO = Path(__file__).resolve().parent.parent
FAST_RELAY = RelaySettings(flush_interval=0.01, poll_interval=0.02)


# -- the relay, in process ---------------------------------------------------------------------


@asynccontextmanager
async def relay_pair(
    tmp_path: Path, settings: RelaySettings = FAST_RELAY
) -> AsyncIterator[tuple[EventRelay, EventRelay]]:
    """Two relays ("a" prunes, "b" does not) on two stores over one SQLite file."""
    stores = [Store.open_dir(tmp_path, pool_size=2) for _ in range(2)]
    try:
        a = EventRelay(stores[0], EventBus(), "a", settings=settings, prune=True)
        b = EventRelay(stores[1], EventBus(), "b", settings=settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            yield a, b
            nursery.cancel_scope.cancel()
    finally:
        for store in stores:
            store.close()


async def received(relay: EventRelay, count: int, timeout: float = 20.0) -> list[Event]:
    """The first ``count`` events ``relay``'s bus publishes from now on."""
    with relay.bus.subscribe(buffer=1000) as sub:
        return await take(sub.receive, count, timeout)


async def take(
    receive: trio.MemoryReceiveChannel[Event], count: int, timeout: float = 20.0
) -> list[Event]:
    """The next ``count`` events of a subscription (TooSlowError after ``timeout`` s)."""
    got: list[Event] = []
    with trio.fail_after(timeout):
        while len(got) < count:
            got.append(await receive.receive())
    return got


def log_rows(store: Store) -> list[tuple[str, str, str | None]]:
    with store.read() as tx:
        rows = tx.conn.execute(
            sa.select(event_log.c.origin, event_log.c.name, event_log.c.data).order_by(
                event_log.c.id
            )
        ).all()
    return [(r.origin, r.name, r.data) for r in rows]


async def test_events_cross_both_ways_once_and_in_order(tmp_path: Path) -> None:
    async with relay_pair(tmp_path) as (a, b):
        with b.bus.subscribe(buffer=1000) as at_b, a.bus.subscribe(buffer=1000) as at_a:
            for n in range(3):
                a.bus.publish(Event("test/a", str(n), product_id=7, device_id="d1", ttl=5))
            got = await take(at_b.receive, 3)
            assert [(e.name, e.data, e.product_id, e.device_id, e.ttl) for e in got] == [
                ("test/a", str(n), 7, "d1", 5) for n in range(3)
            ]
            await take(at_a.receive, 3)  # a's own subscribers see its events too
            b.bus.publish(Event("test/b", "x"))
            (back,) = await take(at_a.receive, 1)
            assert (back.name, back.data) == ("test/b", "x")
            # Nothing comes back: had b re-appended a's events (or a b's), the echo would be
            # queued in its outbox before these markers, so it would be in the log, and
            # relayed, before them. Each marker crossing proves the other side's outbox
            # was flushed past anything it received earlier.
            b.bus.publish(Event("test/marker", "from b"))
            assert [e.data for e in await take(at_a.receive, 1)] == ["from b"]
            a.bus.publish(Event("test/marker", "from a"))
            # (b's own subscribers saw its own two events first.)
            assert [e.data for e in await take(at_b.receive, 3)] == ["x", "from b", "from a"]
        rows = log_rows(a.store)
        # Each event appended once, by its publisher; relayed events are never re-appended.
        assert rows == [("a", "test/a", str(n)) for n in range(3)] + [
            ("b", "test/b", "x"),
            ("b", "test/marker", "from b"),
            ("a", "test/marker", "from a"),
        ]
        assert a.stats.received == 2 and b.stats.received == 4
        with trio.fail_after(20):  # a's last flush counts itself once its transaction is in
            while a.stats.appended < 4:
                await trio.sleep(0.01)
        assert a.stats.appended == 4 and b.stats.appended == 2


async def test_a_new_relay_does_not_replay_history(tmp_path: Path) -> None:
    store = Store.open_dir(tmp_path, pool_size=1)
    try:
        with store.write() as tx:
            append_events(tx.conn, "old", [Event("test/old", str(n)) for n in range(5)])
    finally:
        store.close()
    async with relay_pair(tmp_path) as (a, b):
        assert a.stats.last_id == b.stats.last_id == 5
        with b.bus.subscribe() as sub:
            a.bus.publish(Event("test/new", "1"))
            a.bus.publish(Event("test/marker", "2"))
            # History would come first (it has the lower ids): b publishes only what came
            # after it started, up to the marker.
            events = await take(sub.receive, 2)
            assert [(e.name, e.data) for e in events] == [("test/new", "1"), ("test/marker", "2")]
            assert sub.receive.statistics().current_buffer_used == 0


async def test_pruning_keeps_the_newest_row_and_ids_never_go_back(tmp_path: Path) -> None:
    async with relay_pair(tmp_path) as (a, b):
        old = time.time_ns() // 1_000_000 - 600_000
        for n in range(4):
            a.bus.publish(Event("test/old", str(n), published_at=old))
        await received(b, 4)
        assert await a.prune_now(retention=60.0) == 3  # every old row but the newest
        assert [r[2] for r in log_rows(a.store)] == ["3"]
        with a.store.read() as tx:
            before = last_event_id(tx.conn)
        a.bus.publish(Event("test/new", "after prune"))
        (event,) = await received(b, 1)  # b reads after id 4: the new row must be above it
        assert event.data == "after prune"
        with a.store.read() as tx:
            assert last_event_id(tx.conn) == before + 1


async def test_a_full_buffer_drops_from_the_relay_only(tmp_path: Path) -> None:
    slow = RelaySettings(flush_interval=0.5, poll_interval=0.02, buffer=3)
    async with relay_pair(tmp_path, slow) as (a, b):
        with a.bus.subscribe() as local:
            for n in range(5):
                a.bus.publish(Event("test/burst", str(n)))
            assert local.receive.statistics().current_buffer_used == 5  # all local ones
        assert a.stats.dropped == 2
        got = await received(b, 3)
        assert [e.data for e in got] == ["0", "1", "2"]


async def test_a_flush_cancelled_before_its_write_loses_no_event(tmp_path: Path) -> None:
    """Regression (an end-to-end run under load lost the main process's last "offline"
    events from the relay's log, while the history stored them): the flush had taken its
    batch off the buffer when the server's nursery was cancelled, and
    ``to_thread.run_sync`` raised Cancelled before its thread ran, so the batch was in
    neither the buffer nor the store. The relay now puts such a batch back for its last
    flush on the way out. (The history's recorder had the same flaw and the same fix; there
    a cancellation first meets its write lock's checkpoint, so a test cannot place it.)"""
    store = Store.open_dir(tmp_path, pool_size=2)
    try:
        # Hour-long intervals: only the flushes below write anything.
        relay = EventRelay(store, EventBus(), "a",
                           settings=RelaySettings(flush_interval=3600.0, poll_interval=3600.0))
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            for n in range(3):
                relay.bus.publish(Event(STATUS, f"late {n}", product_id=1, device_id="d1"))
            with trio.CancelScope() as scope:
                scope.cancel()  # as when the server stops while a flush begins
                await relay.flush()  # raises Cancelled (absorbed by the scope)
            nursery.cancel_scope.cancel()  # the last flush on the way out
        assert log_rows(store) == [("a", STATUS, f"late {n}") for n in range(3)]
    finally:
        store.close()


async def test_a_single_process_server_runs_no_relay(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path, api_port=0, device_port=0, workers=1)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(serve, config)
        assert handle.relay is None and handle.workers is None and handle.bus.tap is None
        handle.shutdown.set()
    assert log_rows(Store.open_dir(tmp_path, pool_size=1)) == []


# -- ota server --workers 2, end to end ----------------------------------------------------------

DEVICES = 12  # alternating TLS / DTLS: all in one process by chance with p = 2 / 2**12


class ServerProcess:
    """``ota server --workers 2`` as a subprocess, with what it printed."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.lines: dict[str, str] = {}

    @classmethod
    async def start(cls, data: Path, log_path: Path) -> ServerProcess:
        """``ota server --workers 2`` on ``data``, free ports, stderr appended to ``log_path``
        (the caller stops the process)."""
        argv = [sys.executable, "-m", "server.cli.main", "server", "--data", str(data),
                "--api-port", "0", "--device-port", "0", "--workers", "2",
                # The relay's log keeps every event of the run, however slow the machine:
                # the end-to-end test checks the stored history against it (the default
                # 120 s retention pruned a busy run's first events before the check).
                "--set", "relay.retention=3600"]  # fmt: skip
        with log_path.open("ab") as log:
            process = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=log.fileno(), cwd=REPO
            )
        return cls(process, log_path)

    async def read_banner(self) -> None:
        assert self.process.stdout is not None
        text = ""
        with trio.fail_after(60):
            while "ota server: worker 1 pid" not in text:
                chunk = await self.process.stdout.receive_some(4096)
                assert chunk, f"the server exited: {text} {self.log_path.read_text()}"
                text += chunk.decode()
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            self.lines[head] = value

    def address(self, name: str) -> tuple[str, int]:
        host, _, port = self.lines[f"ota server: devices on {name}"].rpartition(":")
        return host, int(port)

    @property
    def api_url(self) -> str:
        return self.lines["ota server: API listening on"]

    @property
    def worker_pid(self) -> int:
        return int(self.lines["ota server: worker 1 pid"])


def online_origins(store: Store) -> dict[str, str]:
    """Device -> origin (process: "<role>-<pid>", without the node id) of its latest
    ``spark/status`` "online" in the log."""
    with store.read() as tx:
        rows = tx.conn.execute(
            sa.select(event_log.c.device_id, event_log.c.origin)
            .where(event_log.c.name == STATUS, event_log.c.data == "online")
            .order_by(event_log.c.id)
        ).all()
    return {row.device_id: row.origin.rpartition(":")[2] for row in rows}


def session_owners(store: Store) -> dict[str, str]:
    """Device -> origin ("<role>-<pid>", without the node id) of the process holding its
    live session, from the store's presence column (a session sets it, durably, before it
    answers the device's Hello)."""
    with store.read() as tx:
        rows = tx.conn.execute(sa.select(devices.c.id, devices.c.session_owner)).all()
    return {
        row.id: row.session_owner.rpartition("/")[0].rpartition(":")[2]
        for row in rows
        if row.session_owner
    }


def worker_held(store: Store, origin: str) -> list[str]:
    """The devices whose live session the process ``origin`` holds."""
    return sorted(d for d, o in session_owners(store).items() if o == origin)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


async def sse_reader(
    client: httpx.AsyncClient, url: str, out: list[dict[str, Any]], opened: trio.Event
) -> None:
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        name = None
        async for line in response.aiter_lines():
            if line == ":ok":
                opened.set()
            elif line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name is not None:
                out.append({"event": name, **json.loads(line[len("data: ") :])})
                name = None


async def spread_over_both_processes(fleet: EmulatedFleet, store: Store,
                                     device_id: str) -> None:
    """Wait until both server processes hold sessions. The kernel spreads connections over
    them at random (SO_REUSEPORT hashes the source port): with 12 devices all land in one
    process with p = 2**-11. Then reset ``device_id`` (a new source port each time) until
    both processes hold some."""
    with trio.fail_after(120):
        while len(set(session_owners(store).values())) < 2:
            runner = fleet.device(device_id)
            sessions_before = runner.device.sessions
            runner.reset()
            await fleet.wait_until(
                lambda f, r=runner, n=sessions_before: r.device.sessions > n
                and r.device.online
            )


async def wait_or_explain(fleet: EmulatedFleet, condition: Callable[[EmulatedFleet], bool],
                          what: str, server: ServerProcess, store: Store,
                          timeout: float = 60) -> None:
    """``fleet.wait_until``; on timeout an AssertionError that says where each device stands
    (emulator phase and version, the process holding its session) and ends the server log."""
    try:
        await fleet.wait_until(condition, timeout=timeout)
    except trio.TooSlowError:
        owners = session_owners(store)
        devices = "; ".join(
            f"{status.device_id[:8]} {status.phase.value} v{status.product_version} "
            f"on {owners.get(status.device_id, 'no session')}"
            for status in fleet.statuses())
        raise AssertionError(
            f"{what}: not after {timeout} s. {fleet.summary().line()}. {devices}. "
            f"Server log: {server.log_path.read_text()[-4000:]}") from None


def setup_store(data: Path, creds: Path) -> tuple[int, list[str], str]:
    """A product with DEVICES provisioned devices and an owner's API token."""
    return provisioned_product(data, creds, DEVICES)


async def test_two_processes_serve_one_fleet(tmp_path: Path) -> None:
    data, creds, log_path = tmp_path / "data", tmp_path / "creds", tmp_path / "server.log"
    product, ids, token = await trio.to_thread.run_sync(setup_store, data, creds)
    server = await ServerProcess.start(data, log_path)
    process = server.process
    store = Store.open_dir(data, pool_size=1)
    try:
        await server.read_banner()
        await _drive(server, store, product, ids, token, creds, tmp_path / "state")
        # Graceful stop: the worker goes too (its devices got their farewell).
        worker = server.worker_pid
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0, log_path.read_text()[-3000:]
        assert (
            not Path(f"/proc/{worker}").exists()
            or "zombie" in Path(f"/proc/{worker}/status").read_text()
        )
        # Each process stored its own events, once (issue 17's history); the SIGKILLed
        # worker may have lost its last ones.
        assert_stored_once(store, ids, killed=1)
    finally:
        store.close()
        if process.returncode is None:
            for pid in children(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()


async def _drive(
    server: ServerProcess,
    store: Store,
    product: int,
    ids: list[str],
    token: str,
    creds: Path,
    state_root: Path,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    trust = TrustStore.initial(product, read_trust_file(creds / TRUST_FILE))
    found = dict(find_credentials(creds))
    kinds = ["tcp" if n % 2 == 0 else "udp" for n in range(len(ids))]
    members = [
        FleetMember(device_id, found[device_id], state_root / device_id, kind)  # type: ignore[arg-type]
        for device_id, kind in zip(ids, kinds, strict=True)
    ]
    settings = FleetSettings(
        server=server.address("TLS"), udp_server=server.address("DTLS"),
        firmware=(SYSTEM_5003, APP_V1), trust_store=trust, **FAST,
        # A DTLS device learns that its server died from a missed keep-alive (no FIN).
        keepalive_interval=1.0, keepalive_timeout=2.0,
    )  # fmt: skip
    fleet = EmulatedFleet(members, settings)
    sse: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(base_url=server.api_url, headers=headers, timeout=30) as api,
        trio.open_nursery() as nursery,
    ):
        opened = trio.Event()
        nursery.start_soon(sse_reader, api, f"/v1/products/{product}/events", sse, opened)
        with trio.fail_after(30):
            await opened.wait()
        files = {"binary": ("system-part1.bin", SYSTEM_5003, "application/octet-stream")}
        response = await api.post("/v1/device-os", files=files)
        assert response.status_code == 201, response.text
        for version in (2, 3):
            files = {"binary": ("app.bin", app(version), "application/octet-stream")}
            response = await api.post(
                f"/v1/products/{product}/firmware",
                data={"version": str(version), "title": f"v{version}"},
                files=files,
            )
            assert response.status_code == 201, response.text
        await nursery.start(fleet.run)
        await wait_or_explain(fleet, lambda f: f.summary().online == len(ids),
                              "every device online", server, store)
        await spread_over_both_processes(fleet, store, ids[0])

        # Both processes hold sessions: the process that published each device's "online".
        with trio.fail_after(20):
            while len(origins := online_origins(store)) < len(ids):
                await trio.sleep(0.05)
        worker_origin = f"worker1-{server.worker_pid}"
        held = {origin.split("-")[0] for origin in origins.values()}
        assert held == {"main", "worker1"}, origins
        on_worker = [d for d, origin in origins.items() if origin == worker_origin]
        per_process = {p: [o.split("-")[0] for o in origins.values()].count(p) for p in held}
        print("sessions per process:", per_process)

        # The main API's SSE stream shows the worker's devices coming online.
        def sse_online() -> set[str]:
            return {e["coreid"] for e in sse if e["event"] == STATUS and e["data"] == "online"}

        with trio.fail_after(30):
            while not set(on_worker) <= sse_online():
                await trio.sleep(0.05)

        # An immediate release reaches every device, the worker's included.
        response = await api.put(
            f"/v1/products/{product}/firmware/release",
            json={"version": 2, "product_default": True, "intelligent": True, "force": True},
        )
        assert response.status_code == 200, response.text
        await wait_or_explain(fleet, lambda f: all(updated_to(d, 2)(f) for d in ids),
                              "every device runs version 2", server, store)

        # A flash of a device the worker holds reaches it (the update's reboots moved
        # devices: look again which process holds each one's session now).
        held_now = worker_held(store, worker_origin)
        assert held_now, f"the worker holds no session now: {session_owners(store)}"
        target = held_now[0]
        response = await api.put(
            f"/v1/products/{product}/devices/{target}",
            json={"desired_firmware_version": 3, "flash": True},
        )
        assert response.status_code == 200, response.text
        await wait_or_explain(fleet, updated_to(target, 3), f"{target} runs version 3",
                              server, store)

        # SIGKILL the worker: it is restarted and its devices come back online.
        on_worker = worker_held(store, worker_origin)
        assert on_worker, f"the worker holds no session now: {session_owners(store)}"
        sessions = {d: fleet.device(d).device.sessions for d in on_worker}
        os.kill(server.worker_pid, signal.SIGKILL)
        with trio.fail_after(30):
            while not [p for p in children(server.process.pid) if p != server.worker_pid]:
                await trio.sleep(0.1)
        # The supervisor starts a new worker only after it cleared the dead one's presence
        # (WorkerSupervisor._keep_running): no device is left "online" in a dead process,
        # whether the supervisor marked it offline or it had reconnected to main first.
        left = [d for d, owner in session_owners(store).items() if owner == worker_origin]
        assert left == [], f"still held by the dead worker: {left}; log: " + (
            server.log_path.read_text()[-3000:])

        def back(f: EmulatedFleet) -> bool:
            return f.summary().online == len(ids) and all(
                f.device(d).device.sessions > n for d, n in sessions.items()
            )

        try:
            await fleet.wait_until(back, timeout=60)
        except trio.TooSlowError:
            now = [(d, fleet.device(d).device.sessions, n) for d, n in sessions.items()]
            raise AssertionError(
                f"not back: {now} {fleet.summary().line()} {server.log_path.read_text()[-3000:]}"
            ) from None
        assert f"worker 1 (pid {server.worker_pid}) exited" in server.log_path.read_text()
        nursery.cancel_scope.cancel()
