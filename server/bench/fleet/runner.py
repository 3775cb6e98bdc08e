"""Orchestration of ``ota bench fleet``: phases, measurements and the result.

1. Prepare (worker thread): store, product, owner token, N provisioned devices registered in
   one transaction, firmware (system part, application v1 and v2 of ``app_size`` bytes).
2. Start K load generators (``python -m server.bench.fleet.loadgen``; devices dealt round-robin)
   and factory-program every device's flash.
3. Handshakes, on a fresh server (``ota server`` subprocess): per transport, every device
   connects with a bare client and is held until all are up, then all close; the second
   round offers the saved session tickets. Rates are devices / (last up - first start).
4. Fleet and release, on another fresh server: the devices run as EmulatedFleets;
   ``sessions_peak`` and the server's RSS growth per session once all are online; then v2 is
   uploaded and released (intelligent = immediate, forced) and the runner waits until every
   online device has rebooted into v2 and reported it committed.
5. nginx: the same file over HTTPS, fetched once by as many concurrent clients as devices.

With ``nodes`` K > 1 (or a ``db_url``) every "server" above is K separate ``ota server``
nodes on copies of the data directory and one database (:mod:`server.bench.fleet.nodes`);
each device connects to its first-choice node (rendezvous hashing, as ``ota device emulate
--server A --server B`` spreads devices) and the API calls go to node 0. The result has the
figures in total as for one server (CPU and RSS summed over the nodes) and per node
(``nodes``), and the database's CPU over the phases against the nodes' (``db``).

Every child process is stopped when the run ends, however it ends.
"""

from __future__ import annotations

import os
import platform
import shutil
import ssl
import tempfile
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import httpx
import trio

from server.bench.fleet import BenchError
from server.bench.fleet import profile as profiling
from server.bench.fleet.control import (
    FleetProgress,
    LoadGenHandle,
    ServerProcess,
    request_all,
    running_loadgens,
)
from server.bench.fleet.images import Installation, prepare_installation
from server.bench.fleet.loadgen import LoadGenSpec
from server.bench.fleet.logscan import error_count, scan_postgres_log, scan_server_logs
from server.bench.fleet.nginx_baseline import NginxUnavailableError, running_nginx
from server.bench.fleet.nodes import (
    POSTGRES_LOG,
    THROWAWAY_POSTGRESQL,
    Database,
    check_db_url,
    node_data_dirs,
    running_nodes,
    shared_database,
    throwaway_database,
)
from server.bench.fleet.procs import (
    ResourceWindow,
    tree_cpu_seconds,
    tree_rss_kib,
)
from server.bench.fleet.record_devices import DEVICE_STACKS, DeviceStack
from server.bench.fleet.report import QuietReporter, Reporter, percentiles, write_json, write_plot
from server.emulator.endpoints import format_address
from server.emulator.fleet import TransportChoice, transports_for

MB = 1_000_000  # goodput and CPU per MB use decimal megabytes
ReleaseKind = Literal["full", "delta"]


