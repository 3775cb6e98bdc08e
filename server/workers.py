"""Worker processes: more device planes on the same ports and the same store.

``ota server --workers K`` runs the main process (API, its own device plane, everything
``server.app.serve`` runs) and K-1 workers, each ``python -m server.workers``: its own trio
loop with the store, a :class:`Fleet`, an :class:`EventBus`, a device plane and an OTA
engine, but no API. Every process binds the device ports with SO_REUSEPORT, so the kernel
spreads TCP connections and UDP flows over them, and each owns the sessions it accepted; the
store relay (``server.relay``) carries events between them, so a release or a flash made
through the API reaches the process holding the device. Each process renews the session
leases of its own sessions (``server.leases.SessionLeaseKeeper``): a hung or dead worker's
leases run out, and a worker closes its own sessions whose lease went elsewhere.

The main process supervises its workers (:class:`WorkerSupervisor`): each runs under
``trio.run_process`` in the supervisor's nursery, gets its :class:`WorkerSpec` as one JSON
line on stdin, answers one JSON line ``{"ready": ...}`` on stdout once its listeners are
bound, and afterwards a status line (session count) whenever that changes. A worker that
exits is logged and restarted with exponential backoff. On shutdown the supervisor sends
SIGTERM: the worker shuts its device endpoint down gracefully (farewell and hold-off to
every device, as the single process does) and exits. A worker whose stdin closes (its main
process died, even by SIGKILL) does the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

from otacore.errors import OtaError
from server import metrics
from server.devices.ota import OtaConfig, OtaEngine
from server.devices.plane import DevicePlane, DevicePlaneConfig
from server.devices.tuning import DeviceTuning
from server.event_history import EventRecorder, HistorySettings
from server.events import EventBus
from server.fleet import Fleet
from server.fleet.presence import DEFAULT_LEASE_RENEW_INTERVAL, DEFAULT_SESSION_LEASE, LOCAL_NODE
from server.gc_tuning import CollectorSettings
from server.leases import SessionLeaseKeeper, check_lease_timings
from server.logs import configure_logging
from server.metrics.aggregate import worker_exited
from server.node_id import check_node_id
from server.relay import EventRelay, RelaySettings
from server.store import Store
from server.store.installation import open_installation_store
from server.transport import DeviceServer, SessionLimits

log = logging.getLogger("ota.workers")

#: Restart backoff of a worker that exited: from the first to the last, doubling.
RESTART_BACKOFF = (0.5, 30.0)
#: A worker that ran this long before exiting restarts after the shortest backoff again.
STABLE_AFTER = 60.0
#: Seconds a starting worker may take to report its listeners bound.
READY_TIMEOUT = 60.0
#: Tries at marking a dead worker's devices offline.
LOST_ATTEMPTS = 4


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (one JSON line on its stdin)."""

    index: int
    data_dir: str
    db_url: str | None
    host: str
    tcp_port: int
    udp_port: int
    store_threads: int = 8
    #: MiB of blob chunks the worker's store keeps in memory (ServerConfig.blob_cache_mb).
    blob_cache_mb: int = 64
    event_buffer: int = 256
    max_event_subscribers: int = 1000
    #: Seconds a worker waits for its devices' farewells when stopped.
    shutdown_grace: float | None = None
    #: The device listeners' :class:`SessionLimits` fields (None: the defaults).
    limits: dict[str, Any] | None = None
    #: The main process's :class:`OtaConfig` fields, its transfer policy as a nested
    #: object (None: the defaults).
    ota: dict[str, Any] | None = None
    #: The main process's :class:`DeviceTuning` fields (None: the defaults).
    tuning: dict[str, Any] | None = None
    #: The main process's :class:`RelaySettings` fields (None: the defaults).
    relay: dict[str, Any] | None = None
    #: The main process's :class:`CollectorSettings` fields (None: the defaults).
    collector: dict[str, Any] | None = None
    #: The main process's :class:`HistorySettings` fields (None: the defaults).
    history: dict[str, Any] | None = None
    #: Log level name, as ``ota server --log-level`` gave it to the main process.
    log_level: str = "info"
    #: Log line format, as ``ota server --log-format`` gave it ("text" or "json").
    log_format: str = "text"
    #: The node this worker belongs to (``cluster.node_id``: part of its origin), its
    #: session lease seconds and the seconds between its renewals of its own sessions'
    #: leases (``cluster.lease_renew_interval``: each process renews its own, see
    #: ``server.leases.SessionLeaseKeeper``).
    node_id: str = LOCAL_NODE
    session_lease: float = DEFAULT_SESSION_LEASE
    lease_renew_interval: float = DEFAULT_LEASE_RENEW_INTERVAL

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Parse :meth:`to_json`'s line (ValueError when it is not a spec)."""
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a worker spec: {exc}") from None


