"""The server process: store, event bus, fleet service and the REST API in one trio nursery.

``serve`` opens everything, starts hypercorn (trio worker) on the API port and the device
plane, and reports a :class:`ServerHandle` through ``task_status``. Setting
``handle.shutdown`` stops the devices and the API gracefully, then everything else.

With ``workers`` > 1 (and device listeners on) this is the main process of several: its
device listeners bind with SO_REUSEPORT and it supervises ``workers - 1`` worker processes
(``server.workers``) that serve devices on the same ports.

The store event relay (``server.relay``) runs whenever other processes may share the store:
with worker processes, and whenever the store is named by ``db_url`` (always on PostgreSQL):
the nodes of one installation are separate ``ota server`` processes on one database, and a
node cannot know it is alone. Only the embedded store of ``--data`` alone, which the server
holds exclusively (``server.data_lock``), with one process, runs no relay.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from otacore.errors import ValidationError
from server.api import ApiSettings, create_app
from server.api_tls import check_api_credentials
from server.devices.ota import OtaConfig, OtaEngine
from server.devices.plane import DevicePlane, DevicePlaneConfig
from server.devices.tuning import DeviceTuning
from server.event_history import EventRecorder, HistorySettings, prune_event_history
from server.events import EventBus
from server.fleet import Fleet
from server.gc_tuning import CollectorSettings
from server.leases import (
    BLOB_SWEEPER,
    EVENT_HISTORY_PRUNING,
    EVENT_LOG_PRUNING,
    MIN_BLOB_SWEEP_INTERVAL,
    ROLLOUT_TICKS,
    SESSION_SWEEPER,
    JobLease,
    LeaseTimings,
    SessionLeaseKeeper,
    check_lease_timings,
    prune_event_log,
    sweep_expired_sessions,
    sweep_unreferenced_blobs,
)
from server.logs import check_log_format, parse_log_level, set_log_origin
from server.metrics.aggregate import make_worker_dir, remove_worker_dir
from server.node_id import check_node_id, default_node_id
from server.proxy_headers import TrustedProxyHeaders, parse_trusted_proxies
from server.relay import EventRelay, RelaySettings
from server.rollout_ticks import RolloutTicker
from server.store import Store
from server.store.installation import open_installation_store, sqlite_database_path
from server.store.store import DB_FILENAME
from server.transport import DeviceServer, SessionLimits
from server.workers import WorkerSettings, WorkerSpec, WorkerSupervisor, process_origin

log = logging.getLogger("ota.server")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``ota server`` can be told."""

    data_dir: Path
    host: str = "127.0.0.1"
    api_port: int = 8080
    #: SQLAlchemy URL; None means the embedded SQLite file ``<data_dir>/ota.db``.
    db_url: str | None = None
    #: Worker threads for blocking store calls (each holds one DB connection).
    store_threads: int = 8
    #: MiB of verified firmware-blob chunks each server process keeps in memory when the
    #: blobs are in the database (PostgreSQL); 0 reads every block from the database.
    blob_cache_mb: int = 64
    #: Seconds an unreferenced blob (e.g. a deleted firmware's image) is kept before a server
    #: start or the blob sweeper (every max(this, 60) s) deletes it: an upload (on any node)
    #: stores its blob before it commits the row that names it.
    blob_sweep_grace: float = 3600.0
    api: ApiSettings = field(default_factory=ApiSettings)
    event_buffer: int = 256
    max_event_subscribers: int = 1000
    graceful_timeout: float = 5.0
    #: TCP (TLS 1.3) and UDP (DTLS 1.2) port for devices; 0 picks free ones, None: no devices.
    device_port: int | None = 5684
    #: Address the device listeners bind (defaults to ``host``).
    device_host: str | None = None
    #: Server processes serving devices: this one plus ``workers - 1`` worker processes
    #: (ignored without device listeners).
    workers: int = 1
    #: Limits of the device listeners (handshake admission, per-address bounds, timeouts,
    #: rates), the same in every server process.
    device_limits: SessionLimits = field(default_factory=SessionLimits)
    #: How updates are delivered (the OTA engine of every server process).
    ota: OtaConfig = field(default_factory=OtaConfig)
    #: Frame, request and shutdown settings of device sessions and the listeners' socket
    #: and certificate settings, the same in every server process.
    device_tuning: DeviceTuning = field(default_factory=DeviceTuning)
    #: Seconds an idle HTTP keep-alive connection to the API stays open.
    http_keep_alive_timeout: float = 75.0
    #: Seconds a graceful shutdown waits for the worker processes to say farewell to their
    #: devices and exit, before it kills them.
    worker_stop_grace: float = 15.0
    #: Timings and bounds of the store event relay between server processes (see
    #: ``shares_store``).
    relay: RelaySettings = field(default_factory=RelaySettings)
    #: Bounds and timings of the stored event history (server.event_history).
    history: HistorySettings = field(default_factory=HistorySettings)
    #: The cyclic garbage collector's thresholds in every server process.
    collector: CollectorSettings = field(default_factory=CollectorSettings)
    #: Log level name of the worker processes (the CLI configures this process's logging).
    log_level: str = "info"
    #: Seconds between ticks of the active rollouts (scheduled starts, phase waits, reboot
    #: timeouts happen by time alone); the main process ticks them.
    rollout_tick_interval: float = 15.0
    #: This node's name among the nodes sharing the store (``cluster.node_id``: its
    #: processes' origins and its devices' session leases say it); None: host name and API
    #: port (``server.node_id.default_node_id``). Two live nodes must never share one.
    node_id: str | None = None
    #: Seconds a device's session lease, and a once-per-installation job's lease (rollout
    #: ticks, the sweeper of expired session leases, the event log's pruning), lasts
    #: without renewal: after a node dies, its devices are marked offline and its jobs
    #: move to another node within about this long.
    session_lease: float = 30.0
    #: Seconds between renewals of the leases (one statement per server process for all its
    #: sessions); at most half of session_lease.
    lease_renew_interval: float = 10.0
    #: PEM certificate chain (the server's certificate first) and PEM private key the API
    #: port serves HTTPS with (both or neither; None: plain HTTP).
    api_cert: str | None = None
    api_key: str | None = None
    #: Seconds a client has to finish its TLS handshake with the HTTPS API port (a silent
    #: connection holds no slot longer).
    tls_handshake_timeout: float = 10.0
    #: Reverse proxies (addresses or networks; "*": every peer) whose X-Forwarded-For and
    #: X-Forwarded-Proto headers name the client; empty: the TCP peer is the client.
    forwarded_allow_ips: tuple[str, ...] = ()
    #: Log line format of every server process: "text" or "json" (server.logs).
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not 0 <= self.api_port <= 65535:
            raise ValidationError(f"API port {self.api_port} is not between 0 and 65535")
        if self.device_port is not None and not 0 <= self.device_port <= 65535:
            raise ValidationError(f"device port {self.device_port} is not between 0 and 65535")
        for name in ("store_threads", "event_buffer", "max_event_subscribers", "workers"):
            if getattr(self, name) < 1:
                raise ValidationError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.blob_cache_mb <= 1_048_576:
            raise ValidationError(f"blob_cache_mb must be between 0 and 1048576 (1 TiB), not "
                                  f"{self.blob_cache_mb}")
        if not (math.isfinite(self.blob_sweep_grace) and self.blob_sweep_grace >= 0):
            raise ValidationError("blob_sweep_grace must be a non-negative number of seconds, "
                                  f"not {self.blob_sweep_grace!r}")
        for name in ("store_threads", "workers"):  # each a thread or a process
            if getattr(self, name) > 1024:
                raise ValidationError(f"{name} must be at most 1024, not {getattr(self, name)}")
        for name in ("graceful_timeout", "http_keep_alive_timeout", "worker_stop_grace",
                     "rollout_tick_interval", "tls_handshake_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValidationError(f"{name} must be a positive number of seconds, not "
                                      f"{value!r}")
        parse_log_level(self.log_level)
        check_log_format(self.log_format)
        if (self.api_cert is None) != (self.api_key is None):
            raise ValidationError("HTTPS needs both api_cert and api_key (--api-cert FILE "
                                  "--api-key FILE), not one of them")
        parse_trusted_proxies(self.forwarded_allow_ips)
        check_lease_timings(self.session_lease, self.lease_renew_interval)
        if self.node_id is not None:
            check_node_id(self.node_id)

    @property
    def multiprocess(self) -> bool:
        """True when worker processes share the device ports and the store."""
        return self.workers > 1 and self.device_port is not None

    @property
    def https(self) -> bool:
        """True when the API port serves HTTPS (api_cert and api_key are set)."""
        return self.api_cert is not None and self.api_key is not None

    @property
    def shares_store(self) -> bool:
        """True when other server processes may use the store: worker processes, or other
        nodes on a database named by ``db_url``; then the event relay runs."""
        return self.multiprocess or self.db_url is not None


