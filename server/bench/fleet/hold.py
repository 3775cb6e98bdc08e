"""Sessions held at once (issue 14's goal row: 100,000 for 10 minutes, both transports,
several load generators, RSS growth under 1% during the hold):
``ota bench hold`` or ``python -m server.bench.fleet.hold``.

1. Provision N devices (store, credentials) and start ``ota server --workers K``: several
   server processes on the same ports (SO_REUSEPORT), since a process may open 20,000 files
   and each TCP session costs one.
2. Start P load generators (``python -m server.bench.fleet.loadgen``; devices dealt
   round-robin, each process alternating transports for ``both``, each with its own
   loopback source addresses) and have each hold its devices (:mod:`.holder`): a bounded
   number handshaking at once, every device pinging at its keep-alive interval, dropped
   devices reconnecting.
3. Ramp-up ends when every device is connected (or on ``ramp_timeout``, or when no device
   came up for ``stall_timeout`` seconds: the hold then goes on with those connected).
4. Hold for ``hold_seconds``, sampling every ``sample_interval``: sessions the server holds
   (devices online in its store, by server process), devices connected (the load
   generators' view), server and load-generator RSS and CPU, drops, reconnects and ping
   answers missed. RSS growth is measured from the first sample of the hold to the last.
   A hold is stopped early, with a note, when the machine's available memory falls under
   ``min_available_mib``.

The result (JSON) has the summary and every sample; every child is stopped at the end,
however the run ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from server.bench.fleet import BenchError
from server.bench.fleet.control import request_all, running_loadgens, running_server
from server.bench.fleet.holder import HoldSettings
from server.bench.fleet.images import Installation, prepare_installation
from server.bench.fleet.loadgen_spec import LoadGenSpec
from server.bench.fleet.procs import (
    ResourceWindow,
    machine_cpu_seconds,
    tree_cpu_seconds,
    tree_rss_kib,
)
from server.bench.fleet.report import write_json
from server.emulator.fleet import TransportChoice, transports_for
from server.store.store import DB_FILENAME

#: Devices one load generator runs at most (one socket each; a process may open 20,000).
MAX_DEVICES_PER_LOADGEN = 19_000
#: Sessions of one transport one server process is planned for: the kernel spreads
#: connections over the processes by a hash of their addresses, only roughly evenly, and a
#: process may open 20,000 files (SessionLimits.max_sessions is 19,000 per listener).
PLANNED_SESSIONS_PER_SERVER = 15_000
#: Seconds between two looks at the load generators during the ramp-up.
RAMP_POLL = 1.0


@dataclass(frozen=True)
class HoldOptions:
    """What to run (see ``ota bench hold --help``)."""

    devices: int
    transport: TransportChoice = "both"
    #: Load-generator processes (None: as many as the devices need, at least 2).
    procs: int | None = None
    #: Server processes (``ota server --workers``; None: as many as the sessions need,
    #: at least one per CPU).
    server_procs: int | None = None
    hold_seconds: float = 600.0
    sample_interval: float = 10.0
    settings: HoldSettings = field(default_factory=HoldSettings)
    ramp_timeout: float = 1800.0
    stall_timeout: float = 180.0
    #: Stop the hold early when the machine's MemAvailable falls under this (MiB).
    min_available_mib: int = 2048
    #: More ``--device-limit NAME=VALUE`` settings for ``ota server``.
    device_limits: tuple[str, ...] = ()
    seed: int | None = None
    out_path: Path | None = None
    work_parent: Path | None = None
    keep_work: bool = False

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise BenchError("--devices must be at least 1")
        kinds = transports_for(self.transport, self.devices)  # raises on a bad transport
        procs = self.loadgens()
        if procs < 1 or procs > self.devices:
            raise BenchError(f"--procs must be between 1 and the devices ({self.devices})")
        if math.ceil(self.devices / procs) > MAX_DEVICES_PER_LOADGEN:
            raise BenchError(
                f"{self.devices} devices over {procs} load generators is more than "
                f"{MAX_DEVICES_PER_LOADGEN:,} each (one socket per device; a process may "
                f"open 20,000 files): use --procs {math.ceil(self.devices / 19_000)} or more"
            )
        servers = self.servers()
        busiest = max(kinds.count("tcp"), kinds.count("udp"))
        if servers < 1 or busiest > PLANNED_SESSIONS_PER_SERVER * servers:
            raise BenchError(
                f"{busiest} sessions of one transport over {servers} server processes is more "
                f"than {PLANNED_SESSIONS_PER_SERVER:,} each (a process holds at most 19,000 "
                "TCP sessions and the kernel spreads them only roughly evenly): use "
                f"--server-procs {math.ceil(busiest / PLANNED_SESSIONS_PER_SERVER)} or more"
            )
        for name in ("hold_seconds", "sample_interval", "ramp_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise BenchError(f"--{name.replace('_', '-')} must be positive")
        if self.settings.keepalive_interval >= 120.0 and not any(
            limit.startswith("idle_timeout=") for limit in self.device_limits
        ):
            raise BenchError(
                "the server closes a session quiet for 120 s (idle_timeout): keep the "
                "keep-alive interval under it, or raise it with --device-limit "
                "idle_timeout=N"
            )

    def loadgens(self) -> int:
        """Load-generator processes to run."""
        if self.procs is not None:
            return self.procs
        return min(self.devices, max(2, math.ceil(self.devices / 17_000)))

    def servers(self) -> int:
        """Server processes to run."""
        if self.server_procs is not None:
            return self.server_procs
        kinds = transports_for(self.transport, self.devices)
        busiest = max(kinds.count("tcp"), kinds.count("udp"))
        return max(len(os.sched_getaffinity(0)),
                   math.ceil(busiest / PLANNED_SESSIONS_PER_SERVER))  # fmt: skip


def _deal(options: HoldOptions, install: Installation, work: Path) -> list[Path]:
    """One spec per load generator: devices dealt round-robin, transports alternating in
    each, each with its own loopback sources (127.0.<gen+1>.1-4: ~28,000 ports each)."""
    paths = []
    procs = options.loadgens()
    for index in range(procs):
        ids = install.device_ids[index::procs]
        kinds = transports_for(options.transport, len(ids))
        spec = LoadGenSpec(
            index=index,
            creds_dir=str(install.creds_dir),
            devices=[(device_id, str(kind)) for device_id, kind in zip(ids, kinds, strict=True)],
            state_root=str(work / "flash"),  # unused: held devices have no flash
            firmware=[str(install.system_image)],
            product_id=install.product_id,
            target_version=1,
            sources=[f"127.0.{index + 1}.{host}" for host in range(1, 5)],
            max_connects=options.settings.concurrency,
        )
        path = work / f"loadgen-{index}.json"
        spec.dump(path)
        paths.append(path)
    return paths


def server_sessions(database: Path) -> dict[str, int]:
    """Devices the server's store says are online, by the server process that holds each
    session (the presence token is ``<process origin>/<serial>``). Read-only; SQLite's WAL
    lets it read while the server writes."""
    uri = f"file:{database}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10.0) as connection:
        rows = connection.execute(
            "SELECT rtrim(session_owner, '0123456789'), count(*) FROM devices "
            "WHERE online GROUP BY 1"
        ).fetchall()
    connection.close()
    return {str(owner).rstrip("/"): int(count) for owner, count in rows}


def available_mib() -> int:
    """MemAvailable of the machine (/proc/meminfo), MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise BenchError("/proc/meminfo has no MemAvailable line")


