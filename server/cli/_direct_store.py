"""What ``ota server``, ``ota admin`` and ``ota product`` share: the ``--data`` help, the
error exit of their commands, and the Fleet of the commands that work straight on the store
in ``--data`` (no server or token needed).

Separate from the three command modules so that none of them imports another for these:
``ota admin`` and ``ota product`` load neither the server's options nor the server.
"""

from __future__ import annotations

from pathlib import Path

import typer

from server.events import EventBus
from server.fleet import Fleet
from server.store.installation import open_installation_store

DATA_HELP = "Data directory of the embedded store (created on first use)."


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr; the exit to raise (1: the server could not run;
    2: a usage or configuration error)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def open_fleet(data: Path, db_url: str | None) -> Fleet:
    return Fleet(open_installation_store(data, db_url), EventBus())
