"""The ``--db-url`` option (or ``OTA_DB_URL``) of every command that takes ``--data``, and
opening the installation's store from the two the same way everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.store.installation import DB_URL_ENV, DB_URL_HELP, Installation

#: ``--db-url`` as a parameter default (``db_url: str | None = DbUrl``).
DbUrl: str | None = typer.Option(None, "--db-url", envvar=DB_URL_ENV, show_envvar=True,
                                 help=DB_URL_HELP)

#: ``--db-url`` as an ``Annotated`` type (``db_url: DbUrlOption = None``).
DbUrlOption = Annotated[
    str | None,
    typer.Option("--db-url", envvar=DB_URL_ENV, show_envvar=True, help=DB_URL_HELP),
]


def installation(data: Path, db_url: str | None) -> Installation:
    """The installation the options ``--data`` and ``--db-url`` (or OTA_DB_URL) name."""
    return Installation(data, db_url)