def _summed(stats: list[dict[str, Any]], key: str) -> int:
    return sum(int(s[key]) for s in stats)


def _merged(stats: list[dict[str, Any]], key: str) -> dict[str, int]:
    merged: dict[str, int] = {}
    for one in stats:
        for reason, count in one[key].items():
            merged[reason] = merged.get(reason, 0) + int(count)
    return dict(sorted(merged.items(), key=lambda item: -item[1])[:8])


def _growth_pct(first: int, last: int) -> float | None:
    return round((last - first) / first * 100, 3) if first else None


def rss_trend(samples: list[dict[str, Any]], key: str, settled_after: float) -> dict[str, Any]:
    """How an RSS reading (``key``, KiB) of the hold's samples moved: growth from the first
    sample to the last (the goal's measure), the same from the first sample at or after
    ``settled_after`` seconds (once every device has sent its first keep-alive: the first
    ping of a session builds state it then keeps), the spread (max - min over the first),
    and the least-squares slope in KiB per minute over the settled samples (a leak shows
    as a steady slope, noise does not)."""
    values = [s[key] for s in samples]
    settled = [s for s in samples if s["t"] >= settled_after] or samples[-1:]
    times = [s["t"] for s in settled]
    readings = [s[key] for s in settled]
    slope: float | None = None
    if len(settled) >= 2:
        mean_t, mean_v = sum(times) / len(times), sum(readings) / len(readings)
        variance = sum((t - mean_t) ** 2 for t in times)
        if variance > 0:
            covariance = sum(
                (t - mean_t) * (v - mean_v) for t, v in zip(times, readings, strict=True)
            )
            slope = round(covariance / variance * 60, 1)
    return {
        "growth_pct": _growth_pct(values[0], values[-1]),
        "settled_from_s": settled[0]["t"],
        "settled_growth_pct": _growth_pct(readings[0], readings[-1]),
        "spread_pct": _growth_pct(min(values), max(values)),
        "slope_kib_per_min": slope,
    }


