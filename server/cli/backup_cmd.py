"""``ota admin backup DEST``, ``ota admin restore SRC`` and ``ota admin verify-backup SRC``:
backups of an installation with the embedded SQLite store (server/store/backup.py and
restore.py). A PostgreSQL installation is backed up with pg_dump (the README, Backups)."""

from __future__ import annotations

from pathlib import Path

import typer

from otacore.errors import OtaError
from server.cli._output import fail, print_json
from server.cli._store import DbUrl
from server.store.backup import DEFAULT_MAX_RESTARTS, DEFAULT_STEP_PAGES, backup_installation
from server.store.backup_files import Manifest, verify_backup
from server.store.restore import restore_installation

DATA_HELP = "The installation's data directory."


def _summary(manifest: Manifest) -> dict[str, object]:
    return {
        "created_at": manifest.created_at,
        "source": manifest.source,
        "schema_version": manifest.schema_version,
        "alembic_revision": manifest.alembic_revision,
        "files": len(manifest.files),
        "blobs": len(manifest.blobs),
        "bytes": sum(entry.size for entry in manifest.files.values()),
        "copy_restarts": manifest.copy_restarts,
    }


def backup(
    dest: Path = typer.Argument(..., help="New directory to write the backup to (must not "
                                "exist; written under a temporary name, renamed when whole)."),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    db_url: str | None = DbUrl,
    step_pages: int = typer.Option(
        DEFAULT_STEP_PAGES, "--step-pages",
        help="Database pages copied per step of SQLite's online backup (-1: all in one "
        "step). Each step is a short read; the server's writes go on meanwhile."),
    max_restarts: int = typer.Option(
        DEFAULT_MAX_RESTARTS, "--max-restarts", min=0,
        help="Times the stepped copy may restart because the server wrote meanwhile before "
        "the rest is copied in one step."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Back up the installation (database, the blobs it refers to, keys, CA, certificates)
    into DEST while its server runs. The embedded SQLite store only: PostgreSQL
    installations use pg_dump (README, Backups)."""
    try:
        manifest = backup_installation(data, dest, db_url=db_url, step_pages=step_pages,
                                       max_restarts=max_restarts)
    except (OtaError, OSError) as exc:
        fail(str(exc))
    summary = _summary(manifest)
    if as_json:
        print_json({"backup": str(dest), **summary})
        return
    typer.echo(f"backup {dest}: {summary['files']} files ({summary['blobs']} blobs, "
               f"{summary['bytes']} bytes), schema version {summary['schema_version']}")


def restore(
    source: Path = typer.Argument(..., help="A backup directory (ota admin backup)."),
    data: Path = typer.Option(..., "--data", help="Data directory to restore into (created "
                              "if missing)."),
    db_url: str | None = DbUrl,
    force: bool = typer.Option(False, "--force",
                               help="Replace an installation already in --data."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Verify a backup against its manifest and restore it into --data atomically. Refuses
    while a server runs on --data, and replaces an existing installation only with --force."""
    try:
        result = restore_installation(source, data, db_url=db_url, force=force)
    except (OtaError, OSError) as exc:
        fail(str(exc))
    summary = _summary(result.manifest)
    if as_json:
        print_json({"restored": str(data), "database": str(result.database),
                    "replaced": result.replaced, **summary})
        return
    verb = "replaced the installation in" if result.replaced else "restored into"
    typer.echo(f"{verb} {data}: {summary['files']} files ({summary['blobs']} blobs) from the "
               f"backup of {summary['created_at']}; start ota server --data {data}")


def verify(
    source: Path = typer.Argument(..., help="A backup directory (ota admin backup)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Check a backup against its manifest (every file's size and SHA-256) without
    restoring it."""
    try:
        manifest = verify_backup(source)
    except (OtaError, OSError) as exc:
        fail(str(exc))
    summary = _summary(manifest)
    if as_json:
        print_json({"backup": str(source), "ok": True, **summary})
        return
    typer.echo(f"backup {source} is whole: {summary['files']} files match its manifest "
               f"(taken {summary['created_at']})")


def attach(admin_app: typer.Typer) -> None:
    """Add ``backup``, ``restore`` and ``verify-backup`` to ``ota admin``."""
    admin_app.command("backup")(backup)
    admin_app.command("restore")(restore)
    admin_app.command("verify-backup")(verify)
