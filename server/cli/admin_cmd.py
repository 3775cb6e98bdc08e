"""``ota admin ...``: administer the store directly, and a running server's sign-in limits.

Attach to the main CLI with ``app.add_typer(admin_cmd.admin_app, name="admin")``.

``admin`` commands work straight on the store in ``--data`` (bootstrap: no server or token
needed; SQLite allows this while a server runs), except ``admin sign-in-limits``, which
reaches the running server's in-memory limits through its API, and ``admin backup`` /
``restore`` / ``verify-backup`` (server/cli/backup_cmd.py). Every ``--db-url`` here also
reads ``OTA_DB_URL``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from otacore.errors import OtaError
from server.cli import api_cert_cmd, backup_cmd
from server.cli._direct_store import DATA_HELP, fail, open_fleet
from server.cli._output import print_json
from server.cli._store import DbUrl
from server.cli.fleet_cmd import ApiUrl, AsJson, Token, _client, _table
from server.cli.migrate_cmd import migrate as admin_migrate

admin_app = typer.Typer(
    help="Administer the store directly (bootstrap, backup, restore), and a running "
    "server's sign-in limits.",
    no_args_is_help=True,
)
backup_cmd.attach(admin_app)  # admin backup, restore, verify-backup
admin_app.command("api-cert")(api_cert_cmd.api_cert)
admin_app.command("migrate")(admin_migrate)


@admin_app.command("token")
def admin_token(
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    role: str = typer.Option("owner", "--role", help="owner, administrator, developer, ..."),
    label: str = typer.Option("admin token", "--label", help="Who the token is for (audit)."),
    expires_in: int = typer.Option(0, "--expires-in", help="Lifetime in seconds; 0: never."),
    db_url: str | None = DbUrl,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Print a new API token of ROLE, created straight in the store."""
    try:
        fleet = open_fleet(data, db_url)
        grant = fleet.create_api_token_sync(role, label=label, expires_in=expires_in)
    except OtaError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "access_token": grant.access_token,
                    "role": grant.role.value,
                    "expires_in": grant.expires_in,
                }
            )
        )
    else:
        typer.echo(grant.access_token)


@admin_app.command("user")
def admin_user(
    username: str = typer.Argument(..., help="Login name (e-mail)."),
    password: str = typer.Option(..., "--password", prompt=True, hide_input=True),
    role: str = typer.Option(
        "none", "--role",
        help="Installation-wide role: owner, administrator (every product and what no product "
        "owns), developer, support, viewer (every product), or none: only the products whose "
        "team the user joins (ota product team add).",
    ),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    db_url: str | None = DbUrl,
) -> None:
    """Create an operator account (for the OAuth password grant)."""
    try:
        open_fleet(data, db_url).create_user_sync(username, password, role)
    except OtaError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"created user {username} ({role})")


@admin_app.command("user-update")
def admin_user_update(
    username: str = typer.Argument(..., help="Login name."),
    role: str | None = typer.Option(None, "--role", help="New installation-wide role."),
    disable: bool = typer.Option(False, "--disable",
                                 help="Disable the account and revoke its tokens at once."),
    enable: bool = typer.Option(False, "--enable", help="Enable a disabled account."),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    db_url: str | None = DbUrl,
) -> None:
    """Change an account's installation role, or disable / enable it (takes effect on the
    next request of any of its tokens)."""
    if disable and enable:
        raise fail("give --disable or --enable, not both")
    if role is None and not (disable or enable):
        raise fail("nothing to change: give --role, --disable or --enable")
    try:
        user = open_fleet(data, db_url).update_user_sync(
            username, role=role, disabled=True if disable else (False if enable else None)
        )
    except OtaError as exc:
        raise fail(str(exc)) from exc
    state = "disabled" if user.disabled else "enabled"
    typer.echo(f"user {user.username}: role {user.role}, {state}")


@admin_app.command("client")
def admin_client(
    name: str = typer.Argument(..., help="What the client is for."),
    role: str = typer.Option("developer", "--role"),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    db_url: str | None = DbUrl,
) -> None:
    """Create an OAuth client (client_credentials grant); prints id and secret once."""
    try:
        client_id, secret = open_fleet(data, db_url).create_client_sync(name, role)
    except OtaError as exc:
        raise fail(str(exc)) from exc
    typer.echo(json.dumps({"client_id": client_id, "client_secret": secret}))


sign_in_app = typer.Typer(
    help="See and clear the sign-in limits of a running server (through its API: the limits "
    "live in the server's memory). Needs an owner or administrator token.",
    no_args_is_help=True,
)
admin_app.add_typer(sign_in_app, name="sign-in-limits")

SIGN_IN_COLUMNS = ["kind", "name", "failures", "limit", "locked", "retry_after"]


@sign_in_app.command("list")
def sign_in_limits_list(api_url: str = ApiUrl, token: str | None = Token,
                        as_json: bool = AsJson) -> None:
    """List the users, OAuth clients and client addresses with failed sign-ins or a lockout."""
    with _client(api_url, token) as client:
        result = client.list_sign_in_limits()
    if as_json:
        print_json(result)
        return
    limits = result.get("limits", [])
    if not limits:
        typer.echo("no failed sign-ins are counted")
        return
    _table(limits, SIGN_IN_COLUMNS)
    if result.get("total", 0) > len(limits):
        typer.echo(f"({result['total'] - len(limits)} more not shown)")


@sign_in_app.command("clear")
def sign_in_limits_clear(
    kind: str = typer.Argument(..., help="user, client or address."),
    name: str = typer.Argument(..., help="The user name, client id, or client address (an "
                               "IPv6 address clears its /64)."),
    api_url: str = ApiUrl, token: str | None = Token, as_json: bool = AsJson,
) -> None:
    """Forget the failed sign-ins of a user, OAuth client or address and lift its lockout."""
    if kind not in ("user", "client", "address"):
        raise typer.BadParameter("give user, client or address", param_hint="KIND")
    with _client(api_url, token) as client:
        result = client.clear_sign_in_limit(kind, name)
    if as_json:
        print_json(result)
    elif result.get("cleared"):
        cleared = result["cleared"]
        state = "lockout lifted, " if cleared.get("locked") else ""
        typer.echo(f"{kind} {result['name']}: {state}{cleared['failures']} failed sign-ins "
                   "forgotten")
    else:
        typer.echo(f"{kind} {result['name']}: no failed sign-ins were counted")
