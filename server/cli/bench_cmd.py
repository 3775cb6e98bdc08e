"""``ota bench fleet``: the end-to-end fleet benchmark (machinery in ``server.bench.fleet``,
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
        bool, typer.Option("--profile", help="Sample the server with py-spy during the release.")
    ] = False,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir", help="Parent of the scratch directory (default: the system temp)."
        ),
    ] = None,
    keep_work: Annotated[
        bool, typer.Option("--keep-work", help="Keep the scratch directory.")
    ] = False,
) -> None:
    """Run a server and N emulated devices: handshakes, sessions, an immediate release."""
    from server.bench.fleet.profile import find_py_spy
    from server.bench.fleet.report import RichReporter, results_table
    from server.bench.fleet.runner import BenchOptions, run_fleet_bench

    console = Console()
    try:
        options = BenchOptions(
            devices=devices,
            transport=transport,  # type: ignore[arg-type]  # checked below
            release=release,  # type: ignore[arg-type]
            procs=procs,
            **({} if server_procs is None else {"server_procs": server_procs}),
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
