"""``ota server``, ``ota admin ...`` and ``ota product ...``.

Attach to the main CLI with::

    app.command("server")(server_cmd.server)
    app.add_typer(server_cmd.admin_app, name="admin")
    app.add_typer(server_cmd.product_app, name="product")

``admin`` commands work straight on the store in ``--data`` (bootstrap: no server or token
needed; SQLite allows this while a server runs), except ``admin sign-in-limits``, which
reaches the running server's in-memory limits through its API, and ``admin backup`` /
``restore`` / ``verify-backup`` (server/cli/backup_cmd.py). Every ``--db-url`` here also
reads ``OTA_DB_URL``. ``product create`` does the same with
``--data``, or calls a running server with ``--api-url`` and ``--token``.
"""

from __future__ import annotations

import difflib
import json
import logging
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
from server.api_tls import check_api_credentials
from server.app import ServerConfig, serve
from server.cli import api_cert_cmd, backup_cmd
from server.cli._output import print_json
from server.cli._store import DbUrl
from server.cli.fleet_cmd import ApiUrl, AsJson, Token, _client, _table
from server.cli.migrate_cmd import migrate as admin_migrate
from server.client import ApiError, tls_verify, unreachable_message
from server.config_file import (
    ConfigError,
    Layer,
    check_value,
    load_server_config,
    parse_assignment,
    parse_value,
    read_config_file,
    render_toml,
)
from server.config_schema import SETTINGS, Setting
from server.data_lock import hold_data_dir
from server.devices.ota import DowngradePolicy, OtaConfig
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.logs import configure_logging
from server.store.installation import (
    DB_URL_ENV,
    DB_URL_HELP,
    open_installation_store,
    sqlite_database_path,
)
from server.transport import SessionLimits

admin_app = typer.Typer(
    help="Administer the store directly (bootstrap, backup, restore), and a running "
    "server's sign-in limits.",
    no_args_is_help=True,
)
product_app = typer.Typer(help="Manage products.", no_args_is_help=True)
backup_cmd.attach(admin_app)  # admin backup, restore, verify-backup
admin_app.command("api-cert")(api_cert_cmd.api_cert)
admin_app.command("migrate")(admin_migrate)

DATA_HELP = "Data directory of the embedded store (created on first use)."

#: Every device listener limit ``--device-limit`` can set (the SessionLimits fields).
LIMIT_NAMES = tuple(item.name for item in fields(SessionLimits))

log = logging.getLogger("ota.server")


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr; the exit to raise (1: the server could not run;
    2: a usage or configuration error)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def _open_fleet(data: Path, db_url: str | None) -> Fleet:
    return Fleet(open_installation_store(data, db_url), EventBus())