@dataclass(frozen=True)
class WorkerSettings:
    """The settings a worker runs with, as the main process sent them."""

    limits: SessionLimits
    ota: OtaConfig
    tuning: DeviceTuning
    relay: RelaySettings
    collector: CollectorSettings
    history: HistorySettings = field(default_factory=HistorySettings)

    @classmethod
    def from_spec(cls, spec: WorkerSpec) -> WorkerSettings:
        """Rebuild them from a spec (OtaError or msgspec.ValidationError when a field is
        wrong)."""
        return cls(
            msgspec.convert(spec.limits or {}, SessionLimits),
            msgspec.convert(spec.ota or {}, OtaConfig),
            msgspec.convert(spec.tuning or {}, DeviceTuning),
            msgspec.convert(spec.relay or {}, RelaySettings),
            msgspec.convert(spec.collector or {}, CollectorSettings),
            msgspec.convert(spec.history or {}, HistorySettings),
        )

    def digest(self) -> str:
        """A short fingerprint: a worker reports it when ready, so the main process (and a
        test) can see that the worker runs what it was told."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def process_origin(role: str, node_id: str) -> str:
    """The origin of this process (its relay's, its sessions'): node id, role and pid,
    unique among the live processes of every node (``cluster.node_id``). The pid comes last
    and the origin holds no "/" (a session token is "<origin>/<serial>")."""
    return f"{check_node_id(node_id)}:{role}-{os.getpid()}"


def open_worker_store(data_dir: Path, db_url: str | None, pool_size: int,
                      blob_cache_mb: int = 64) -> Store:
    """The store a server process opens (the embedded SQLite file unless ``db_url``)."""
    return open_installation_store(data_dir, db_url, pool_size=pool_size,
                                   blob_cache_bytes=blob_cache_mb * 1024 * 1024)


# -- the worker process --------------------------------------------------------------------


async def run_worker(spec: WorkerSpec, stdin: trio.abc.ReceiveStream) -> None:
    """A worker's life: store, bus, relay, fleet, device plane and OTA engine until SIGTERM,
    SIGINT or the end of ``stdin``; then a graceful device shutdown."""
    data_dir = Path(spec.data_dir)
    settings = WorkerSettings.from_spec(spec)
    check_lease_timings(spec.session_lease, spec.lease_renew_interval)
    settings.collector.apply_thresholds()  # a worker process is ours alone
    store = await trio.to_thread.run_sync(
        open_worker_store, data_dir, spec.db_url, spec.store_threads, spec.blob_cache_mb
    )
    try:
        bus = EventBus(buffer=spec.event_buffer, max_subscribers=spec.max_event_subscribers)
        fleet = Fleet(store, bus, limiter=trio.CapacityLimiter(spec.store_threads))
        fleet.configure_session_leases(spec.node_id, spec.session_lease)
        # No fleet.startup(): the main process freed its node's leases before any worker
        # started; a worker (re)starting must not touch other processes' devices.
        relay = EventRelay(store, bus, process_origin(f"worker{spec.index}", spec.node_id),
                           settings=settings.relay)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                # This worker's own events go to the stored history once, from here.
                await nursery.start(EventRecorder(store, bus, settings.history).run)
                await nursery.start(relay.run)
                plane = DevicePlane(
                    DevicePlaneConfig(
                        data_dir=data_dir,
                        host=spec.host,
                        port=spec.tcp_port,
                        udp_port=spec.udp_port,
                        reuse_port=True,
                        origin=relay.origin,
                        limits=settings.limits,
                        tuning=settings.tuning,
                    ),
                    fleet,
                    bus,
                )
                engine = OtaEngine(plane, settings.ota)
                nursery.start_soon(engine.watch_requests)
                # This worker renews its own sessions' leases and closes those of its
                # sessions whose lease went elsewhere (the main process renews only its
                # own: a hung worker's leases run out).
                keeper = SessionLeaseKeeper(fleet, plane, spec.lease_renew_interval)
                await nursery.start(keeper.run)
                server: DeviceServer = await nursery.start(plane.serve)
                _say(
                    {
                        "ready": True,
                        "pid": os.getpid(),
                        "origin": relay.origin,
                        "tcp": server.tcp_address,
                        "udp": server.udp_address,
                        "udp_buffers": server.udp_buffers,
                        "settings": settings.digest(),
                    }
                )
                log.info("worker: %s", settings.collector.started())
                nursery.start_soon(_report_sessions, plane)
                stop = trio.Event()
                nursery.start_soon(_set_on_signal, signals, stop)
                nursery.start_soon(_set_at_eof, stdin, stop)
                await stop.wait()
                await server.shutdown(spec.shutdown_grace)  # farewell + hold-off
                nursery.cancel_scope.cancel()  # the relay flushes what is left
    finally:
        store.close()


def _say(message: dict[str, object]) -> None:
    """One JSON line to the supervisor."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _report_sessions(plane: DevicePlane) -> None:
    """A status line whenever the number of sessions this process holds changed (checked
    once a second)."""
    reported = -1
    while True:
        count = len(plane.sessions)
        if count != reported:
            _say({"sessions": count})
            reported = count
        await trio.sleep(1.0)


