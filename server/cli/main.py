"""Entry point of the ``ota`` console script.

Each command group lives in its own module under ``server/cli`` and is attached here.
"""

from __future__ import annotations

import platform

import typer

import otacore
from otacore._select import native_status
from server.cli import (
    bench_cmd,
    delta_cmd,
    demo_cmd,
    device_store_cmd,
    emulate_cmd,
    fleet_cmd,
    keys_cmd,
    module_cmd,
    rollout_cmd,
    server_cmd,
    team_cmd,
)

app = typer.Typer(
    name="ota",
    help="Self-hostable OTA firmware delivery cloud for Particle-style fleets.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(module_cmd.app, name="module")
app.add_typer(delta_cmd.app, name="delta")
app.add_typer(bench_cmd.app, name="bench")
app.command(name="demo")(demo_cmd.demo)
app.add_typer(fleet_cmd.firmware_app, name="firmware")
app.add_typer(fleet_cmd.device_app, name="device")
device_store_cmd.attach(fleet_cmd.device_app)
fleet_cmd.device_app.command("emulate")(emulate_cmd.emulate)
app.add_typer(fleet_cmd.group_app, name="group")
app.add_typer(fleet_cmd.device_os_app, name="device-os")
app.command(name="events")(fleet_cmd.events)
app.command(name="server")(server_cmd.server)
app.add_typer(server_cmd.admin_app, name="admin")
app.add_typer(server_cmd.product_app, name="product")
keys_cmd.attach(server_cmd.product_app)
team_cmd.attach(server_cmd.product_app)
rollout_cmd.attach(app, server_cmd.product_app)


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
