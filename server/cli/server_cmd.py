"""``ota server``: its options, and running the server until SIGINT/SIGTERM.

Attach to the main CLI with ``app.command("server")(server_cmd.server)``. The options map to
the settings of the configuration file in server/cli/server_options.py; ``ota admin`` is
server/cli/admin_cmd.py and ``ota product`` server/cli/product_cmd.py. ``python -m
server.cli.server_cmd`` runs a stand-alone app with the three (``app`` below).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import trio
import typer

from otacore.errors import OtaError
from server.api import ApiSettings
from server.api_tls import check_api_credentials
from server.app import ServerConfig, serve
from server.cli import admin_cmd, product_cmd
from server.cli._direct_store import DATA_HELP, fail
from server.cli.server_options import (
    LIMIT_NAMES,
    OPTION_SETTINGS,
    command_line_layer,
    explicit,
    has_data_dir,
)
from server.config_file import ConfigError, load_server_config, render_toml
from server.data_lock import hold_data_dir
from server.devices.ota import DowngradePolicy, OtaConfig
from server.logs import configure_logging
from server.store.installation import DB_URL_ENV, DB_URL_HELP, sqlite_database_path

log = logging.getLogger("ota.server")


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
        help="Seconds between lease renewals (one statement per server process for all its "
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
             if name in OPTION_SETTINGS and value is not None and explicit(ctx, name)}
    if "forwarded_allow_ips" in given:  # "a,b" or repeated: one list
        given["forwarded_allow_ips"] = [entry.strip() for value in given["forwarded_allow_ips"]
                                        for entry in value.split(",") if entry.strip()]
    if not str(given.get("db_url", "x")).strip():  # OTA_DB_URL= (empty): the embedded store
        del given["db_url"]
    try:
        command_line = command_line_layer(given, device_limit or [], assignments or [])
        config = load_server_config(config_file, command_line,
                                    data_dir_required=not print_config)
        data_dir_given = has_data_dir(config_file, command_line)
    except ConfigError as exc:
        raise fail(str(exc), code=2) from None
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
        raise fail(f"cannot run the server: {exc}") from exc
    except BaseExceptionGroup as group:  # errors from inside the server's nurseries
        expected, unexpected = group.split((OtaError, OSError))
        if expected is None or unexpected is not None:
            raise
        raise fail(f"cannot run the server: {_first_leaf(expected)}") from group


def _check_config(config: ServerConfig) -> None:
    """``ota server --check``: what the server would refuse at start, without starting."""
    if config.https:
        assert config.api_cert is not None and config.api_key is not None
        try:
            check_api_credentials(config.api_cert, config.api_key)
        except OtaError as exc:
            raise fail(str(exc)) from None
    scheme = "https" if config.https else "http"
    typer.echo(f"configuration OK: API on {scheme}://{config.host}:{config.api_port}, data in "
               f"{config.data_dir}")


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


#: Stand-alone app (``python -m server.cli.server_cmd ...``) with the same commands.
app = typer.Typer(no_args_is_help=True, add_completion=False)
app.command("server")(server)
app.add_typer(admin_cmd.admin_app, name="admin")
app.add_typer(product_cmd.product_app, name="product")

if __name__ == "__main__":
    app()
