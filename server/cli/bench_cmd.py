"""``ota bench fleet``: the end-to-end fleet benchmark; ``ota bench hold``: sessions held
at once for a while (machinery in ``server.bench.fleet``,
installed with the package; results and the write-up in the repository's ``bench/fleet``).

Attach to the main CLI with ``app.add_typer(bench_cmd.app, name="bench")``. The optional
parts need the ``bench`` extra (``pip install 'otacloud[bench]'``): matplotlib for the plot
and py-spy for ``--profile``; nginx (Debian) for the HTTPS baseline (``--no-nginx`` without
it). The command runs without any of them and says what it left out.
"""

from __future__ import annotations

import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import trio
import typer
from rich.console import Console

from otacore.errors import OtaError
from server.cli._output import fail

app = typer.Typer(help="Benchmarks against a real server.", no_args_is_help=True)


#: Options every benchmark that makes a scratch directory takes.
WorkDirOption = Annotated[
    Path | None,
    typer.Option("--work-dir", help="Parent of the scratch directory (default: the system temp)."),
]
KeepWorkOption = Annotated[
    bool, typer.Option("--keep-work", help="Keep the scratch directory (and its logs).")
]


@app.callback()
def bench() -> None:
    """Benchmarks against a real server (a group even with one command)."""


@app.command("fleet")
def fleet(
    devices: Annotated[int, typer.Option("--devices", "-n", min=1, help="Emulated devices.")] = 200,
    transport: Annotated[
        str,
        typer.Option("--transport", help="tcp (TLS 1.3), udp (DTLS 1.2) or both (alternating)."),
    ] = "both",
    release: Annotated[
        str,
        typer.Option(
            "--release",
            help="full (pseudo-random v2: full images) or delta (v2 is a patch of v1: deltas).",
        ),
    ] = "full",
    procs: Annotated[int, typer.Option("--procs", min=1, help="Load-generator processes.")] = 2,
    server_procs: Annotated[
        int | None,
        typer.Option(
            "--server-procs",
            min=1,
            help="Server processes (ota server --workers K); default: one per CPU.",
        ),
    ] = None,
    nodes: Annotated[
        int,
        typer.Option(
            "--nodes",
            min=1,
            help="Server nodes: separate ota server processes (each with --server-procs) on "
            "copies of the data directory and one database; devices spread over them.",
        ),
    ] = 1,
    db_url: Annotated[
        str | None,
        typer.Option(
            "--db-url",
            help="Database every node uses (ota server --db-url), e.g. "
            "postgresql+psycopg://user@/ota?host=/run/postgresql, or 'pg': a throwaway "
            "PostgreSQL cluster the run starts and deletes (Debian's postgresql; its log "
            "is kept as OUT/postgres.log); default: the prepared SQLite file. A local "
            "PostgreSQL cluster's CPU is reported (db).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Output directory (result.json, result.png, logs).")
    ] = Path("bench-out"),
    app_size: Annotated[
        int, typer.Option("--app-size", min=1024, help="Application image size, bytes.")
    ] = 128 * 1024,
    handshake_concurrency: Annotated[
        int,
        typer.Option(
            "--handshake-concurrency", min=1, help="Bare handshakes in flight per process."
        ),
    ] = 32,
    max_connects: Annotated[
        int,
        typer.Option(
            "--max-connects", min=1, help="Emulated devices connecting at once per process."
        ),
    ] = 32,
    online_timeout: Annotated[
        float,
        typer.Option("--online-timeout", help="Seconds to wait for every device to come online."),
    ] = 600.0,
    release_timeout: Annotated[
        float, typer.Option("--release-timeout", help="Seconds to wait for every device to update.")
    ] = 900.0,
    stall_timeout: Annotated[
        float,
        typer.Option("--stall-timeout", help="Stop waiting after this long without any progress."),
    ] = 120.0,
    handshakes: Annotated[
        bool,
        typer.Option("--handshakes/--no-handshakes", help="Run the bare handshake rounds."),
    ] = True,
    device_stack: Annotated[
        str,
        typer.Option(
            "--device-stack",
            help="records: the load generator's devices run our record layers (OpenSSL only "
            "for handshakes; 20,000 devices per process); openssl: trio DTLS / stdlib ssl "
            "sessions, as ota device emulate.",
        ),
    ] = "records",
    nginx: Annotated[
        bool, typer.Option("--nginx/--no-nginx", help="Run the nginx HTTPS baseline.")
    ] = True,
    nginx_workers: Annotated[int, typer.Option("--nginx-workers", min=1)] = 1,
    profile: Annotated[
        bool, typer.Option(
            "--profile",
            help="Sample the server (node 0 with --nodes) with py-spy during the release.",
        )
    ] = False,
    work_dir: WorkDirOption = None,
    keep_work: KeepWorkOption = False,
) -> None:
    """Run a server and N emulated devices: handshakes, sessions, an immediate release."""
    from server.bench.fleet.options import BenchOptions
    from server.bench.fleet.profile import find_py_spy
    from server.bench.fleet.report import RichReporter, results_table
    from server.bench.fleet.runner import run_fleet_bench

    console = Console()
    defaults: dict[str, Any] = {} if server_procs is None else {"server_procs": server_procs}
    try:
        options = BenchOptions(
            devices=devices,
            transport=transport,  # type: ignore[arg-type]  # checked below
            release=release,  # type: ignore[arg-type]
            procs=procs,
            **defaults,
            nodes=nodes,
            db_url=db_url,
            out_dir=out,
            app_size=app_size,
            handshake_concurrency=handshake_concurrency,
            max_connects=max_connects,
            online_timeout=online_timeout,
            release_timeout=release_timeout,
            stall_timeout=stall_timeout,
            handshakes=handshakes,
            device_stack=device_stack,  # type: ignore[arg-type]  # checked by BenchOptions
            nginx=nginx,
            nginx_workers=nginx_workers,
            profile=profile,
            work_parent=work_dir,
            keep_work=keep_work,
        )
    except OtaError as exc:
        fail(str(exc))
    if profile and find_py_spy() is None:
        fail("--profile needs py-spy, from the bench extra: pip install 'otacloud[bench]'")
    words = sys.argv[sys.argv.index("fleet") :] if "fleet" in sys.argv else ["fleet"]
    command = "ota bench " + shlex.join(words)
    try:
        with RichReporter(Console(stderr=True)) as reporter:
            run = partial(run_fleet_bench, options, reporter, command=command)
            result = trio.run(_until_signalled, run)
    except BaseException as raised:  # trio wraps errors of child tasks in exception groups
        found = _meaningful(raised)
        if isinstance(found, KeyboardInterrupt):
            fail("interrupted: every server, nginx and load generator was stopped")
        if isinstance(found, OtaError):
            fail(str(found))
        raise
    if result is None:
        fail("stopped by a signal: every server, nginx and load generator was stopped")
    console.print(results_table(result))
    for note in result["notes"]:
        console.print(f"note: {note}", markup=False, soft_wrap=True)  # whole lines
    plot = f" and {out}/result.png" if (out / "result.png").is_file() else ""
    console.print(f"results in {out}/result.json{plot}", markup=False, soft_wrap=True)