@dataclass(frozen=True)
class BenchOptions:
    """What to run (see ``ota bench fleet --help``)."""

    devices: int
    transport: TransportChoice = "both"
    release: ReleaseKind = "full"
    procs: int = 2
    #: Server processes (``ota server --workers``) per node: main plus workers on its ports.
    server_procs: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    #: Server nodes: separate ``ota server`` processes on one database.
    nodes: int = 1
    #: The database the nodes share (``ota server --db-url``); None: the embedded SQLite
    #: store of the prepared data directory (its file URL when there are several nodes);
    #: ``pg`` (THROWAWAY_POSTGRESQL): a throwaway PostgreSQL cluster the run starts.
    db_url: str | None = None
    out_dir: Path = Path("bench-fleet-out")
    app_size: int = 128 * 1024
    #: Bare handshakes in flight per load generator.
    handshake_concurrency: int = 32
    #: Emulated devices handshaking at once per load generator.
    max_connects: int = 32
    online_timeout: float = 600.0
    release_timeout: float = 900.0
    #: Give up waiting (online, release) after this long without any progress.
    stall_timeout: float = 120.0
    #: Run the bare handshake rounds (full and resumed).
    handshakes: bool = True
    #: The load generators' device sessions: our record layers, or OpenSSL's (record_devices).
    device_stack: DeviceStack = "records"
    nginx: bool = True
    nginx_workers: int = 1
    profile: bool = False
    #: Parent of the scratch directory (store, credentials, device flashes).
    work_parent: Path | None = None
    keep_work: bool = False

    def __post_init__(self) -> None:
        if self.devices < 1 or self.procs < 1 or self.server_procs < 1 or self.nodes < 1:
            raise BenchError("--devices, --procs, --server-procs and --nodes must be at least 1")
        if self.db_url is not None:
            check_db_url(self.db_url)
        if self.procs > self.devices:
            raise BenchError(f"--procs {self.procs} is more than --devices {self.devices}")
        if -(-self.devices // self.procs) > 19_000:
            raise BenchError(
                "a load generator holds one descriptor per device and a process may open "
                "20,000: use more --procs"
            )
        tcp_sessions = sum(kind == "tcp" for kind in transports_for(self.transport, self.devices))
        # SessionLimits.max_sessions: one descriptor per session, per server process (the
        # kernel spreads connections over the processes by hash: only roughly evenly).
        if tcp_sessions > 19_000 * self.server_procs * self.nodes:
            raise BenchError(
                f"{tcp_sessions} TCP devices: one server process holds at most 19,000 TCP "
                "sessions (20,000 descriptors); use more --server-procs or --nodes"
            )
        if self.release not in ("full", "delta"):
            raise BenchError(f"--release must be full or delta, not {self.release!r}")
        transports_for(self.transport, 1)  # raises on an unknown transport
        if self.device_stack not in DEVICE_STACKS:
            raise BenchError(
                f"--device-stack must be one of {', '.join(DEVICE_STACKS)}, "
                f"not {self.device_stack!r}"
            )


def _deal(options: BenchOptions, install: Installation, work: Path) -> list[Path]:
    """Write one spec per load generator: devices dealt round-robin, each generator with
    its own loopback source addresses (127.0.<gen+1>.1-4: ~28,000 ports each)."""
    paths = []
    for index in range(options.procs):
        ids = install.device_ids[index :: options.procs]
        # Each generator alternates transports itself, so every process carries both.
        mine = list(zip(ids, transports_for(options.transport, len(ids)), strict=True))
        spec = LoadGenSpec(
            index=index,
            creds_dir=str(install.creds_dir),
            devices=[(device_id, str(kind)) for device_id, kind in mine],
            state_root=str(work / "flash"),
            firmware=[str(install.system_image), str(install.app_images[1])],
            product_id=install.product_id,
            target_version=2,
            sources=[f"127.0.{index + 1}.{host}" for host in range(1, 5)],
            max_connects=options.max_connects,
            device_stack=options.device_stack,
        )
        path = work / f"loadgen-{index}.json"
        spec.dump(path)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Nodes:
    """Where the servers of a phase run: each node's data directory, and the database."""

    data_dirs: list[Path]
    database: Database
    workers: int
    #: The logs of every node started so far (both phases).
    logs: list[Path] = field(default_factory=list)

    def running(self, install: Installation, log_prefix: Path) -> Any:
        """Start every node (an async context manager yielding the ServerProcesses)."""
        return running_nodes(
            install, self.data_dirs, self.database, log_prefix, workers=self.workers
        )

    def note_logs(self, servers: list[ServerProcess]) -> None:
        """Remember the logs of the nodes just started (scanned at the end)."""
        self.logs.extend(server.log_path for server in servers if server.log_path is not None)


def _endpoints(servers: list[ServerProcess]) -> list[list[list[Any]]]:
    """The nodes' endpoints as the load generators take them: ``[[tcp, udp], ...]``."""
    return [[list(server.tcp), list(server.udp)] for server in servers]


def _window(
    servers: list[ServerProcess], gens: list[LoadGenHandle], nodes: Nodes
) -> ResourceWindow:
    return ResourceWindow(
        [server.pid for server in servers],
        [gen.process.pid for gen in gens],
        udp_port=[server.udp[1] for server in servers],
        db_pid=nodes.database.postmaster_pid,
    )


def _name(server: ServerProcess) -> str:
    return format_address(server.tcp)


async def _handshake_rounds(
    options: BenchOptions,
    install: Installation,
    gens: list[LoadGenHandle],
    nodes: Nodes,
    out: Path,
    reporter: Reporter,
) -> dict[str, Any]:
    """Full then resumed handshakes per transport on fresh servers (each device at its
    first-choice node)."""
    results: dict[str, Any] = {}
    kinds = sorted(set(transports_for(options.transport, options.devices)))
    async with nodes.running(install, out / "server-handshakes") as servers:
        nodes.note_logs(servers)
        for kind in kinds:
            rounds: dict[str, Any] = {}
            for mode in ("full", "resumed"):
                reporter.phase(f"{kind} handshakes ({mode})", None)
                window = _window(servers, gens, nodes)
                replies = await request_all(
                    gens,
                    "handshakes",
                    transport=kind,
                    endpoints=_endpoints(servers),
                    resume=mode == "resumed",
                    concurrency=options.handshake_concurrency,
                    timeout=30.0,
                )
                rounds[mode] = _round_summary(replies, window.read(), servers)
                reporter.note(
                    f"{kind} {mode}: {rounds[mode]['ok']} handshakes, "
                    f"{rounds[mode]['per_s']} /s, {rounds[mode]['failed']} failed"
                )
            results[kind] = rounds
    return results


def _round_summary(
    replies: list[dict[str, Any]], cpu: dict[str, Any], servers: list[ServerProcess]
) -> dict[str, Any]:
    ok = sum(r["ok"] for r in replies)
    ok_by_endpoint = _merge([r["ok_by_endpoint"] for r in replies])
    server_cpu = cpu["process_cpu_s"]
    firsts = [r["t_first"] for r in replies if r["t_first"] is not None]
    lasts = [r["t_last"] for r in replies if r["t_last"] is not None]
    seconds = max(lasts) - min(firsts) if firsts and lasts else None
    errors: dict[str, int] = {}
    for reply in replies:
        for text, count in reply["errors"].items():
            errors[text] = errors.get(text, 0) + count
    return {
        "ok": ok,
        "failed": sum(r["failed"] for r in replies),
        "reused": sum(r["reused"] for r in replies),
        "seconds": round(seconds, 3) if seconds else None,
        "per_s": round(ok / seconds, 1) if seconds else None,
        "server_cpu_s": round(server_cpu, 3),
        "per_server_cpu_s": round(ok / server_cpu, 1) if server_cpu > 0 else None,
        "loadgen_cpu_s": cpu["others_cpu_s"],
        "machine_busy": cpu["machine_busy"],
        "udp_rcvbuf_drops": cpu["udp_rcvbuf_drops"],
        "server_udp_socket_drops": cpu["udp_port_drops"],
        "latency_s": percentiles([t for r in replies for t in r["latencies"]]),
        "db_cpu_s": cpu["db_cpu_s"],
        "by_node": [
            {
                "endpoint": _name(server),
                "ok": ok_by_endpoint.get(_name(server), 0),
                "server_cpu_s": round(node_cpu, 3),
            }
            for server, node_cpu in zip(servers, cpu["process_cpu_s_each"], strict=True)
        ],
        "device_stack": replies[0].get("device_stack") if replies else None,
        # What holding the connections cost the load generators (RSS while all were up).
        "loadgen_rss_per_connection_kib": (
            round(
                sum(r["loadgen_rss_held_kib"] - r["loadgen_rss_before_kib"] for r in replies)
                / ok, 2,
            )
            if ok and all("loadgen_rss_held_kib" in r for r in replies) else None
        ),
        "errors": errors,
    }


async def _upload(api: httpx.AsyncClient, product_id: int, version: int, image: Path) -> None:
    files = {"binary": (image.name, image.read_bytes(), "application/octet-stream")}
    response = await api.post(
        f"/v1/products/{product_id}/firmware",
        files=files,
        data={"version": str(version), "title": f"bench v{version}"},
    )
    if response.status_code != 201:
        raise BenchError(
            f"uploading v{version} failed: HTTP {response.status_code} {response.text[:300]}"
        )


async def _fleet_and_release(
    options: BenchOptions,
    install: Installation,
    gens: list[LoadGenHandle],
    progress: FleetProgress,
    nodes: Nodes,
    out: Path,
    reporter: Reporter,
) -> dict[str, Any]:
    """Sessions, memory per session and the immediate release, on fresh servers (the API
    calls go to node 0)."""
    result: dict[str, Any] = {}
    async with nodes.running(install, out / "server-fleet") as servers:
        nodes.note_logs(servers)
        server = servers[0]
        headers = {"Authorization": f"Bearer {install.token}"}
        async with httpx.AsyncClient(base_url=server.api_url, headers=headers, timeout=120) as api:
            await _upload(api, install.product_id, 1, install.app_images[1])
            reporter.phase("opening device flashes", None)
            await request_all(gens, "fleet_open", endpoints=_endpoints(servers))
            await trio.sleep(1.0)  # let the servers settle before the idle reading
            rss_idle = [tree_rss_kib(node.pid) for node in servers]
            result["server_rss_idle_kib"] = sum(rss_idle)
            window = _window(servers, gens, nodes)
            reporter.phase("devices online", options.devices)
            started = min(r["started"] for r in await request_all(gens, "fleet_run"))
            online_end = await progress.wait_until(
                lambda: progress.online_total >= options.devices,
                options.online_timeout,
                lambda: reporter.advance_to(progress.online_total),
                stall=options.stall_timeout,
            )
            result["online_end"] = online_end
            reporter.note(
                f"{progress.online_total}/{options.devices} devices online after "
                f"{time.monotonic() - started:.1f} s"
                + ("" if online_end == "done" else f" ({online_end}: gave up waiting)")
            )
            stats = await request_all(gens, "fleet_stats")
            online_times = sorted(t - started for s in stats for t in s["first_online"])
            result["online_times"] = online_times
            # Seconds until every device was online (None if some never came).
            result["sessions_online_s"] = (
                round(online_times[-1], 3) if online_times and online_end == "done" else None
            )
            result["sessions_per_s"] = (
                round(len(online_times) / online_times[-1], 1) if online_times else None
            )
            result["session_setup_cpu"] = window.read()
            await trio.sleep(2.0)  # sessions finish their Describe and store writes
            rss_peak = [tree_rss_kib(node.pid) for node in servers]
            result["server_rss_peak_kib"] = sum(rss_peak)
            expected = progress.online_total
            result["sessions_at_release"] = expected
            await _upload(api, install.product_id, 2, install.app_images[2])
            before = await request_all(gens, "fleet_stats")
            online_at_release = _merge([s["online_by_endpoint"] for s in before])
            bytes_before = sum(s["bytes"] for s in before)
            errors_before = _merge([s["errors_seen"] for s in before])
            reporter.phase("devices updated", expected)
            async with AsyncExitStack() as stack:
                if options.profile:
                    await stack.enter_async_context(
                        profiling.sampling(server.pid, out / "server-profile.txt")
                    )
                window = _window(servers, gens, nodes)
                released_at = time.monotonic()
                response = await api.put(
                    f"/v1/products/{install.product_id}/firmware/release",
                    json={
                        "version": 2,
                        "product_default": True,
                        "intelligent": True,
                        "force": True,
                    },
                )
                if response.status_code != 200:
                    raise BenchError(
                        f"the release failed: HTTP {response.status_code} {response.text[:300]}"
                    )
                release_end = await progress.wait_until(
                    lambda: len(progress.updated) + progress.failed_total >= expected,
                    options.release_timeout,
                    lambda: reporter.advance_to(len(progress.updated)),
                    stall=options.stall_timeout,
                )
                result["release_cpu"] = window.read()
                result["release_wait_s"] = time.monotonic() - released_at
                reporter.note(
                    f"release: {len(progress.updated)}/{expected} devices updated, "
                    f"{progress.failed_total} failed, after {result['release_wait_s']:.1f} s"
                )
            stats = await request_all(gens, "fleet_stats")
            await request_all(gens, "fleet_stop")
            # What the server says it sent for this release (deltas versus full images).
            response = await api.get(f"/v1/products/{install.product_id}/firmware/2")
            result["release_stats"] = (
                response.json().get("release_stats") if response.status_code == 200 else None
            )
    updated_at = _merge([s["updated_by_endpoint"] for s in stats])
    setup_cpu, release_cpu = result["session_setup_cpu"], result["release_cpu"]
    result["nodes"] = [
        {
            "endpoint": _name(node),
            "sessions_at_release": online_at_release.get(_name(node), 0),
            "release_updated": updated_at.get(_name(node), 0),
            "server_rss_idle_kib": idle,
            "server_rss_peak_kib": peak,
            "session_setup_server_cpu_s": setup,
            "release_server_cpu_s": released,
        }
        for node, idle, peak, setup, released in zip(
            servers, rss_idle, rss_peak, setup_cpu["process_cpu_s_each"],
            release_cpu["process_cpu_s_each"], strict=True,
        )
    ]  # fmt: skip
    result["failovers"] = sum(s["failovers"] for s in stats)
    result["release_end"] = release_end
    result["released_at"] = released_at
    result["release_devices"] = expected
    result["update_times"] = sorted(t - released_at for s in stats for t in s["updated"])
    result["update_latency_by_transport"] = {
        kind: percentiles(
            [t - released_at for s in stats for t in s["updated_by_transport"].get(kind, [])]
        )
        for kind in sorted({kind for s in stats for kind in s["updated_by_transport"]})
    }
    result["release_bytes_received"] = sum(s["bytes"] for s in stats) - bytes_before
    result["release_outcomes"] = _merge([s["outcomes"] for s in stats])
    kinds = sorted({kind for s in stats for kind in s["stages_by_transport"]})
    result["update_stages"] = {
        kind: _stage_summary(
            [[released_at, *t] for s in stats for t in s["stages_by_transport"].get(kind, [])]
        )
        for kind in kinds
    }
    result["connect_errors"] = _merge([s["connect_errors"] for s in stats])
    # Why sessions ended during the release (the 10 most common reasons).
    errors = Counter(_merge([s["errors_seen"] for s in stats]))
    errors.subtract(errors_before)
    result["release_device_errors"] = dict((+errors).most_common(10))
    result["not_updated"] = {
        "phases": _merge([s["not_updated"]["phases"] for s in stats]),
        "last_errors": _merge([s["not_updated"]["last_errors"] for s in stats]),
    }
    return result


#: The update stages between the times a device records (after the release request).
STAGES = ("queued", "download", "apply_reboot_verify")


def _stage_summary(timelines: list[list[float]]) -> dict[str, Any]:
    """Percentiles of the time each device spent in each stage of its update: waiting for
    the server to start its download, downloading, then applying, rebooting and
    reconnecting until its Hello is answered (which commits the new image)."""
    return {
        stage: percentiles([times[i + 1] - times[i] for times in timelines])
        for i, stage in enumerate(STAGES)
    } | {"devices": len(timelines)}


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            merged[key] = merged.get(key, 0) + value
    return merged


async def _nginx_round(
    options: BenchOptions,
    install: Installation,
    gens: list[LoadGenHandle],
    out: Path,
    reporter: Reporter,
) -> dict[str, Any]:
    """The baseline: nginx serves the v2 image to as many concurrent HTTPS clients."""
    if not options.nginx:
        return {"goodput_mb_s": None, "note": "skipped (--no-nginx)"}
    image = install.app_images[2]
    size = image.stat().st_size
    reporter.phase("nginx baseline fetches", None)
    try:
        async with running_nginx(
            out / "nginx", image, workers=options.nginx_workers, connections=options.devices
        ) as nginx:
            cpu_before = tree_cpu_seconds(nginx.pid)
            count = len(gens)
            replies = await request_all(
                gens,
                "fetch",
                per_gen=lambda i: {
                    "clients": options.devices // count + (i < options.devices % count)
                },
                address=list(nginx.address),
                path=nginx.path,
                concurrency=options.devices,
                expect=size,
                timeout=120.0,
            )
            cpu = tree_cpu_seconds(nginx.pid) - cpu_before
    except NginxUnavailableError as exc:
        reporter.note(f"nginx baseline skipped: {exc}")
        return {"goodput_mb_s": None, "note": f"skipped: {exc}"}
    delivered = sum(r["bytes"] for r in replies)
    firsts = [r["t_first"] for r in replies if r["t_first"] is not None]
    lasts = [r["t_last"] for r in replies if r["t_last"] is not None]
    seconds = max(lasts) - min(firsts) if firsts and lasts else None
    errors = _merge([r["errors"] for r in replies])
    return {
        "goodput_mb_s": round(delivered / MB / seconds, 2) if seconds else None,
        "clients": options.devices,
        "ok": sum(r["ok"] for r in replies),
        "failed": sum(r["failed"] for r in replies),
        "errors": errors,
        "seconds": round(seconds, 3) if seconds else None,
        "bytes": delivered,
        "workers": nginx.workers,
        "cpu_s": round(cpu, 3),
        "cpu_s_per_mb": round(cpu / (delivered / MB), 4) if delivered else None,
        "note": f"{nginx.workers} worker, HTTPS/1.1 TLS 1.3 (server auth only), "
        "one connection per client",
    }


async def run_fleet_bench(
    options: BenchOptions, reporter: Reporter | None = None, *, command: str = ""
) -> dict[str, Any]:
    """Run every phase; write ``result.json`` and ``result.png`` into ``options.out_dir``
    and return the result. Scratch files go to a temporary directory removed at the end
    (unless ``keep_work``)."""
    reporter = reporter or QuietReporter()
    out = options.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    parent = options.work_parent
    work = Path(tempfile.mkdtemp(prefix="ota-bench-fleet-", dir=parent))
    try:
        if options.db_url == THROWAWAY_POSTGRESQL:
            async with throwaway_database(out, reporter.note) as (url, db_log):
                # The nodes get the cluster's URL; the result's command still says "pg".
                started = replace(options, db_url=url)
                result = await _run(started, work, out, reporter, command, db_log=db_log)
        else:
            result = await _run(options, work, out, reporter, command)
    finally:
        if not options.keep_work:
            with trio.CancelScope(shield=True):  # also after Ctrl-C or a signal
                await trio.to_thread.run_sync(shutil.rmtree, work, True)
        else:
            reporter.note(f"scratch files kept in {work}")
    return result


async def _run(
    options: BenchOptions,
    work: Path,
    out: Path,
    reporter: Reporter,
    command: str,
    *,
    db_log: Path | None = None,
) -> dict[str, Any]:
    """The run (``db_log``: the log of a throwaway PostgreSQL cluster the caller started
    for it; None: the database is the user's, or SQLite)."""
    notes: list[str] = []
    load_at_start = os.getloadavg()
    reporter.phase(f"provisioning {options.devices} devices", None)
    install = await trio.to_thread.run_sync(
        partial(
            prepare_installation,
            work,
            options.devices,
            options.app_size,
            patch_release=options.release == "delta",
            db_url=options.db_url,
        )
    )
    database = await trio.to_thread.run_sync(
        partial(shared_database, install, options.nodes, throwaway=db_log is not None)
    )
    data_dirs = await trio.to_thread.run_sync(node_data_dirs, install, options.nodes, work)
    nodes = Nodes(data_dirs, database, options.server_procs)
    specs = _deal(options, install, work)
    progress = FleetProgress(options.procs)
    async with trio.open_nursery() as nursery:
        async with running_loadgens(nursery, specs, out, progress.on_event) as gens:
            reporter.phase("programming device flashes", None)
            await request_all(gens, "prepare")
            handshakes: dict[str, Any] = {}
            if options.handshakes:
                handshakes = await _handshake_rounds(
                    options, install, gens, nodes, out, reporter
                )
            else:
                notes.append("handshake rounds skipped (--no-handshakes)")
            fleet = await _fleet_and_release(
                options, install, gens, progress, nodes, out, reporter
            )
            nginx = await _nginx_round(options, install, gens, out, reporter)
        nursery.cancel_scope.cancel()
    image_size = install.app_images[2].stat().st_size
    updated = fleet["update_times"]
    if fleet["release_end"] != "done":
        why = (
            f"timed out after {options.release_timeout:.0f} s"
            if fleet["release_end"] == "timeout"
            else f"stalled (no progress for {options.stall_timeout:.0f} s)"
        )
        notes.append(
            f"release {why}: {len(updated)}/{fleet['release_devices']} devices updated; "
            f"the others: {fleet['not_updated']}"
        )
    if fleet["online_end"] != "done":
        notes.append(
            f"not every device came online ({fleet['online_end']}): "
            f"{fleet['sessions_at_release']}/{options.devices}"
        )
    if progress.crashed:
        notes.append(f"emulated devices crashed: {progress.crashed}")
    log_problems = await trio.to_thread.run_sync(_log_problems, nodes, out, db_log)
    notes += _log_notes(log_problems)
    all_updated = fleet["release_end"] == "done" and len(updated) == fleet["release_devices"]
    release_s = updated[-1] if updated and all_updated else None
    delivered = len(updated) * image_size
    window = updated[-1] if updated else fleet["release_wait_s"]
    release_cpu = fleet["release_cpu"]["process_cpu_s"]
    sessions = fleet["sessions_at_release"]
    rss_growth = fleet["server_rss_peak_kib"] - fleet["server_rss_idle_kib"]
    full = [r["full"] for r in handshakes.values()]
    resumed = [r["resumed"] for r in handshakes.values()]
    result: dict[str, Any] = {
        "devices": options.devices,
        "transport": options.transport,
        "procs": options.procs,
        "server_procs": options.server_procs,
        "node_count": options.nodes,
        "nodes": _per_node(fleet["nodes"], handshakes),
        "db": _db_figures(database, fleet, options.nodes),
        "failovers": fleet["failovers"],
        "release": options.release,
        "release_run": options.release,
        "release_stats": fleet["release_stats"],
        "image_size": image_size,
        "sessions_peak": progress.peak,
        "online_end": fleet["online_end"],
        "sessions_online": len(fleet["online_times"]),
        "sessions_online_s": fleet["sessions_online_s"],
        "sessions_per_s": fleet["sessions_per_s"],
        "session_setup_server_cpu_s": fleet["session_setup_cpu"]["process_cpu_s"],
        "session_setup_loadgen_cpu_s": fleet["session_setup_cpu"]["others_cpu_s"],
        "session_setup_udp_rcvbuf_drops": fleet["session_setup_cpu"]["udp_rcvbuf_drops"],
        "session_setup_server_udp_socket_drops": fleet["session_setup_cpu"]["udp_port_drops"],
        "fleet_connect_errors": fleet["connect_errors"],
        "server_rss_idle_kib": fleet["server_rss_idle_kib"],
        "server_rss_peak_kib": fleet["server_rss_peak_kib"],
        "server_rss_per_session_kib": round(rss_growth / sessions, 2) if sessions else None,
        "handshakes_per_s_full": _combined_rate(full),
        "handshakes_per_s_resumed": _combined_rate(resumed),
        "handshakes": handshakes,
        "device_stack": options.device_stack,
        "release_devices": fleet["release_devices"],
        "release_updated": len(updated),
        "release_outcomes": fleet["release_outcomes"],
        "release_all_updated_s": round(release_s, 3) if release_s is not None else None,
        "update_latency_s": percentiles(updated),
        "update_latency_s_by_transport": fleet["update_latency_by_transport"],
        "update_stages_s": fleet["update_stages"],
        "goodput_mb_s": round(delivered / MB / window, 3) if window else None,
        "bytes_delivered": delivered,
        "release_server_cpu_s": round(release_cpu, 3),
        "release_loadgen_cpu_s": fleet["release_cpu"]["others_cpu_s"],
        "release_machine_busy": fleet["release_cpu"]["machine_busy"],
        "release_udp_rcvbuf_drops": fleet["release_cpu"]["udp_rcvbuf_drops"],
        "release_server_udp_socket_drops": fleet["release_cpu"]["udp_port_drops"],
        "release_end": fleet["release_end"],
        "release_not_updated": fleet["not_updated"],
        "release_device_errors": fleet["release_device_errors"],
        "log_problems": log_problems,
        "server_cpu_s_per_mb": round(release_cpu / (delivered / MB), 4) if delivered else None,
        "bytes_on_wire": fleet["release_bytes_received"],
        "bytes_on_wire_basis": "CoAP bytes the devices' links received during the release "
        "(after TLS/DTLS decryption: record, UDP/TCP/IP headers not "
        "counted; includes Hello/Describe of the reboot)",
        "bytes_full_images": options.devices * image_size,
        "nginx_goodput_mb_s": nginx["goodput_mb_s"],
        "nginx": nginx,
        "mb": "1,000,000 bytes",
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load_at_start],
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
        },
        "command": command,
        "notes": notes,
    }
    profile_path = out / "server-profile.txt"
    if options.profile:
        result["server_profile"] = (
            profiling.summarize(profile_path)
            if profile_path.exists()
            else {"note": "py-spy recorded nothing (see server-profile.log)"}
        )
    write_json(result, out / "result.json")
    plot_note = write_plot(
        out / "result.png",
        updated,
        fleet["online_times"],
        f"{options.devices} devices ({options.transport}), "
        f"{image_size // 1024} KiB immediate release",
    )
    if plot_note:
        notes.append(plot_note)
        write_json(result, out / "result.json")
    return result