class _Sampler:
    """One hold sample from the server (store, /proc) and the load generators."""

    def __init__(self, server_pid: int, database: Path) -> None:
        self.server_pid = server_pid
        self.database = database
        #: The load generators' counters at the last sample.
        self.last_stats: list[dict[str, Any]] = []

    async def sample(self, stats: list[dict[str, Any]], started: float) -> dict[str, Any]:
        """A sample: ``stats`` are the load generators' counters just read."""
        self.last_stats = stats
        by_process = await trio.to_thread.run_sync(server_sessions, self.database)
        busy, total = machine_cpu_seconds()
        return {
            "t": round(time.monotonic() - started, 2),
            "server_sessions": sum(by_process.values()),
            "server_sessions_by_process": sorted(by_process.values(), reverse=True),
            "connected": _summed(stats, "connected"),
            "connected_tcp": sum(s["connected_by_transport"].get("tcp", 0) for s in stats),
            "connected_udp": sum(s["connected_by_transport"].get("udp", 0) for s in stats),
            "sessions_started": _summed(stats, "sessions"),
            "drops": _summed(stats, "drops"),
            "connect_failures": _summed(stats, "connect_failures"),
            "pings_sent": _summed(stats, "pings_sent"),
            "pings_answered": _summed(stats, "pings_answered"),
            "pings_missed": _summed(stats, "pings_missed"),
            "pings_awaited": _summed(stats, "pings_awaited"),
            "server_rss_kib": tree_rss_kib(self.server_pid),
            "loadgen_rss_kib": _summed(stats, "rss_kib"),
            "server_cpu_s": round(tree_cpu_seconds(self.server_pid), 2),
            "loadgen_cpu_s": round(sum(float(s["cpu_s"]) for s in stats), 2),
            "machine_busy_cpu_s": round(busy, 2),
            "machine_total_cpu_s": round(total, 2),
            "available_mib": available_mib(),
        }


async def run_hold(
    options: HoldOptions, say: Callable[[str], None] = lambda _line: None
) -> dict[str, Any]:
    """Run the hold (see the module docstring); returns the result (also written to
    ``options.out_path`` if set). ``say`` gets a progress line now and then."""
    seed = options.seed if options.seed is not None else random.randrange(2**32)
    say(f"seed {seed}")
    work = Path(tempfile.mkdtemp(prefix="ota-bench-hold-", dir=options.work_parent))
    try:
        result = await _run(options, work, seed, say)
    finally:
        if not options.keep_work:
            with trio.CancelScope(shield=True):  # also after Ctrl-C
                await trio.to_thread.run_sync(partial(shutil.rmtree, work, ignore_errors=True))
        else:
            say(f"scratch files kept in {work}")
    if options.out_path is not None:
        write_json(result, options.out_path)
    return result