@dataclass
class ServerHandle:
    """What a running server exposes to its caller (and to listeners added later)."""

    api_url: str
    fleet: Fleet
    bus: EventBus
    store: Store
    nursery: trio.Nursery
    shutdown: trio.Event
    #: The device plane (None when the server runs without device listeners).
    devices: DevicePlane | None = None
    device_server: DeviceServer | None = None
    #: The worker processes (None in a single-process server) and the event relay (None
    #: when no other process shares the store, ``ServerConfig.shares_store``).
    workers: WorkerSupervisor | None = None
    relay: EventRelay | None = None
    #: This node's id (``ServerConfig.node_id`` or its default).
    node_id: str = ""
    #: The renewal of this process's sessions' leases (None without device listeners; each
    #: worker process runs its own).
    session_leases: SessionLeaseKeeper | None = None
    #: The once-per-installation jobs, by lease name (each runs while this node holds it).
    job_leases: dict[str, JobLease] = field(default_factory=dict)
    #: This process's writer of the stored event history.
    recorder: EventRecorder | None = None


def open_store(config: ServerConfig) -> Store:
    """Open (creating on first start) the store the config names."""
    return open_installation_store(config.data_dir, config.db_url,
                                   pool_size=config.store_threads,
                                   blob_cache_bytes=config.blob_cache_mb * 1024 * 1024,
                                   blob_sweep_grace_s=config.blob_sweep_grace)


