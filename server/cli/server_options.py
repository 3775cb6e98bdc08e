"""How the ``ota server`` command line becomes a layer of settings: which setting each
option sets (``OPTION_SETTINGS``), the device limits ``--device-limit`` knows, and the layer
the options, ``--device-limit NAME=VALUE`` and ``--set SECTION.KEY=VALUE`` give, over the
defaults and ``--config FILE`` (server.config_file).

Separate from server/cli/server_cmd.py, which declares the options and runs the server: this
is the mapping from options to the configuration schema, and checks the command line alone.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path

import typer

from server.config_file import (
    ConfigError,
    Layer,
    check_value,
    parse_assignment,
    parse_value,
    read_config_file,
)
from server.config_schema import SETTINGS, Setting
from server.transport import SessionLimits

#: Every device listener limit ``--device-limit`` can set (the SessionLimits fields).
LIMIT_NAMES = tuple(item.name for item in fields(SessionLimits))


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


def explicit(ctx: typer.Context, name: str) -> bool:
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


def has_data_dir(config_file: Path | None, command_line: Layer) -> bool:
    """True when the command line or the configuration file names the data directory."""
    if "data_dir" in command_line.get("server", {}):
        return True
    return config_file is not None and "data_dir" in read_config_file(config_file).get(
        "server", {})