async def _set_on_signal(signals: AsyncIterator[int], stop: trio.Event) -> None:
    async for _ in signals:
        stop.set()
        return


async def _set_at_eof(stdin: trio.abc.ReceiveStream, stop: trio.Event) -> None:
    """The main process holds the write end of our stdin: EOF means it is gone."""
    while await stdin.receive_some(4096):
        pass
    log.warning("worker: the main process is gone; shutting down")
    stop.set()


def main() -> None:
    """``python -m server.workers``: read the spec line from stdin, run until told to stop."""
    line = sys.stdin.buffer.readline()
    spec = WorkerSpec.from_json(line.decode())
    configure_logging(spec.log_level, prefix=f"worker {spec.index} [%(process)d] ",
                      log_format=spec.log_format,
                      origin=process_origin(f"worker{spec.index}", spec.node_id))
    # The rest of stdin is read by trio (nothing else is buffered: one line was written).
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    trio.run(run_worker, spec, stdin)


# -- the supervisor (main process) -----------------------------------------------------------


@dataclass
class WorkerState:
    """What the supervisor knows of one worker."""

    spec: WorkerSpec
    pid: int | None = None
    origin: str | None = None
    #: Sessions the worker holds (from its last status line).
    sessions: int = 0
    #: The worker's :meth:`WorkerSettings.digest`, from its ready line.
    settings: str | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)