async def _run(
    options: HoldOptions, work: Path, seed: int, say: Callable[[str], None]
) -> dict[str, Any]:
    notes: list[str] = []
    say(f"provisioning {options.devices} devices")
    began = time.monotonic()
    install = await trio.to_thread.run_sync(
        partial(prepare_installation, work, options.devices, 16 * 1024)
    )
    provision_s = time.monotonic() - began
    specs = _deal(options, install, work)
    limits = [arg for limit in options.device_limits for arg in ("--device-limit", limit)]
    logs = work / "logs"
    async with (
        running_server(
            install, logs / "server.log", workers=options.servers(), extra_args=limits
        ) as server,
        trio.open_nursery() as nursery,
    ):
        async with running_loadgens(nursery, specs, logs, lambda _i, _e: None) as gens:
            await trio.sleep(1.0)  # the workers settle before the idle reading
            server_idle_kib = tree_rss_kib(server.pid)
            loadgen_idle_kib = sum(tree_rss_kib(gen.process.pid) for gen in gens)
            window = ResourceWindow(server.pid, [gen.process.pid for gen in gens])
            settings = asdict(options.settings)
            say(f"connecting {options.devices} devices: {len(gens)} load generators, "
                f"{options.servers()} server processes")  # fmt: skip
            starts = await request_all(
                gens, "hold_start", per_gen=lambda i: {"seed": seed + i},
                tcp=list(server.tcp), udp=list(server.udp), **settings,
            )  # fmt: skip
            started = min(float(r["started"]) for r in starts)
            ramp_end, stats = await _ramp(options, gens, say)
            ramp_cpu = window.read()
            connected = _summed(stats, "connected")
            lasts = [float(s["last_up"]) for s in stats if s["last_up"] is not None]
            ramp_s = round(max(lasts) - started, 2) if lasts else None
            say(f"ramp-up {ramp_end}: {connected}/{options.devices} connected, "
                f"last came up after {ramp_s} s")  # fmt: skip
            if ramp_end != "done":
                notes.append(f"ramp-up {ramp_end}: {connected}/{options.devices} connected "
                             "when the hold began")  # fmt: skip
            sampler = _Sampler(server.pid, install.data_dir / DB_FILENAME)
            samples, stopped = await _hold(options, gens, sampler, say)
            if stopped:
                notes.append(stopped)
            await request_all(gens, "hold_stop", timeout=120.0)
        nursery.cancel_scope.cancel()
    return _summary(options, seed, provision_s, server_idle_kib, loadgen_idle_kib, ramp_end,
                    ramp_s, ramp_cpu, stats, sampler.last_stats, samples, notes)  # fmt: skip


async def _ramp(
    options: HoldOptions, gens: list[Any], say: Callable[[str], None]
) -> tuple[str, list[dict[str, Any]]]:
    """Wait until every device is connected: "done", "timeout" or "stalled"; with the
    load generators' last counters."""
    deadline = time.monotonic() + options.ramp_timeout
    best, advanced_at, said_at = -1, time.monotonic(), 0.0
    while True:
        stats = await request_all(gens, "hold_stats")
        connected = _summed(stats, "connected")
        now = time.monotonic()
        if connected > best:
            best, advanced_at = connected, now
        if now - said_at >= 10.0:
            said_at = now
            say(f"  {connected}/{options.devices} connected, "
                f"{_summed(stats, 'connect_failures')} failed attempts, "
                f"available memory {available_mib()} MiB"
                + (f"; not connected: {_merged(stats, 'waiting_reasons')}"
                   if connected < options.devices else ""))  # fmt: skip
        if connected >= options.devices:
            return "done", stats
        if now >= deadline:
            return "timeout", stats
        if now - advanced_at >= options.stall_timeout:
            return "stalled", stats
        if available_mib() < options.min_available_mib:
            return "memory", stats
        await trio.sleep(RAMP_POLL)


