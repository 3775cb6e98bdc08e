"""``ota admin migrate``: show a store's schema revision and upgrade it in place.

``ota server`` upgrades the store itself when it starts; this command does it on its own
(before starting several nodes, or to see what an upgrade would do): it prints the current
and head revisions, then upgrades under the same lock the server takes
(:mod:`server.store.migrate`). ``--check`` changes nothing and exits 3 when an upgrade is
pending, so a deployment script can tell. Take a backup first (README, "Upgrading").
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
import typer

from otacore.errors import OtaError
from server.cli._output import fail, print_json
from server.cli._store import DbUrl
from server.store import migrate as migrations
from server.store.engine import create_store_engine
from server.store.installation import effective_db_url
from server.store.store import DB_FILENAME

#: Exit status of ``--check`` when the store needs an upgrade (1 and 2 are errors).
PENDING_EXIT = 3


def _store_url(data: Path | None, db_url: str | None) -> str:
    """The database to migrate: ``db_url``, else the embedded SQLite file in ``data``, which
    must exist (a mistyped ``--data`` must not create an empty store)."""
    db_url = effective_db_url(db_url)
    if db_url is not None:
        return db_url
    if data is None:
        fail("say which store: --data DIR (the embedded SQLite store) or --db-url URL", 2)
    database = data / DB_FILENAME
    if not database.is_file():
        fail(f"no store at {database}: `ota server --data {data}` creates one", 2)
    return f"sqlite:///{database.resolve()}"


def migrate(
    data: Path | None = typer.Option(
        None, "--data", help="Data directory of the embedded store (its ota.db)."
    ),
    db_url: str | None = DbUrl,
    check: bool = typer.Option(
        False, "--check",
        help=f"Change nothing; exit {PENDING_EXIT} when an upgrade is pending, 0 when current.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Print the store's schema revision and this server's, and upgrade the store in place."""
    url = _store_url(data, db_url)
    try:
        setup = create_store_engine(url, pool_size=1)
    except OtaError as exc:
        fail(str(exc), 2)
    shown = setup.engine.url.render_as_string(hide_password=True)
    try:
        before = migrations.status_of(setup.engine)
        migrations.check_compatible(before)
        report = None if check or not before.pending else migrations.upgrade(setup.engine)
    except OtaError as exc:
        fail(str(exc))
    except sa.exc.OperationalError as exc:
        fail(f"the database {shown} is unavailable: {exc.orig}")
    finally:
        setup.engine.dispose()
    applied = report.applied if report else []
    if as_json:
        print_json({
            "database": shown,
            "current": list(before.current),
            "legacy_schema_version": before.legacy_version,
            "head": before.head,
            "pending": before.pending,
            "applied": applied,
            "upgraded": report is not None,
        })
    else:
        typer.echo(f"database: {shown}")
        typer.echo(f"current revision: {before.describe_current()}")
        typer.echo(f"head revision: {before.head}")
        if not before.pending:
            typer.echo("the schema is current; nothing to do")
        elif report is None:
            typer.echo("an upgrade is pending: `ota admin migrate` (without --check) runs it")
        else:
            typer.echo(f"upgraded to {before.head}: {report.describe()}")
    if check and before.pending:
        raise typer.Exit(PENDING_EXIT)