class WorkerSupervisor:
    """Runs and restarts the worker processes (see the module docstring)."""

    def __init__(
        self,
        specs: list[WorkerSpec],
        *,
        stop_grace: float = 15.0,
        on_ready: Callable[[WorkerState], None] | None = None,
        on_lost: Callable[[str], Awaitable[object]] | None = None,
        expected_settings: str | None = None,
        metrics_dir: Path | None = None,
    ) -> None:
        self.workers = [WorkerState(spec) for spec in specs]
        #: Where the workers' metrics go (prometheus-client's multiprocess directory, in
        #: their environment from their start; None: their metrics are not collected).
        self.metrics_dir = metrics_dir
        #: The main process's WorkerSettings.digest(): a worker reporting another is logged.
        self.expected_settings = expected_settings
        self.stop_grace = stop_grace
        self.on_ready = on_ready
        #: Called with the origin of a worker that exited unasked (its sessions are gone).
        self.on_lost = on_lost
        self._stopping = False
        self._processes: dict[int, trio.Process] = {}

    async def run(self, *, task_status: trio.TaskStatus[WorkerSupervisor]) -> None:
        """Start every worker; report started once each is ready (or failed its first
        start); keep them running until :meth:`stop` or cancellation."""
        async with trio.open_nursery() as nursery:
            for state in self.workers:
                nursery.start_soon(self._keep_running, state)
            with trio.move_on_after(READY_TIMEOUT):
                for state in self.workers:
                    await state.ready.wait()
            task_status.started(self)

    async def stop(self) -> None:
        """Graceful stop: SIGTERM to every worker, wait for them (SIGKILL after
        ``stop_grace`` seconds)."""
        self._stopping = True
        for process in list(self._processes.values()):
            if process.returncode is None:
                process.terminate()
        with trio.move_on_after(self.stop_grace):
            for process in list(self._processes.values()):
                await process.wait()
        for process in list(self._processes.values()):
            if process.returncode is None:
                process.kill()

    async def _keep_running(self, state: WorkerState) -> None:
        backoff = RESTART_BACKOFF[0]
        while not self._stopping:
            started = trio.current_time()
            code = await self._run_once(state)
            state.ready.set()  # a failed first start must not hold the main process up
            if self._stopping:
                return
            state.exits.append(code)
            metrics.WORKER_EXITS.inc()
            if self.on_lost is not None and state.origin is not None:
                # Its devices are still "online" in the store: no session of theirs lives.
                await self._report_lost(state, state.origin)
            if trio.current_time() - started >= STABLE_AFTER:
                backoff = RESTART_BACKOFF[0]
            log.warning(
                "worker %d (pid %s) exited with status %d; restarting it in %.1f s",
                state.spec.index,
                state.pid,
                code,
                backoff,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF[1])

    async def _report_lost(self, state: WorkerState, origin: str) -> None:
        """Tell ``on_lost`` that the sessions of ``origin`` are gone (a few tries: the store
        may be busy; a failure leaves devices "online" until they reconnect)."""
        assert self.on_lost is not None
        for attempt in range(LOST_ATTEMPTS):
            try:
                await self.on_lost(origin)
                return
            except OtaError as exc:
                log.warning("could not mark worker %d's devices offline (try %d): %s",
                            state.spec.index, attempt + 1, exc)
                await trio.sleep(RESTART_BACKOFF[0] * 2**attempt)

    async def _run_once(self, state: WorkerState) -> int:
        """Run the worker process once; its exit status (negative: killed by a signal)."""
        state.origin = None  # this run's, once it says it is ready
        argv = [sys.executable, "-m", "server.workers"]
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    check=False,
                    deliver_cancel=self._deliver_cancel,
                    env=(None if self.metrics_dir is None
                         else metrics.worker_environment(self.metrics_dir)),
                )
            )
            state.starts += 1
            state.pid = process.pid
            self._processes[state.spec.index] = process
            assert process.stdin is not None and process.stdout is not None
            with suppress(trio.BrokenResourceError):  # it died at once: its status tells
                await process.stdin.send_all(state.spec.to_json().encode() + b"\n")
            await self._read_status(state, process.stdout)
        # run_process returned: the process has exited (stdin is closed by trio).
        assert process.returncode is not None
        if self.metrics_dir is not None:  # its live gauges leave the sums
            worker_exited(self.metrics_dir, process.pid)
        return process.returncode

    async def _read_status(self, state: WorkerState, stdout: trio.abc.ReceiveStream) -> None:
        """Follow the worker's status lines until it closes stdout."""
        pending = b""
        while chunk := await stdout.receive_some(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("worker %d said: %r", state.spec.index, line[:200])
                    continue
                if message.get("ready"):
                    state.origin = str(message.get("origin"))
                    state.settings = message.get("settings")
                    if self.expected_settings not in (None, state.settings):
                        log.error("worker %d runs other settings (%s) than the main process "
                                  "(%s)", state.spec.index, state.settings,
                                  self.expected_settings)
                    log.info("worker %d ready: %s", state.spec.index, message)
                    state.ready.set()
                    if self.on_ready is not None:
                        self.on_ready(state)
                elif "sessions" in message:
                    state.sessions = int(message["sessions"])

    async def _deliver_cancel(self, process: trio.Process) -> None:
        """Cancelled (hard stop of the main process): SIGTERM, SIGKILL after the grace."""
        process.terminate()
        await trio.sleep(self.stop_grace)
        process.kill()


def default_workers(device_listeners: bool) -> int:
    """One process per CPU when devices connect (the device plane is what scales); one
    otherwise (the API alone gains nothing from workers, which run no API)."""
    if not device_listeners:
        return 1
    return max(1, len(os.sched_getaffinity(0)))  # the CPUs this process may run on


if __name__ == "__main__":
    main()