def node_id_of(config: ServerConfig) -> str:
    """The node id the config names, or the default one (see server.leases)."""
    return config.node_id or default_node_id(config.api_port)


def embedded_store(config: ServerConfig) -> bool:
    """True when the store is the data directory's own SQLite file: this server's alone
    (``server.data_lock``), so every device is offline at its start. Any other store may be
    shared by several nodes, which keep their devices (issue 16 item 3)."""
    path = sqlite_database_path(config.data_dir, config.db_url)
    own = Path(config.data_dir) / DB_FILENAME
    return path is not None and path.resolve() == own.resolve()


def worker_specs(config: ServerConfig, device_server: DeviceServer) -> list[WorkerSpec]:
    """What each worker is told: the main process's store and its bound device ports."""
    assert device_server.tcp_address is not None and device_server.udp_address is not None
    return [
        WorkerSpec(
            index=index,
            data_dir=str(Path(config.data_dir).resolve()),
            db_url=config.db_url,
            host=config.device_host or config.host,
            tcp_port=device_server.tcp_address[1],
            udp_port=device_server.udp_address[1],
            store_threads=config.store_threads,
            blob_cache_mb=config.blob_cache_mb,
            event_buffer=config.event_buffer,
            max_event_subscribers=config.max_event_subscribers,
            limits=asdict(config.device_limits),
            ota=asdict(config.ota),
            tuning=asdict(config.device_tuning),
            relay=asdict(config.relay),
            history=asdict(config.history),
            collector=asdict(config.collector),
            log_level=config.log_level,
            log_format=config.log_format,
            node_id=node_id_of(config),
            session_lease=config.session_lease,
            lease_renew_interval=config.lease_renew_interval,
        )
        for index in range(1, config.workers)
    ]


def worker_settings(config: ServerConfig) -> WorkerSettings:
    """The settings every worker process must run with (the main process's own)."""
    return WorkerSettings(config.device_limits, config.ota, config.device_tuning, config.relay,
                          config.collector, config.history)


