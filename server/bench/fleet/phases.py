"""The measured phases of ``ota bench fleet``, each on fresh servers with the load
generators already started: bare handshake rounds (full and resumed, per transport), the
fleet online and the immediate release, and the nginx baseline.

Separate from the runner (:mod:`server.bench.fleet.runner`), which prepares the installation,
starts the load generators and assembles the result from what these phases return;
:class:`Nodes` (where a phase's servers run, and the logs of all started so far) is owned
here because only the phases start servers.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from server.bench.fleet import BenchError
from server.bench.fleet import profile as profiling
from server.bench.fleet.control import (
    FleetProgress,
    LoadGenHandle,
    ServerProcess,
    request_all,
)
from server.bench.fleet.figures import MB, merge, name, round_summary, stage_summary
from server.bench.fleet.images import Installation
from server.bench.fleet.nginx_baseline import NginxUnavailableError, running_nginx
from server.bench.fleet.nodes import Database, running_nodes
from server.bench.fleet.options import BenchOptions
from server.bench.fleet.procs import (
    ResourceWindow,
    tree_cpu_seconds,
    tree_rss_kib,
)
from server.bench.fleet.report import Reporter, percentiles
from server.emulator.fleet import transports_for


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


async def handshake_rounds(
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
                rounds[mode] = round_summary(replies, window.read(), servers)
                reporter.note(
                    f"{kind} {mode}: {rounds[mode]['ok']} handshakes, "
                    f"{rounds[mode]['per_s']} /s, {rounds[mode]['failed']} failed"
                )
            results[kind] = rounds
    return results


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



async def fleet_and_release(
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
            online_at_release = merge([s["online_by_endpoint"] for s in before])
            bytes_before = sum(s["bytes"] for s in before)
            errors_before = merge([s["errors_seen"] for s in before])
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
    updated_at = merge([s["updated_by_endpoint"] for s in stats])
    setup_cpu, release_cpu = result["session_setup_cpu"], result["release_cpu"]
    result["nodes"] = [
        {
            "endpoint": name(node),
            "sessions_at_release": online_at_release.get(name(node), 0),
            "release_updated": updated_at.get(name(node), 0),
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
    result["release_outcomes"] = merge([s["outcomes"] for s in stats])
    kinds = sorted({kind for s in stats for kind in s["stages_by_transport"]})
    result["update_stages"] = {
        kind: stage_summary(
            [[released_at, *t] for s in stats for t in s["stages_by_transport"].get(kind, [])]
        )
        for kind in kinds
    }
    result["connect_errors"] = merge([s["connect_errors"] for s in stats])
    # Why sessions ended during the release (the 10 most common reasons).
    errors = Counter(merge([s["errors_seen"] for s in stats]))
    errors.subtract(errors_before)
    result["release_device_errors"] = dict((+errors).most_common(10))
    result["not_updated"] = {
        "phases": merge([s["not_updated"]["phases"] for s in stats]),
        "last_errors": merge([s["not_updated"]["last_errors"] for s in stats]),
    }
    return result


async def nginx_round(
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
    errors = merge([r["errors"] for r in replies])
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
