"""What a real server keeps per idle DTLS session, by tracemalloc (issue 14 item 4's memory goal).

:func:`measure_idle_dtls_sessions` starts the real server in this process (REST API, store,
device plane, DTLS endpoint: ``tests.device_server``), holds a few warm-up sessions (the
one-time allocations of the first sessions are not per session), starts tracemalloc, then
opens ``count`` more sessions from a separate process (``tests.dtls_idle_devices``: full
mutual-auth DTLS 1.2 handshakes with pyOpenSSL, one CoAP ping each, as
``bench/sessions/plane_ping_cost.py`` does), waits until every session is idle, and returns
the Python allocations that grew, in total and by source line. The devices' own allocations
are in their process, so everything traced here is the server's.

    .venv/bin/python -m tests.dtls_footprint [COUNT] [--top N] [--frames N] [--hello]

prints the figure and the biggest growths by file:line (``--frames`` > 1 groups by
traceback instead, the innermost frame first).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import subprocess
import sys
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import trio

from server.devices.plane import DevicePlane
from server.event_history import HistorySettings
from server.relay import RelaySettings
from server.transport import SessionLimits
from tests.device_server import DeviceServerKit, start_device_server

#: Sessions opened before the census starts (what the first sessions allocate once: import
#: caches, the store's statement cache, pools).
WARM_UP = 10
#: Seconds the device process may take for all its handshakes.
OPEN_TIMEOUT = 300.0
#: The server's handshake timeout here (``SessionLimits.handshake_timeout``, 10 s by
#: default): the census waits this long after the last handshake, see _until_settled.
HANDSHAKE_TIMEOUT = 3.0


@dataclass
class Footprint:
    """The server's Python allocations that grew while ``sessions`` idle sessions opened."""

    sessions: int
    total_bytes: int
    growth: list[tracemalloc.StatisticDiff]

    @property
    def bytes_per_session(self) -> float:
        return self.total_bytes / self.sessions


def _plane(kit: DeviceServerKit) -> DevicePlane:
    plane = kit.handle.devices
    assert plane is not None
    return plane


async def _until_idle(kit: DeviceServerKit, device_ids: list[str]) -> None:
    """Wait (a condition, bounded) until each device has a live session with no task,
    whose updater has handled every kick."""
    plane = _plane(kit)
    with trio.fail_after(OPEN_TIMEOUT):
        while True:
            handlers = [plane.live.get(device_id) for device_id in device_ids]
            if all(
                handler is not None and handler.task_count == 0
                and (handler.updater is None
                     or handler.updater.handled.value >= handler.updater.kicks)
                for handler in handlers
            ):
                return
            await trio.sleep(0.05)


async def _until_settled(kit: DeviceServerKit) -> None:
    """Wait out what a finished handshake leaves behind for a while, then until the store
    is quiet.

    Trio keeps a cancel scope's deadline in its heap until that deadline passes, even once
    the scope has exited (the handshake's ``move_on_after``), so each session's handshake
    scope outlives it by up to ``handshake_timeout``: a fixed wait. The sessions' store
    writes (hellos, presence) may still be queued or running after it on a slow or busy
    machine: a condition, until the group committer, the grouped reads and the store's
    worker threads have all been idle for a few polls in a row. Transient, not what an
    idle session keeps."""
    await trio.sleep(HANDSHAKE_TIMEOUT + 0.1)
    store, fleet = kit.handle.store, kit.handle.fleet
    quiet_polls = 0
    with trio.fail_after(OPEN_TIMEOUT):
        while quiet_polls < 3:
            await trio.sleep(0.05)
            quiet = (store.group_commit.idle() and store.group_read.idle()
                     and fleet.limiter.borrowed_tokens == 0)
            quiet_polls = quiet_polls + 1 if quiet else 0
    await trio.lowlevel.checkpoint()


#: The lines that call the DB-API (a cursor made, a statement run), by module: what
#: tracemalloc charges to them while sessions open is sqlite3's own bookkeeping, bounded per
#: pooled connection and not a session's. A connection keeps a weak reference to every
#: cursor it made and drops the dead ones only at every 200th new cursor (CPython's
#: Modules/_sqlite/connection.c, _pysqlite_drop_unused_cursor_references), and caches
#: prepared statements; how many of those references are pending when the census runs
#: depends on how the machine's speed spread the store's work over the connections.
_DBAPI_CALLS = {
    "sqlalchemy.pool.base": ("self.dbapi_connection.cursor(",),
    "sqlalchemy.engine.default": ("cursor.execute(statement, parameters)",),
    "server.store.store": ("dbapi_connection.cursor()", "cursor.execute(statement)"),
    "server.store.sqlite": ("dbapi_connection.execute(statement)",),
}