def _hypercorn_config(config: ServerConfig) -> HypercornConfig:
    hc = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.api_port}"]
    hc.accesslog = None
    hc.loglevel = "WARNING"
    # Hypercorn's own handler would write its own line format to stderr; through ours its
    # records get the server's format (text or JSON).
    error_logger = logging.getLogger("hypercorn.error")
    error_logger.setLevel(logging.WARNING)
    hc.errorlog = error_logger
    hc.graceful_timeout = config.graceful_timeout
    hc.keep_alive_timeout = config.http_keep_alive_timeout
    if config.https:
        # Hypercorn's context: TLS 1.2 at least, ECDHE with AES-GCM for TLS 1.2, no
        # compression, ALPN h2 and http/1.1 (HTTP/2 with h2 installed; RFC 7540 section 9.2).
        hc.certfile = config.api_cert
        hc.keyfile = config.api_key
        hc.ssl_handshake_timeout = config.tls_handshake_timeout
    return hc


def plain_http_warning(config: ServerConfig) -> str | None:
    """The warning a server serving plain HTTP beyond this machine logs at start (None:
    HTTPS, or only loopback can reach it)."""
    if config.https:
        return None
    try:
        if ipaddress.ip_address(config.host.strip("[]")).is_loopback:
            return None
    except ValueError:
        if config.host == "localhost":
            return None
    return (f"the API listens on {config.host} in plain HTTP: tokens and passwords cross the "
            "network in clear text; serve HTTPS (--api-cert FILE --api-key FILE, `ota admin "
            "api-cert` issues them) or listen on 127.0.0.1 behind a TLS reverse proxy")


def api_app(app: Any, config: ServerConfig) -> Any:
    """The ASGI app the API port serves: ``app`` behind the trusted proxies' headers when
    ``forwarded_allow_ips`` names any (server.proxy_headers)."""
    if config.forwarded_allow_ips:
        return TrustedProxyHeaders(app, config.forwarded_allow_ips)
    return app