@app.command("hold")
def hold(
    devices: Annotated[int, typer.Option("--devices", "-n", min=1, help="Devices to hold.")] = 2000,
    transport: Annotated[
        str,
        typer.Option("--transport", help="tcp (TLS 1.3), udp (DTLS 1.2) or both (alternating)."),
    ] = "both",
    procs: Annotated[
        int | None,
        typer.Option(
            "--procs",
            min=1,
            help="Load-generator processes (at most 19,000 devices each); default: enough, "
            "at least 2.",
        ),
    ] = None,
    server_procs: Annotated[
        int | None,
        typer.Option(
            "--server-procs",
            min=1,
            help="Server processes (ota server --workers K); default: one per CPU, more when "
            "one transport has over 15,000 sessions per process.",
        ),
    ] = None,
    hold_seconds: Annotated[
        float, typer.Option("--hold-seconds", help="How long to hold every device.")
    ] = 600.0,
    sample_interval: Annotated[
        float, typer.Option("--sample-interval", help="Seconds between two samples of the hold.")
    ] = 10.0,
    keepalive_interval: Annotated[
        float, typer.Option("--keepalive-interval", help="Seconds between a device's pings.")
    ] = 60.0,
    keepalive_timeout: Annotated[
        float, typer.Option("--keepalive-timeout", help="A ping unanswered this long is missed.")
    ] = 20.0,
    max_missed: Annotated[
        int,
        typer.Option("--max-missed", min=1, help="Missed pings in a row that drop a session."),
    ] = 2,
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", min=1, help="Devices handshaking at once per process."),
    ] = 64,
    connect_timeout: Annotated[
        float, typer.Option("--connect-timeout", help="Seconds a connection attempt may take.")
    ] = 30.0,
    backoff_initial: Annotated[
        float, typer.Option("--backoff-initial", help="First reconnect back-off, seconds.")
    ] = 1.0,
    backoff_max: Annotated[
        float, typer.Option("--backoff-max", help="Longest reconnect back-off, seconds.")
    ] = 30.0,
    ramp_timeout: Annotated[
        float, typer.Option("--ramp-timeout", help="Seconds to wait for every device.")
    ] = 1800.0,
    stall_timeout: Annotated[
        float,
        typer.Option(
            "--stall-timeout", help="End the ramp-up after this long without a new device."
        ),
    ] = 180.0,
    min_available_mib: Annotated[
        int,
        typer.Option(
            "--min-available-mib",
            min=0,
            help="Stop the run when the machine's available memory falls under this (MiB).",
        ),
    ] = 2048,
    device_limit: Annotated[
        list[str] | None,
        typer.Option(
            "--device-limit", help="NAME=VALUE for ota server's --device-limit (repeatable)."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the devices' jitter.")] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Result file (JSON: the summary and every sample).")
    ] = Path("bench-hold.json"),
    work_dir: WorkDirOption = None,
    keep_work: KeepWorkOption = False,
) -> None:
    """Hold N devices connected, pinging, for a while: sessions, RSS growth, CPU, drops."""
    from server.bench.fleet.hold import HoldOptions, run_hold
    from server.bench.fleet.holder import HoldSettings

    console = Console()
    err = Console(stderr=True)
    try:
        options = HoldOptions(
            devices=devices,
            transport=transport,  # type: ignore[arg-type]  # checked by HoldOptions
            procs=procs,
            server_procs=server_procs,
            hold_seconds=hold_seconds,
            sample_interval=sample_interval,
            settings=HoldSettings(
                keepalive_interval=keepalive_interval,
                keepalive_timeout=keepalive_timeout,
                max_missed=max_missed,
                concurrency=concurrency,
                connect_timeout=connect_timeout,
                backoff_initial=backoff_initial,
                backoff_max=backoff_max,
            ),
            ramp_timeout=ramp_timeout,
            stall_timeout=stall_timeout,
            min_available_mib=min_available_mib,
            device_limits=tuple(device_limit or ()),
            seed=seed,
            out_path=out,
            work_parent=work_dir,
            keep_work=keep_work,
        )
    except OtaError as exc:
        fail(str(exc))

    def say(line: str) -> None:
        err.print(line, markup=False, highlight=False, soft_wrap=True)

    try:
        result = trio.run(_until_signalled, partial(run_hold, options, say))
    except BaseException as raised:
        found = _meaningful(raised)
        if isinstance(found, KeyboardInterrupt):
            fail("interrupted: the server and every load generator were stopped")
        if isinstance(found, OtaError):
            fail(str(found))
        raise
    if result is None:
        fail("stopped by a signal: the server and every load generator were stopped")
    for key in HOLD_SUMMARY:
        console.print(f"{key}: {result[key]}", markup=False, highlight=False, soft_wrap=True)
    for note in result["notes"]:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    console.print(f"results in {out}", markup=False, soft_wrap=True)


