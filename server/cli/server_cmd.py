"""``ota server``, ``ota admin ...`` and ``ota product ...``.

Attach to the main CLI with::

    app.command("server")(server_cmd.server)
    app.add_typer(server_cmd.admin_app, name="admin")
    app.add_typer(server_cmd.product_app, name="product")

``admin`` commands work straight on the store in ``--data`` (bootstrap: no server or token
needed; SQLite allows this while a server runs), except ``admin sign-in-limits``, which
reaches the running server's in-memory limits through its API. ``product create`` does the same with
``--data``, or calls a running server with ``--api-url`` and ``--token``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

import httpx
import trio
import typer

from otacore.errors import OtaError
from server.api import ApiSettings
from server.app import ServerConfig, serve
from server.cli._output import print_json
from server.cli.fleet_cmd import ApiUrl, AsJson, Token, _client, _table
from server.devices.ota import DowngradePolicy, OtaConfig
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.logs import configure_logging
from server.store import Store
from server.transport import SessionLimits
from server.workers import default_workers

admin_app = typer.Typer(
    help="Administer the store directly (bootstrap), and a running server's sign-in limits.",
    no_args_is_help=True,
)
product_app = typer.Typer(help="Manage products.", no_args_is_help=True)

DATA_HELP = "Data directory of the embedded store (created on first use)."

#: Every device listener limit ``--device-limit`` can set (the SessionLimits fields).
LIMIT_NAMES = tuple(item.name for item in fields(SessionLimits))


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def _open_fleet(data: Path, db_url: str | None) -> Fleet:
    store = Store.open(db_url, data / "blobs") if db_url else Store.open_dir(data, pool_size=1)
    return Fleet(store, EventBus())


def server(
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the API listens on."),
    api_port: int = typer.Option(8080, "--api-port", help="API port (0 picks a free one)."),
    db_url: str | None = typer.Option(
        None, "--db-url", help="SQLAlchemy database URL instead of the embedded SQLite file."
    ),
    device_port: int = typer.Option(
        5684, "--device-port", help="TCP (TLS) and UDP (DTLS) port for devices; -1 disables."
    ),
    device_host: str | None = typer.Option(
        None, "--device-host", help="Address the device listeners bind (default: --host)."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Server processes serving devices on the shared ports and store (default: one "
        "per CPU with device listeners, else 1).",
    ),
    device_limit: list[str] | None = typer.Option(
        None,
        "--device-limit",
        metavar="NAME=VALUE",
        help="Set a device listener limit (repeatable), e.g. max_pending_per_address=2000 "
        "when many devices share one public address. Names: " + ", ".join(LIMIT_NAMES) + ".",
    ),
    downgrades: str = typer.Option(
        DowngradePolicy.TARGETED.value,
        "--downgrades",
        help="When a device may be sent an older application than it has run: 'targeted' "
        "(its target says so: lock, flash, unlock, older release), 'device' (only a lock or "
        "flash of that device) or 'never'. Devices refuse any other downgrade.",
    ),
    downgrade_lifetime: float = typer.Option(
        OtaConfig.downgrade_lifetime,
        "--downgrade-lifetime",
        help="Seconds a downgrade authorisation for one device stays valid (devices refuse "
        "it after that).",
    ),
    password_hash_threads: int = typer.Option(
        ApiSettings.password_hash_threads, "--password-hash-threads", min=1,
        help="Threads that check passwords and client secrets (scrypt), apart from the "
        "store's threads.",
    ),
    password_hash_queue: int = typer.Option(
        ApiSettings.password_hash_queue, "--password-hash-queue", min=0,
        help="Sign-ins that may wait for a password-hashing thread; more get 503.",
    ),
    login_max_failures_per_address: int = typer.Option(
        ApiSettings.login_max_failures_per_address, "--login-max-failures-per-address", min=1,
        help="Failed /oauth/token attempts from one client address (an IPv6 /64: see "
        "ipv6_prefix_length in --device-limit) before it is locked out for --login-lockout "
        "seconds; a success from it clears them.",
    ),
    login_max_failures_per_user: int = typer.Option(
        ApiSettings.login_max_failures_per_user, "--login-max-failures-per-user", min=1,
        help="Failed /oauth/token attempts against one user name or client id, from addresses "
        "it has not signed in from before, before it is locked for those addresses "
        "(progressively: see --login-first-account-lockout).",
    ),
    login_lockout: float = typer.Option(
        ApiSettings.login_lockout_seconds, "--login-lockout", min=1,
        help="Seconds an address lockout lasts, the longest account lockout, and how long "
        "an address or account must stay quiet before its failures are forgotten.",
    ),
    login_first_account_lockout: float = typer.Option(
        ApiSettings.login_first_account_lockout_seconds, "--login-first-account-lockout",
        min=0.001,
        help="Seconds of an account's first lockout; each further failure doubles it, up "
        "to --login-lockout.",
    ),
    login_max_checks_per_address: int = typer.Option(
        ApiSettings.login_max_checks_per_address, "--login-max-checks-per-address", min=1,
        help="Sign-ins from one client address checked at once (its share of the "
        "password-hashing queue); more get 429.",
    ),
    login_familiar_addresses: int = typer.Option(
        ApiSettings.login_familiar_addresses, "--login-familiar-addresses", min=0,
        help="Addresses remembered per account as places it signed in from; failures from "
        "elsewhere cannot lock it for them (0: the account limit applies to every address).",
    ),
    login_tracked_keys: int = typer.Option(
        ApiSettings.login_tracked_keys, "--login-tracked-keys", min=1,
        help="Addresses, user names and client ids the sign-in limits remember (each); "
        "past it, those with the fewest failures are forgotten first.",
    ),
    login_log_interval: float = typer.Option(
        ApiSettings.login_log_interval, "--login-log-interval", min=0.001,
        help="Seconds between the summary lines of failed sign-ins and lockouts (the first "
        "of a burst is logged at once).",
    ),
    log_level: str = typer.Option(
        "info", "--log-level",
        help="Least severe log records written to stderr, in every server process: debug, "
        "info, warning or error. Refused handshakes, sign-in lockouts and sign-ins refused "
        "by a limit are warnings (aggregated); failed sign-ins are info (aggregated).",
    ),
    refresh_token_lifetime: int = typer.Option(
        ApiSettings.refresh_token_seconds, "--refresh-token-lifetime", min=60,
        help="Seconds a refresh token stays usable.",
    ),
) -> None:
    """Run the REST API, the store and the device listeners until SIGINT/SIGTERM (with
    --workers K, K-1 more processes serve devices too)."""
    listeners = device_port >= 0
    try:
        configure_logging(log_level)
    except OtaError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None
    limits = _device_limits(device_limit or [])
    api = ApiSettings(
        password_hash_threads=password_hash_threads,
        password_hash_queue=password_hash_queue,
        login_max_failures_per_address=login_max_failures_per_address,
        login_max_failures_per_user=login_max_failures_per_user,
        login_lockout_seconds=login_lockout,
        login_first_account_lockout_seconds=login_first_account_lockout,
        login_max_checks_per_address=login_max_checks_per_address,
        login_familiar_addresses=login_familiar_addresses,
        login_tracked_keys=login_tracked_keys,
        login_log_interval=login_log_interval,
        refresh_token_seconds=refresh_token_lifetime,
        # Sign-in limits group client addresses as the device listeners do.
        ipv6_prefix_length=limits.ipv6_prefix_length,
    )
    try:
        config = ServerConfig(
            data_dir=data,
            host=host,
            api_port=api_port,
            db_url=db_url,
            device_port=device_port if listeners else None,
            device_host=device_host,
            workers=workers if workers is not None else default_workers(listeners),
            api=api,
            ota=OtaConfig(downgrades=DowngradePolicy.parse(downgrades),
                          downgrade_lifetime=downgrade_lifetime),
            device_limits=limits,
            log_level=log_level.lower(),
        )
    except OtaError as exc:
        raise _fail(str(exc)) from exc
    try:
        trio.run(_run_server, config)
    except (OtaError, OSError) as exc:
        raise _fail(f"cannot run the server: {exc}") from exc
    except BaseExceptionGroup as group:  # errors from inside the server's nurseries
        expected, unexpected = group.split((OtaError, OSError))
        if expected is None or unexpected is not None:
            raise
        raise _fail(f"cannot run the server: {_first_leaf(expected)}") from group


def _device_limits(assignments: list[str]) -> SessionLimits:
    """SessionLimits from ``NAME=VALUE`` texts (usage error, exit code 2, when wrong)."""
    overrides: dict[str, str] = {}
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals or not name.strip():
            raise typer.BadParameter(
                f"{assignment!r} is not NAME=VALUE", param_hint="--device-limit"
            )
        overrides[name.strip()] = value.strip()
    try:
        return SessionLimits.with_overrides(overrides)
    except OtaError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device-limit") from None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first non-group exception inside nested exception groups."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


async def _run_server(config: ServerConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            typer.echo(f"ota server: API listening on {handle.api_url}")
            if handle.device_server is not None:
                for name, address in (
                    ("TLS", handle.device_server.tcp_address),
                    ("DTLS", handle.device_server.udp_address),
                ):
                    if address is not None:
                        typer.echo(f"ota server: devices on {name} {address[0]}:{address[1]}")
                buffers = handle.device_server.udp_buffers
                if buffers is not None:
                    typer.echo(f"ota server: DTLS socket buffers rcv {buffers[0]} snd {buffers[1]}")
            if handle.workers is not None:
                typer.echo(f"ota server: main process pid {os.getpid()}")
                for worker in handle.workers.workers:
                    typer.echo(f"ota server: worker {worker.spec.index} pid {worker.pid}")
            sys.stdout.flush()
            async for _ in signals:
                handle.shutdown.set()  # graceful: finish requests, then stop everything
                break


@admin_app.command("token")
def admin_token(
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    role: str = typer.Option("owner", "--role", help="owner, administrator, developer, ..."),
    label: str = typer.Option("admin token", "--label", help="Who the token is for (audit)."),
    expires_in: int = typer.Option(0, "--expires-in", help="Lifetime in seconds; 0: never."),
    db_url: str | None = typer.Option(None, "--db-url", help="Database URL (default: --data)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Print a new API token of ROLE, created straight in the store."""
    try:
        fleet = _open_fleet(data, db_url)
        grant = fleet.create_api_token_sync(role, label=label, expires_in=expires_in)
    except OtaError as exc:
        raise _fail(str(exc)) from exc
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
    db_url: str | None = typer.Option(None, "--db-url"),
) -> None:
    """Create an operator account (for the OAuth password grant)."""
    try:
        _open_fleet(data, db_url).create_user_sync(username, password, role)
    except OtaError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"created user {username} ({role})")