def _per_node(nodes: list[dict[str, Any]], handshakes: dict[str, Any]) -> list[dict[str, Any]]:
    """Each node's figures: the fleet phase's, with its share of every handshake round."""
    return [
        node
        | {
            "handshakes": {
                kind: {mode: found["by_node"][index] for mode, found in rounds.items()}
                for kind, rounds in handshakes.items()
            }
        }
        for index, node in enumerate(nodes)
    ]


def _db_figures(database: Database, fleet: dict[str, Any], nodes: int) -> dict[str, Any]:
    """The database the nodes shared and its CPU over the session setup and the release,
    with its share of the CPU of database and nodes together."""
    figures = database.describe() | {"shared_by_nodes": nodes}
    for phase, cpu in (("session_setup", fleet["session_setup_cpu"]),
                       ("release", fleet["release_cpu"])):  # fmt: skip
        db_cpu = cpu["db_cpu_s"]
        together = (db_cpu or 0.0) + cpu["process_cpu_s"]
        figures[f"{phase}_cpu_s"] = db_cpu
        figures[f"{phase}_cpu_share"] = (
            round(db_cpu / together, 3) if db_cpu is not None and together > 0 else None
        )
    if database.postmaster_pid is None:
        figures["note"] = (
            "embedded SQLite: the database's work runs inside the nodes' processes and is "
            "part of their CPU"
            if database.backend == "sqlite"
            else "the PostgreSQL cluster is not on this machine: its CPU is not measured"
        )
    else:
        figures["note"] = (
            "CPU of the cluster's postmaster and all its children (backends, WAL writer, "
            "checkpointer, ...), exited ones included"
        )
    return figures


def _log_problems(nodes: Nodes, out: Path, db_log: Path | None) -> dict[str, Any]:
    """Warnings and errors the nodes logged over the run, and those of a throwaway
    PostgreSQL cluster's log (``db_log``; copied to ``out/postgres.log`` as it stops)."""
    return {
        "servers": scan_server_logs(nodes.logs),
        "database": scan_postgres_log(db_log) if db_log is not None else None,
        "database_log": str(out / POSTGRES_LOG) if db_log is not None else None,
    }


def _log_notes(problems: dict[str, Any]) -> list[str]:
    """A note per source that logged errors, naming the most frequent one."""
    notes = []
    for source in ("servers", "database"):
        found = problems[source]
        errors = error_count(found)
        if errors:
            first = next(iter(found["messages"]), "")
            notes.append(f"{source} logged {errors} errors ({found['by_level']}); "
                         f"most frequent: {first}")
    return notes


def _combined_rate(rounds: list[dict[str, Any]]) -> float | None:
    """Handshakes per second over the rounds of every transport together."""
    seconds = sum(r["seconds"] or 0 for r in rounds)
    return round(sum(r["ok"] for r in rounds) / seconds, 1) if seconds else None