def server(
    ctx: typer.Context,
    data: Path | None = typer.Option(
        None, "--data", help=DATA_HELP + " Required here or as server.data_dir in --config FILE."
    ),
    config_file: Path | None = typer.Option(
        None, "--config", metavar="FILE",
        help="Read settings from this TOML file (its sections: server, api, sign_in, "
        "devices, sessions, delivery, transfer, relay, cluster, metrics, logging; see the README's "
        "Configuration section, or --print-config). Options given here override it.",
    ),
    print_config: bool = typer.Option(
        False, "--print-config",
        help="Print the effective configuration (defaults, --config FILE and the options "
        "given) as a TOML file --config reads back, and exit.",
    ),
    assignments: list[str] | None = typer.Option(
        None, "--set", metavar="SECTION.KEY=VALUE",
        help="Set any setting of the configuration file (repeatable), e.g. "
        "transfer.initial_rto=2 or sessions.max_sessions=30000; the value is read as a TOML "
        "value (a list: '[\"a\", \"b\"]'), else taken as text.",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the API listens on."),
    api_port: int = typer.Option(8080, "--api-port", help="API port (0 picks a free one)."),
    db_url: str | None = typer.Option(
        None, "--db-url", envvar=DB_URL_ENV, show_envvar=True, help=DB_URL_HELP
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
        min=0,
        help="Server processes serving devices on the shared ports and store (default, or "
        "0: one per CPU with device listeners, else 1).",
    ),
    device_limit: list[str] | None = typer.Option(
        None,
        "--device-limit",
        metavar="NAME=VALUE",
        help="Set a device session limit (repeatable; the sessions section of --config), e.g. "
        "max_pending_per_address=2000 when many devices share one public address. Names: "
        + ", ".join(LIMIT_NAMES) + ".",
    ),
    idle_timeout: float | None = typer.Option(
        None, "--idle-timeout",
        help="Seconds a device session may stay silent before it is closed: longer than the "
        "devices' keep-alive interval (default 120).",
    ),
    handshake_timeout: float | None = typer.Option(
        None, "--handshake-timeout",
        help="Seconds a device has to finish its TLS/DTLS handshake (default 10).",
    ),
    max_sessions: int | None = typer.Option(
        None, "--max-sessions", help="Most live device sessions per listener and process "
        "(default 19000).",
    ),
    max_concurrent_transfers: int | None = typer.Option(
        None, "--max-concurrent-transfers",
        help="Firmware transfers at once per server process (default 512).",
    ),
    delta_effort: int | None = typer.Option(
        None, "--delta-effort", min=1, max=6,
        help="Strategies (filter sets) made in full for each delta patch, the smallest kept: "
        "make time grows about linearly with it; images under 128 KiB get more within the "
        "same budget (default 2; 1 is the detector's choice alone).",
    ),
    delta_threads_per_patch: int | None = typer.Option(
        None, "--delta-threads-per-patch", min=1, max=16,
        help="Threads one delta patch's making uses: its codec passes overlap (default 2; "
        "the patch is the same with any number).",
    ),
    delta_format_version: int | None = typer.Option(
        None, "--delta-format-version", min=2, max=5,
        help="Newest delta patch format the server makes: 5 (default), 4 for devices whose "
        "applier reads no version 5, 3 for those that read no version 4, 2 for those that "
        "read no version 3 (larger patches).",
    ),
    delta_codec: str | None = typer.Option(
        None, "--delta-codec",
        help="Payload codec of delta patches: 'auto' (the smaller of zstd and lzma2, the "
        "same apply window; default), 'zstd' (for devices whose applier lacks LZMA2) or "
        "'lzma2'.",
    ),
    window_limit: int | None = typer.Option(
        None, "--window-limit",
        help="Chunks in flight beyond the acknowledged ones, at most (default 64; devices "
        "may ask for fewer).",
    ),
    congestion_control: bool | None = typer.Option(
        None, "--congestion-control/--no-congestion-control",
        help="Cap the chunks in flight by a congestion window (RFC 5681; default on); off: "
        "only the device's window limits them.",
    ),
    transfer_attempts: int | None = typer.Option(
        None, "--transfer-attempts",
        help="Transfers of one module tried per session when the device stops "
        "acknowledging (default 3).",
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
    node_id: str | None = typer.Option(
        None, "--node-id",
        help="This node's name among the server nodes sharing the store (--db-url); its "
        "devices' session leases say it, and at start the node frees only the leases its "
        "previous run held. Default: host name and API port. Never give two live nodes "
        "one id.",
    ),
    session_lease: float = typer.Option(
        ServerConfig.session_lease, "--session-lease", min=0.001,
        help="Seconds a device's session lease and a once-per-installation job's lease "
        "(rollout ticks, sweeping expired sessions, pruning the event log) last without "
        "renewal: a dead node's devices go offline and its jobs move within about this.",
    ),
    lease_renew_interval: float = typer.Option(
        ServerConfig.lease_renew_interval, "--lease-renew-interval", min=0.001,
        help="Seconds between lease renewals (one statement per node for all its "
        "sessions); at most half of --session-lease.",
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
    metrics_public: bool | None = typer.Option(
        None, "--metrics-public/--no-metrics-public",
        help="Serve /metrics to anyone who reaches the API port, without a token (a private "
        "network only). Default: a scrape needs --metrics-token-file's token or an owner's "
        "or administrator's token.",
    ),
    metrics_token_file: Path | None = typer.Option(
        None, "--metrics-token-file", metavar="FILE",
        help="File holding the token Prometheus scrapes /metrics with (authorization: "
        "credentials_file in its scrape config): one line, at least 16 characters; read "
        "again when it changes.",
    ),
    api_cert: Path | None = typer.Option(
        None, "--api-cert", metavar="FILE",
        help="Serve the API over HTTPS with this PEM certificate chain (with --api-key; "
        "`ota admin api-cert` issues one from the installation CA).",
    ),
    api_key: Path | None = typer.Option(
        None, "--api-key", metavar="FILE",
        help="The PEM private key of --api-cert (unencrypted, not readable by every user).",
    ),
    forwarded_allow_ips: list[str] | None = typer.Option(
        None, "--forwarded-allow-ips", metavar="ADDRESSES",
        help="Reverse proxies (addresses or networks, comma-separated or repeated; '*': any "
        "peer) whose X-Forwarded-For / X-Forwarded-Proto headers name the client. Default: "
        "none, the TCP peer is the client.",
    ),
    log_format: str | None = typer.Option(
        None, "--log-format",
        help="Log line format of every server process: text (default) or json (one JSON "
        "object per line).",
    ),
    check: bool = typer.Option(
        False, "--check",
        help="Check the configuration (and the API certificate and key) and exit: 0 when "
        "the server would start with it.",
    ),
) -> None:
    """Run the REST API, the store and the device listeners until SIGINT/SIGTERM (with
    --workers K, K-1 more processes serve devices too). Settings come from the built-in
    defaults, then --config FILE, then the options given here."""
    given = {name: value for name, value in ctx.params.items()
             if name in OPTION_SETTINGS and value is not None and _explicit(ctx, name)}
    if "forwarded_allow_ips" in given:  # "a,b" or repeated: one list
        given["forwarded_allow_ips"] = [entry.strip() for value in given["forwarded_allow_ips"]
                                        for entry in value.split(",") if entry.strip()]
    if not str(given.get("db_url", "x")).strip():  # OTA_DB_URL= (empty): the embedded store
        del given["db_url"]
    try:
        command_line = command_line_layer(given, device_limit or [], assignments or [])
        config = load_server_config(config_file, command_line,
                                    data_dir_required=not print_config)
        data_dir_given = _has_data_dir(config_file, command_line)
    except ConfigError as exc:
        raise _fail(str(exc), code=2) from None
    if print_config:
        typer.echo(render_toml(config, data_dir_given=data_dir_given), nl=False)
        return
    configure_logging(config.log_level, log_format=config.log_format)
    if check:
        _check_config(config)
        return
    try:
        trio.run(_run_server, config)
    except (OtaError, OSError) as exc:
        raise _fail(f"cannot run the server: {exc}") from exc
    except BaseExceptionGroup as group:  # errors from inside the server's nurseries
        expected, unexpected = group.split((OtaError, OSError))
        if expected is None or unexpected is not None:
            raise
        raise _fail(f"cannot run the server: {_first_leaf(expected)}") from group


#: The ``ota server`` options that set one setting each (parameter name -> section.key).
OPTION_SETTINGS: dict[str, str] = {
    "data": "server.data_dir",
    "db_url": "server.db_url",
    "workers": "server.workers",
    "host": "api.host",
    "api_port": "api.port",
    "device_port": "devices.port",
    "device_host": "devices.host",
    "idle_timeout": "sessions.idle_timeout",
    "handshake_timeout": "sessions.handshake_timeout",
    "max_sessions": "sessions.max_sessions",
    "max_concurrent_transfers": "delivery.max_concurrent_transfers",
    "downgrades": "delivery.downgrades",
    "delta_effort": "delivery.delta_effort",
    "delta_codec": "delivery.delta_codec",
    "delta_threads_per_patch": "delivery.delta_threads_per_patch",
    "delta_format_version": "delivery.delta_format_version",
    "downgrade_lifetime": "delivery.downgrade_lifetime",
    "window_limit": "transfer.window_limit",
    "congestion_control": "transfer.congestion_control",
    "transfer_attempts": "transfer.attempts",
    "password_hash_threads": "sign_in.password_hash_threads",
    "password_hash_queue": "sign_in.password_hash_queue",
    "login_max_failures_per_address": "sign_in.max_failures_per_address",
    "login_max_failures_per_user": "sign_in.max_failures_per_user",
    "login_lockout": "sign_in.lockout_seconds",
    "login_first_account_lockout": "sign_in.first_account_lockout_seconds",
    "login_max_checks_per_address": "sign_in.max_checks_per_address",
    "login_familiar_addresses": "sign_in.familiar_addresses",
    "login_tracked_keys": "sign_in.tracked_keys",
    "login_log_interval": "sign_in.log_interval",
    "log_level": "logging.level",
    "node_id": "cluster.node_id",
    "session_lease": "cluster.session_lease",
    "lease_renew_interval": "cluster.lease_renew_interval",
    "refresh_token_lifetime": "sign_in.refresh_token_seconds",
    "metrics_public": "metrics.public",
    "metrics_token_file": "metrics.token_file",
    "api_cert": "api.cert",
    "api_key": "api.key",
    "forwarded_allow_ips": "api.forwarded_allow_ips",
    "log_format": "logging.format",
}


def _check_config(config: ServerConfig) -> None:
    """``ota server --check``: what the server would refuse at start, without starting."""
    if config.https:
        assert config.api_cert is not None and config.api_key is not None
        try:
            check_api_credentials(config.api_cert, config.api_key)
        except OtaError as exc:
            raise _fail(str(exc)) from None
    scheme = "https" if config.https else "http"
    typer.echo(f"configuration OK: API on {scheme}://{config.host}:{config.api_port}, data in "
               f"{config.data_dir}")


def _explicit(ctx: typer.Context, name: str) -> bool:
    """True when the option was given (on the command line or from its variable), not
    left at its default: only those override the configuration file."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def command_line_layer(given: dict[str, object], device_limits: list[str],
                       assignments: list[str]) -> Layer:
    """The layer of settings the command line gave: options (parameter name -> value),
    ``--device-limit NAME=VALUE`` and ``--set SECTION.KEY=VALUE``. ConfigError when one is
    wrong or two of them set the same setting."""
    by_name = {setting.name: setting for setting in SETTINGS}
    values: dict[str, tuple[str, object]] = {}  # section.key -> (where, value)

    def put(setting: Setting, where: str, value: object) -> None:
        if setting.name in values and values[setting.name][0] != where:
            raise ConfigError(f"{values[setting.name][0]} and {where} both set {setting.name}; "
                              "give it once")
        values[setting.name] = (where, value)

    for assignment in assignments:
        setting, value = parse_assignment(assignment, "--set")
        put(setting, f"--set {setting.name}", value)
    for assignment in device_limits:
        name, equals, text = assignment.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ConfigError(f"--device-limit: {assignment!r} is not NAME=VALUE")
        if name not in LIMIT_NAMES:
            close = difflib.get_close_matches(name, LIMIT_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--device-limit: unknown device limit {name!r}{hint}; known: "
                              f"{', '.join(LIMIT_NAMES)}")
        setting = by_name[f"sessions.{name}"]
        put(setting, f"--device-limit {name}",
            check_value(setting, parse_value(text.strip()), "--device-limit"))
    for parameter, value in given.items():
        setting = by_name[OPTION_SETTINGS[parameter]]
        shown = str(value) if isinstance(value, Path) else value
        put(setting, _flag(parameter), check_value(setting, shown, _flag(parameter)))
    layer: Layer = {}
    for name, (_, value) in values.items():
        section, _, key = name.partition(".")
        layer.setdefault(section, {})[key] = value
    return layer


def _has_data_dir(config_file: Path | None, command_line: Layer) -> bool:
    """True when the command line or the configuration file names the data directory."""
    if "data_dir" in command_line.get("server", {}):
        return True
    return config_file is not None and "data_dir" in read_config_file(config_file).get(
        "server", {})


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first non-group exception inside nested exception groups."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


async def _run_server(config: ServerConfig) -> None:
    # This process serves and nothing else: its collector is tuned for it (server.gc_tuning).
    config.collector.apply_thresholds()
    # One server per data directory on SQLite; PostgreSQL nodes may share one (data_lock).
    shared = sqlite_database_path(config.data_dir, config.db_url) is None
    with hold_data_dir(config.data_dir, shared=shared), \
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve, config)
            typer.echo(f"ota server: API listening on {handle.api_url}")
            typer.echo(f"ota server: node {handle.node_id}")
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
            log.info("%s", config.collector.started())
            async for _ in signals:
                handle.shutdown.set()  # graceful: finish requests, then stop everything
                break


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
    db_url: str | None = DbUrl,
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
    db_url: str | None = DbUrl,
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
    db_url: str | None = DbUrl,
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
    db_url: str | None = DbUrl,
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
            verify=tls_verify(),  # an https URL: the CA of ota --ca-file / OTA_CA_FILE
        )
    except ApiError as exc:
        raise _fail(exc.message) from exc
    except httpx.HTTPError as exc:
        raise _fail(unreachable_message(api_url, exc)) from exc
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