async def serve(
    config: ServerConfig, *, task_status: trio.TaskStatus[ServerHandle] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the control plane until cancelled or until ``handle.shutdown`` is set."""
    if config.https:  # refused before anything starts, with a message naming the file
        assert config.api_cert is not None and config.api_key is not None
        credentials = check_api_credentials(config.api_cert, config.api_key)
        log.info("API certificate %s for %s, valid until %s", credentials.cert_path,
                 ", ".join(credentials.names) or credentials.subject,
                 f"{credentials.not_after:%Y-%m-%d}")
    elif (warning := plain_http_warning(config)) is not None:
        log.warning("%s", warning)
    store = await trio.to_thread.run_sync(open_store, config)
    # The worker processes' metrics (summed into this process's /metrics).
    metrics_dir = make_worker_dir() if config.multiprocess else None
    try:
        bus = EventBus(buffer=config.event_buffer, max_subscribers=config.max_event_subscribers)
        fleet = Fleet(
            store,
            bus,
            limiter=trio.CapacityLimiter(config.store_threads),
            # scrypt checks get their own small pool: failed sign-ins must not hold the
            # threads the store's reads need.
            password_hash_threads=config.api.password_hash_threads,
            password_hash_queue=config.api.password_hash_queue,
        )
        node_id = node_id_of(config)
        fleet.configure_session_leases(node_id, config.session_lease)
        # The history keeps the start-up's own events too ("offline" of the sessions lost).
        recorder = EventRecorder(store, bus, config.history)
        recorder.attach()
        offline = await fleet.startup(exclusive=embedded_store(config))
        if offline:
            log.info("marked %d devices offline after restart (node %s)", offline, node_id)
        timings = LeaseTimings(config.session_lease, config.lease_renew_interval)
        origin = process_origin("main", node_id)
        set_log_origin(origin)
        holder = origin  # "<node id>:main-<pid>": which process runs a job
        ticker = RolloutTicker(fleet, config.rollout_tick_interval)
        jobs: dict[str, Callable[[], Awaitable[object]]] = {
            # One ticker per installation: each tick decides rollout phases.
            ROLLOUT_TICKS: ticker.run,
            SESSION_SWEEPER: partial(sweep_expired_sessions, fleet,
                                     config.lease_renew_interval),
            EVENT_LOG_PRUNING: partial(prune_event_log, store, config.relay.retention,
                                       config.relay.prune_interval),
            EVENT_HISTORY_PRUNING: partial(prune_event_history, store, config.history),
            # Unreferenced blobs go one grace period after they were last stored, at most
            # one more period later (deleting a firmware leaves its blob to this job).
            BLOB_SWEEPER: partial(sweep_unreferenced_blobs, store,
                                  max(config.blob_sweep_grace, MIN_BLOB_SWEEP_INTERVAL)),
        }
        job_leases = {name: JobLease(store, name, holder, timings) for name in jobs}
        app = create_app(fleet, config.api)
        app.state.worker_metrics_dir = metrics_dir
        shutdown = trio.Event()
        api_stopping = trio.Event()
        plane: DevicePlane | None = None
        device_server: DeviceServer | None = None
        relay: EventRelay | None = None
        supervisor: WorkerSupervisor | None = None
        async with trio.open_nursery() as nursery:

            async def run_api(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await hypercorn_serve(
                    # Starlette is an ASGI app; hypercorn's types are narrower.
                    cast(Any, api_app(app, config)),
                    _hypercorn_config(config),
                    shutdown_trigger=api_stopping.wait,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # the API stopped: stop the rest too

            await nursery.start(recorder.run)  # stores this process's events, once
            if config.shares_store:  # before anything publishes: the others see it all
                relay = EventRelay(store, bus, origin, settings=config.relay)
                await nursery.start(relay.run)
            binds: list[str] = await nursery.start(partial(run_api))
            # Once per installation, in the node holding each job's lease (server.leases).
            for name, job in jobs.items():
                await nursery.start(partial(job_leases[name].run, job))
            if config.device_port is not None:
                plane_config = DevicePlaneConfig(
                    data_dir=Path(config.data_dir),
                    host=config.device_host or config.host,
                    port=config.device_port,
                    reuse_port=config.multiprocess,
                    origin=origin,
                    limits=config.device_limits,
                    tuning=config.device_tuning,
                )
                plane = DevicePlane(plane_config, fleet, bus)
                engine = OtaEngine(plane, config.ota)
                nursery.start_soon(engine.watch_requests)
                device_server = await nursery.start(plane.serve)
            # This process renews its own sessions' leases (each worker runs its own keeper:
            # server.workers); without a device plane it holds none.
            session_leases: SessionLeaseKeeper | None = None
            if plane is not None:
                session_leases = SessionLeaseKeeper(fleet, plane, config.lease_renew_interval)
                await nursery.start(session_leases.run)
            if config.multiprocess:
                assert device_server is not None
                # After fleet.startup() (devices marked offline) and with the ports bound
                # (port 0: the workers bind what this process got).
                supervisor = WorkerSupervisor(worker_specs(config, device_server),
                                              stop_grace=config.worker_stop_grace,
                                              on_lost=fleet.sessions_lost,
                                              expected_settings=worker_settings(config).digest(),
                                              metrics_dir=metrics_dir)
                await nursery.start(supervisor.run)

            async def stop_gracefully() -> None:
                await shutdown.wait()
                async with trio.open_nursery() as stopping:  # devices are told to come back later
                    if supervisor is not None:
                        stopping.start_soon(supervisor.stop)
                    if device_server is not None:
                        stopping.start_soon(device_server.shutdown)
                api_stopping.set()

            nursery.start_soon(stop_gracefully)
            task_status.started(
                ServerHandle(
                    binds[0],
                    fleet,
                    bus,
                    store,
                    nursery,
                    shutdown,
                    plane,
                    device_server,
                    supervisor,
                    relay,
                    node_id,
                    session_leases,
                    job_leases,
                    recorder,
                )
            )
    finally:
        if metrics_dir is not None:
            remove_worker_dir(metrics_dir)
        store.close()  # quick (closes pooled connections); no checkpoint, so it runs when cancelled