@admin_app.command("user-update")
def admin_user_update(
    username: str = typer.Argument(..., help="Login name."),
    role: str | None = typer.Option(None, "--role", help="New installation-wide role."),
    disable: bool = typer.Option(False, "--disable",
                                 help="Disable the account and revoke its tokens at once."),
    enable: bool = typer.Option(False, "--enable", help="Enable a disabled account."),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    db_url: str | None = typer.Option(None, "--db-url"),
) -> None:
    """Change an account's installation role, or disable / enable it (takes effect on the
    next request of any of its tokens)."""
    if disable and enable:
        raise _fail("give --disable or --enable, not both")
    if role is None and not (disable or enable):
        raise _fail("nothing to change: give --role, --disable or --enable")
    try:
        user = _open_fleet(data, db_url).update_user_sync(
            username, role=role, disabled=True if disable else (False if enable else None)
        )
    except OtaError as exc:
        raise _fail(str(exc)) from exc
    state = "disabled" if user.disabled else "enabled"
    typer.echo(f"user {user.username}: role {user.role}, {state}")


@admin_app.command("client")
def admin_client(
    name: str = typer.Argument(..., help="What the client is for."),
    role: str = typer.Option("developer", "--role"),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    db_url: str | None = typer.Option(None, "--db-url"),
) -> None:
    """Create an OAuth client (client_credentials grant); prints id and secret once."""
    try:
        client_id, secret = _open_fleet(data, db_url).create_client_sync(name, role)
    except OtaError as exc:
        raise _fail(str(exc)) from exc
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