async def _hold(
    options: HoldOptions, gens: list[Any], sampler: _Sampler, say: Callable[[str], None]
) -> tuple[list[dict[str, Any]], str | None]:
    """Sample every ``sample_interval`` seconds for ``hold_seconds``; the samples and why the
    hold stopped early (None if it did not)."""
    started = time.monotonic()
    samples: list[dict[str, Any]] = []
    while True:
        sample = await sampler.sample(await request_all(gens, "hold_stats"), started)
        samples.append(sample)
        say(
            f"  t={sample['t']:.0f} s: server holds {sample['server_sessions']}, "
            f"{sample['connected']} connected, {sample['drops']} drops, "
            f"{sample['pings_missed']} pings missed, server RSS "
            f"{sample['server_rss_kib'] // 1024} MiB, available {sample['available_mib']} MiB"
        )
        if sample["available_mib"] < options.min_available_mib:
            return samples, (
                f"hold stopped after {sample['t']:.0f} s: the machine's available memory "
                f"fell to {sample['available_mib']} MiB (under --min-available-mib "
                f"{options.min_available_mib})"
            )
        # The hold is the span between the first and the last sample (what the result
        # reports as held_seconds), not the time since ``started``: the first sample's
        # requests take a while on a busy machine.
        if sample["t"] - samples[0]["t"] >= options.hold_seconds:
            return samples, None
        next_at = min(started + options.sample_interval * len(samples),
                      started + samples[0]["t"] + options.hold_seconds)  # fmt: skip
        await trio.sleep(max(0.0, next_at - time.monotonic()))


def _summary(
    options: HoldOptions,
    seed: int,
    provision_s: float,
    server_idle_kib: int,
    loadgen_idle_kib: int,
    ramp_end: str,
    ramp_s: float | None,
    ramp_cpu: dict[str, float],
    ramp_stats: list[dict[str, Any]],
    last_stats: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    notes: list[str],
) -> dict[str, Any]:
    """The result: the summary figures and every sample."""
    first, last = samples[0], samples[-1]
    span = last["t"] - first["t"]
    server_cpu = last["server_cpu_s"] - first["server_cpu_s"]
    answered = last["pings_answered"] - first["pings_answered"]
    drops = last["drops"] - first["drops"]
    held_min = min(s["connected"] for s in samples)
    every_device_held = (
        ramp_end == "done" and drops == 0 and held_min == options.devices
        and min(s["server_sessions"] for s in samples) == options.devices
    )  # fmt: skip
    sessions = first["server_sessions"]
    machine = last["machine_total_cpu_s"] - first["machine_total_cpu_s"]
    # Every device has pinged once (the first ping of a session builds state it keeps).
    settled = options.settings.keepalive_interval + options.settings.keepalive_timeout
    return {
        "devices": options.devices,
        "transport": options.transport,
        "procs": options.loadgens(),
        "server_procs": options.servers(),
        "hold_seconds": options.hold_seconds,
        "held_seconds": round(span, 1),
        "settings": asdict(options.settings),
        "seed": seed,
        "provision_s": round(provision_s, 1),
        "ramp_end": ramp_end,
        "ramp_s": ramp_s,
        "ramp_connect_failures": _summed(ramp_stats, "connect_failures"),
        "ramp_connect_failure_reasons": _merged(ramp_stats, "connect_failure_reasons"),
        "ramp_waiting_reasons": _merged(ramp_stats, "waiting_reasons"),
        "ramp_server_cpu_s": ramp_cpu["process_cpu_s"],
        "ramp_loadgen_cpu_s": ramp_cpu["others_cpu_s"],
        "ramp_machine_busy": ramp_cpu["machine_busy"],
        "every_device_held": every_device_held,
        "connected_min": held_min,
        "connected_at_end": last["connected"],
        "server_sessions_min": min(s["server_sessions"] for s in samples),
        "server_sessions_max": max(s["server_sessions"] for s in samples),
        "server_sessions_by_process": last["server_sessions_by_process"],
        "drops": drops,
        "drops_in_ramp": _summed(ramp_stats, "drops"),
        "drop_reasons": _merged(last_stats, "drop_reasons"),
        "connect_failures": last["connect_failures"] - first["connect_failures"],
        "connect_failure_reasons": _merged(last_stats, "connect_failure_reasons"),
        "waiting_reasons_at_end": _merged(last_stats, "waiting_reasons"),
        "reconnects": last["sessions_started"] - first["sessions_started"],
        "pings_sent": last["pings_sent"] - first["pings_sent"],
        "pings_answered": answered,
        "pings_missed": last["pings_missed"] - first["pings_missed"],
        # Pings out when the window opened: their answers count in it, their sending did not.
        "pings_awaited_at_start": first["pings_awaited"],
        "server_rss_idle_kib": server_idle_kib,
        "server_rss_first_kib": first["server_rss_kib"],
        "server_rss_last_kib": last["server_rss_kib"],
        "server_rss_max_kib": max(s["server_rss_kib"] for s in samples),
        "server_rss_growth_pct": _growth_pct(first["server_rss_kib"], last["server_rss_kib"]),
        "server_rss_per_session_kib": (
            round((first["server_rss_kib"] - server_idle_kib) / sessions, 2) if sessions else None
        ),
        "loadgen_rss_idle_kib": loadgen_idle_kib,
        "loadgen_rss_first_kib": first["loadgen_rss_kib"],
        "loadgen_rss_last_kib": last["loadgen_rss_kib"],
        "loadgen_rss_growth_pct": _growth_pct(first["loadgen_rss_kib"], last["loadgen_rss_kib"]),
        "server_rss_trend": rss_trend(samples, "server_rss_kib", settled),
        "loadgen_rss_trend": rss_trend(samples, "loadgen_rss_kib", settled),
        "server_cpu_per_s": round(server_cpu / span, 4) if span else None,
        "loadgen_cpu_per_s": (
            round((last["loadgen_cpu_s"] - first["loadgen_cpu_s"]) / span, 4) if span else None
        ),
        "machine_busy": (
            round((last["machine_busy_cpu_s"] - first["machine_busy_cpu_s"]) / machine, 3)
            if machine
            else None
        ),
        "server_cpu_per_ping_us": round(server_cpu / answered * 1e6, 1) if answered else None,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "notes": notes,
        "samples": samples,
    }


