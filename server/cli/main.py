"""Entry point of the ``ota`` console script.

Each command group lives in its own module under ``server/cli``. The top-level group loads
a command's module only when that command runs (or when help lists it): importing every
group made each ``ota`` invocation pay ~0.8 s of imports (the server app, SQLAlchemy,
hypercorn) even for ``ota firmware list``.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import typer
from typer.core import TyperGroup

import otacore
from otacore._select import native_status


def _group(module: str, attribute: str) -> Callable[[], typer.Typer]:
    def load() -> typer.Typer:
        app: typer.Typer = getattr(importlib.import_module(f"server.cli.{module}"), attribute)
        return app

    return load


def _command(module: str, function: str, name: str) -> Callable[[], typer.Typer]:
    def load() -> typer.Typer:
        app = typer.Typer(add_completion=False)
        app.command(name=name)(getattr(importlib.import_module(f"server.cli.{module}"), function))
        return app

    return load


def _device_app() -> typer.Typer:
    from server.cli import device_store_cmd, emulate_cmd, fleet_cmd

    device_store_cmd.attach(fleet_cmd.device_app)
    fleet_cmd.device_app.command("emulate")(emulate_cmd.emulate)
    return fleet_cmd.device_app


def _product_app() -> typer.Typer:
    from server.cli import keys_cmd, product_cmd, rollout_cmd, team_cmd

    keys_cmd.attach(product_cmd.product_app)
    team_cmd.attach(product_cmd.product_app)
    product_cmd.product_app.add_typer(rollout_cmd.window_app, name="window")
    return product_cmd.product_app


#: Top-level name -> what builds it (a Typer app: a group, or one command).
LAZY_COMMANDS: dict[str, Callable[[], typer.Typer]] = {
    "module": _group("module_cmd", "app"),
    "delta": _group("delta_cmd", "app"),
    "bench": _group("bench_cmd", "app"),
    "demo": _command("demo_cmd", "demo", "demo"),
    "firmware": _group("fleet_cmd", "firmware_app"),
    "device": _device_app,
    "group": _group("fleet_cmd", "group_app"),
    "device-os": _group("fleet_cmd", "device_os_app"),
    "events": _command("fleet_cmd", "events", "events"),
    "audit": _command("fleet_cmd", "audit", "audit"),
    "server": _command("server_cmd", "server", "server"),
    "admin": _group("admin_cmd", "admin_app"),
    "product": _product_app,
    "rollout": _group("rollout_cmd", "rollout_app"),
}


class LazyCommands(TyperGroup):
    """The ``ota`` group: eager commands as usual, the others built on first use."""

    #: Built commands by name, shared: their modules' Typer apps are attached to once.
    _loaded: ClassVar[dict[str, Any]] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        build = LAZY_COMMANDS.get(cmd_name)
        if build is None:
            return super().get_command(ctx, cmd_name)
        command = self._loaded.get(cmd_name)
        if command is None:
            command = typer.main.get_command(build())
            command.name = cmd_name
            self._loaded[cmd_name] = command
        return command


app = typer.Typer(
    name="ota",
    cls=LazyCommands,
    help="Self-hostable OTA firmware delivery cloud for Particle-style fleets.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def ota(
    ca_file: Path | None = typer.Option(
        None, "--ca-file", envvar="OTA_CA_FILE", show_envvar=True, metavar="FILE",
        help="PEM file of the CA certificates an https --api-url is verified with (the "
        "installation CA: <data>/pki/ca.pem), for every command that calls a server.",
    ),
) -> None:
    """Self-hostable OTA firmware delivery cloud for Particle-style fleets."""
    # A callback keeps ``ota`` a group: with one eager command Typer would collapse into it.
    if ca_file is not None:  # server.client reads it (every command's client)
        os.environ["OTA_CA_FILE"] = str(ca_file)


@app.command()
def info() -> None:
    """Print the package version, the Python in use and whether native kernels are active."""
    status = native_status()
    native = "yes" if status and all(status.values()) else "no"
    typer.echo(f"otacloud {otacore.__version__}")
    typer.echo(f"python: {platform.python_implementation()} {platform.python_version()}")
    typer.echo(f"native: {native}")
    for name, is_native in status.items():
        typer.echo(f"  kernel {name}: {'native' if is_native else 'pure-python'}")


def main() -> None:
    """Run the ``ota`` command line."""
    app()


if __name__ == "__main__":
    main()