#: The lines ``ota bench hold`` prints (the result file has every figure and sample).
HOLD_SUMMARY = (
    "devices",
    "procs",
    "server_procs",
    "ramp_end",
    "ramp_s",
    "every_device_held",
    "connected_min",
    "server_sessions_min",
    "drops",
    "pings_missed",
    "server_rss_first_kib",
    "server_rss_last_kib",
    "server_rss_growth_pct",
    "server_rss_per_session_kib",
    "loadgen_rss_growth_pct",
    "server_cpu_per_s",
    "loadgen_cpu_per_s",
    "server_cpu_per_ping_us",
)


def _meaningful(raised: BaseException) -> BaseException:
    """The Ctrl-C or benchmark error inside (nested) exception groups, else ``raised``."""
    if isinstance(raised, BaseExceptionGroup):
        for kind in (KeyboardInterrupt, OtaError):
            group, _ = raised.split(kind)
            found: BaseException | None = group
            while isinstance(found, BaseExceptionGroup):
                found = found.exceptions[0]
            if found is not None:
                return found
    return raised


async def _until_signalled(
    run: Callable[[], Awaitable[dict[str, Any]]],
) -> dict[str, Any] | None:
    """``run()``, cancelled (children stopped as for Ctrl-C) on SIGTERM or SIGHUP; None
    when a signal stopped it."""
    stopped = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal stopped
                async for _ in signals:
                    stopped = True
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            result = await run()
            nursery.cancel_scope.cancel()
    return None if stopped else result


if __name__ == "__main__":
    app()