def _dbapi_bookkeeping_filters() -> list[tracemalloc.Filter]:
    """Filters leaving out the allocations made at :data:`_DBAPI_CALLS`' lines (found in
    the installed sources, so an edit elsewhere in those files moves nothing)."""
    filters = []
    for module_name, needles in _DBAPI_CALLS.items():
        path = importlib.import_module(module_name).__file__
        assert path is not None
        lines = Path(path).read_text().splitlines()
        found = [number for number, line in enumerate(lines, 1)
                 if any(needle in line for needle in needles)]
        if not found:
            raise RuntimeError(f"no DB-API call found in {path}: update _DBAPI_CALLS")
        filters += [tracemalloc.Filter(False, path, number) for number in found]
    return filters


def _fill_pool(kit: DeviceServerKit) -> None:
    """Open every connection the store's pool may hold, so that a pool growing under the
    measured sessions' concurrency (more on a busy machine) is not counted as theirs."""
    engine = kit.handle.store.engine
    size = engine.pool.size()  # type: ignore[attr-defined]  # QueuePool
    connections = [engine.connect() for _ in range(size)]
    for connection in connections:
        connection.close()


async def _open_devices(kit: DeviceServerKit, device_ids: list[str],
                        nursery: trio.Nursery, hello: bool) -> trio.Process:
    """Start a device process holding ``device_ids``' sessions; return once all are open."""
    host, port = kit.udp
    process: trio.Process = await nursery.start(lambda task_status: trio.run_process(
        [sys.executable, "-m", "tests.dtls_idle_devices", *(["--hello"] if hello else []),
         host, str(port), str(kit.creds_dir), *device_ids],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False, task_status=task_status,
    ))
    assert process.stdout is not None
    answer = b""
    with trio.fail_after(OPEN_TIMEOUT):
        while not answer.endswith(b"\n"):
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError("the device process ended before its sessions were open")
            answer += chunk
    if answer.strip() != f"ready {len(device_ids)}".encode():
        raise RuntimeError(f"the device process said {answer!r}")
    await _until_idle(kit, device_ids)
    return process


async def measure_idle_dtls_sessions(tmp_path: Path, count: int, frames: int = 1,
                                     hello: bool = False) -> Footprint:
    """The server's Python allocations per idle DTLS session (see the module docstring);
    ``hello``: each device also sends a Hello and a Describe, as Device OS does."""
    async with trio.open_nursery() as nursery:
        kit = await start_device_server(
            nursery, tmp_path, count=WARM_UP + count,
            device_limits=SessionLimits(handshake_timeout=HANDSHAKE_TIMEOUT),
            # No lease renewal or sweep, rollout tick, event log or history pruning inside
            # the census (a slow machine's census outlasts their 10-60 s periods): their
            # transient objects (SQLAlchemy compiling their statements the first time: the
            # statement cache) are not a session's.
            session_lease=7200.0, lease_renew_interval=3600.0, rollout_tick_interval=3600.0,
            relay=RelaySettings(prune_interval=3600.0),
            history=HistorySettings(history_prune_interval=3600.0))
        warm_ids, measured_ids = kit.device_ids[:WARM_UP], kit.device_ids[WARM_UP:]
        devices = [await _open_devices(kit, warm_ids, nursery, hello)]
        await _until_settled(kit)
        _fill_pool(kit)
        gc.collect()
        tracemalloc.start(frames)
        try:
            before = tracemalloc.take_snapshot()
            devices.append(await _open_devices(kit, measured_ids, nursery, hello))
            await _until_settled(kit)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        bookkeeping = _dbapi_bookkeeping_filters()
        before = before.filter_traces(bookkeeping)
        after = after.filter_traces(bookkeeping)
        growth = after.compare_to(before, "lineno" if frames == 1 else "traceback")
        total = sum(stat.size_diff for stat in growth)
        for process in devices:
            assert process.stdin is not None
            await process.stdin.aclose()
        with trio.fail_after(30):
            for process in devices:
                await process.wait()
        nursery.cancel_scope.cancel()
    return Footprint(count, total, growth)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=200)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--hello", action="store_true", help="devices send Hello + Describe")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        footprint = trio.run(measure_idle_dtls_sessions, Path(tmp), args.count, args.frames,
                             args.hello)
    print(f"{footprint.sessions} idle DTLS sessions: {footprint.total_bytes} bytes of Python "
          f"allocations, {footprint.bytes_per_session:.0f} B per session")
    for stat in footprint.growth[: args.top]:
        per = stat.size_diff / footprint.sessions
        where = "\n      ".join(str(frame) for frame in stat.traceback)
        print(f"{per:8.1f} B/session {stat.count_diff / footprint.sessions:6.2f} blocks  {where}")


if __name__ == "__main__":
    _main()