@product_app.command("create")
def product_create(
    name: str = typer.Argument(..., help="Product name (the slug is derived from it)."),
    platform_id: int = typer.Option(..., "--platform-id", help="Device OS platform id."),
    description: str = typer.Option("", "--description"),
    data: Path | None = typer.Option(None, "--data", help=DATA_HELP),
    db_url: str | None = typer.Option(None, "--db-url"),
    api_url: str | None = typer.Option(None, "--api-url", help="URL of a running server."),
    token: str | None = typer.Option(
        None, "--token", envvar="OTA_TOKEN", help="API token (with --api-url)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Create a product and print its id and slug."""
    if (data is None) == (api_url is None):
        raise _fail("give either --data DIR (direct) or --api-url URL with --token")
    if api_url is not None:
        if not token:
            raise _fail("--api-url needs --token (or OTA_TOKEN)")
        product = _create_via_api(api_url, token, name, platform_id, description)
    else:
        assert data is not None
        try:
            fleet = _open_fleet(data, db_url)
            record = fleet.create_product_sync(
                SYSTEM_ACTOR, name, platform_id, description=description
            )
        except OtaError as exc:
            raise _fail(str(exc)) from exc
        product = {
            "id": record.id,
            "slug": record.slug,
            "name": record.name,
            "platform_id": record.platform_id,
        }
    if as_json:
        typer.echo(json.dumps(product))
    else:
        typer.echo(f"created product {product['id']} (slug {product['slug']})")


def _create_via_api(
    api_url: str, token: str, name: str, platform_id: int, description: str
) -> dict[str, object]:
    try:
        response = httpx.post(
            f"{api_url.rstrip('/')}/v1/products",
            json={"name": name, "platform_id": platform_id, "description": description},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {api_url}: {exc}") from exc
    body = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    if response.status_code != 201:
        raise _fail(str(body.get("error") or f"HTTP {response.status_code}"))
    product = body["product"]
    return {k: product[k] for k in ("id", "slug", "name", "platform_id")}


#: Stand-alone app (``python -m server.cli.server_cmd ...``) with the same commands.
app = typer.Typer(no_args_is_help=True, add_completion=False)
app.command("server")(server)
app.add_typer(admin_app, name="admin")
app.add_typer(product_app, name="product")

if __name__ == "__main__":
    app()