def _limit(text: str) -> str:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE (a SessionLimits field)")
    return text


def main(argv: list[str] | None = None) -> None:
    """Entry point (see the module docstring); prints the result as JSON."""
    defaults = HoldSettings()
    parser = argparse.ArgumentParser(prog="python -m server.bench.fleet.hold")
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--transport", choices=("tcp", "udp", "both"), default="both")
    parser.add_argument("--procs", type=int, default=None, help="load generators")
    parser.add_argument("--server-procs", type=int, default=None)
    parser.add_argument("--hold-seconds", type=float, default=600.0)
    parser.add_argument("--sample-interval", type=float, default=10.0)
    parser.add_argument("--keepalive-interval", type=float, default=defaults.keepalive_interval)
    parser.add_argument("--keepalive-timeout", type=float, default=defaults.keepalive_timeout)
    parser.add_argument("--max-missed", type=int, default=defaults.max_missed)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--connect-timeout", type=float, default=defaults.connect_timeout)
    parser.add_argument("--ramp-timeout", type=float, default=1800.0)
    parser.add_argument("--stall-timeout", type=float, default=180.0)
    parser.add_argument("--min-available-mib", type=int, default=2048)
    parser.add_argument("--device-limit", type=_limit, action="append", default=[])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    try:
        options = HoldOptions(
            devices=args.devices, transport=args.transport, procs=args.procs,
            server_procs=args.server_procs, hold_seconds=args.hold_seconds,
            sample_interval=args.sample_interval,
            settings=HoldSettings(
                keepalive_interval=args.keepalive_interval,
                keepalive_timeout=args.keepalive_timeout, max_missed=args.max_missed,
                concurrency=args.concurrency, connect_timeout=args.connect_timeout,
            ),
            ramp_timeout=args.ramp_timeout, stall_timeout=args.stall_timeout,
            min_available_mib=args.min_available_mib, device_limits=tuple(args.device_limit),
            seed=args.seed, out_path=args.out, work_parent=args.work_dir,
            keep_work=args.keep_work,
        )  # fmt: skip
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = trio.run(partial(run_hold, options, say))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))


if __name__ == "__main__":
    main()
