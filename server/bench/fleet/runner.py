"""Orchestration of ``ota bench fleet``: the run, from provisioning to the result.

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

This module prepares the installation, deals the devices to the load generators, runs the
phases and assembles the result; the options are in :mod:`server.bench.fleet.options`,
the phases (3 to 5) in :mod:`server.bench.fleet.phases` and the figures they are summed
up into in :mod:`server.bench.fleet.figures`.
"""

from __future__ import annotations

import os
import platform
import shutil
import ssl
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from server.bench.fleet import profile as profiling
from server.bench.fleet.control import FleetProgress, request_all, running_loadgens
from server.bench.fleet.figures import MB, combined_rate, db_figures, per_node
from server.bench.fleet.images import Installation, prepare_installation
from server.bench.fleet.loadgen_spec import LoadGenSpec
from server.bench.fleet.logscan import error_count, scan_postgres_log, scan_server_logs
from server.bench.fleet.nodes import (
    POSTGRES_LOG,
    THROWAWAY_POSTGRESQL,
    node_data_dirs,
    shared_database,
    throwaway_database,
)
from server.bench.fleet.options import BenchOptions
from server.bench.fleet.phases import Nodes, fleet_and_release, handshake_rounds, nginx_round
from server.bench.fleet.report import QuietReporter, Reporter, percentiles, write_json, write_plot
from server.emulator.fleet import transports_for


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
                handshakes = await handshake_rounds(
                    options, install, gens, nodes, out, reporter
                )
            else:
                notes.append("handshake rounds skipped (--no-handshakes)")
            fleet = await fleet_and_release(
                options, install, gens, progress, nodes, out, reporter
            )
            nginx = await nginx_round(options, install, gens, out, reporter)
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
        "nodes": per_node(fleet["nodes"], handshakes),
        "db": db_figures(database, fleet, options.nodes),
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
        "handshakes_per_s_full": combined_rate(full),
        "handshakes_per_s_resumed": combined_rate(resumed),
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
