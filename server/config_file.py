"""``ota server --config FILE``: read, check, merge and print the server's settings.

A configuration is built from layers, each ``{section: {key: value}}`` as TOML gives it
(:mod:`server.config_schema` names every section and key): the built-in defaults, then the
file, then what the command line gave explicitly (later layers win). Each layer is checked
on its own, so an error names where the wrong value came from; the merged values then build
the dataclasses (:class:`ServerConfig` and those it holds), whose own validation checks the
ranges and the relations between fields.

Every error is a :class:`ConfigError` whose message names the setting and what to change.
"""

from __future__ import annotations

import difflib
import math
import re
import textwrap
import tomllib
import typing
from dataclasses import MISSING, replace
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec
import tomli_w
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from otacore.errors import OtaError, ValidationError
from otacore.transfer import RetransmitPolicy
from server.api import ApiSettings
from server.app import ServerConfig
from server.config_schema import (
    BY_SECTION,
    SECTIONS,
    SETTINGS,
    TARGETS,
    Setting,
    describe,
    field_default,
)
from server.devices.delivery import OtaConfig
from server.devices.tuning import DeviceTuning
from server.event_history import HistorySettings
from server.gc_tuning import CollectorSettings
from server.relay import RelaySettings
from server.transport import SessionLimits
from server.workers import default_workers

#: ``{section: {key: value}}``: one layer of settings, as TOML parses it.
Layer = dict[str, dict[str, Any]]


class ConfigError(ValidationError):
    """A configuration file or option is wrong (unknown setting, wrong type, out of range,
    unreadable or not TOML); the message says which and what is expected."""


#: What ``--print-config`` prints instead of a database password (SQLAlchemy's own mask).
HIDDEN_PASSWORD = "***"


def _db_password(url: str) -> str | None:
    """The password in a database URL (None: none, or not a URL SQLAlchemy can parse)."""
    try:
        return make_url(url).password
    except (ArgumentError, ValueError):
        return None


def hide_db_password(url: str) -> str:
    """``url`` with its password masked (``***``), as SQLAlchemy renders it for logs; a URL
    without a password, or one SQLAlchemy cannot parse, comes back unchanged."""
    if not _db_password(url):
        return url
    return make_url(url).render_as_string(hide_password=True)


# -- checking one layer -------------------------------------------------------------------------


def _nearest(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def value_type(setting: Setting) -> Any:
    """The type a setting's value has in the file (a field that may be None takes the
    type of its values; paths and enums are strings)."""
    hint = typing.get_type_hints(TARGETS[setting.target])[setting.field]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        hint = args[0]
    if hint is Path or (isinstance(hint, type) and issubclass(hint, Enum)):
        return str
    return hint


def _wanted(kind: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if kind in names:
        return names[kind]
    if typing.get_origin(kind) is tuple:
        return "a list of strings"
    return str(kind)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"the list {_short(value)}"
    return _short(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_value(setting: Setting, value: Any, origin: str) -> Any:
    """``value`` as the setting's type (ints are accepted for numbers, lists for tuples),
    or ConfigError naming the setting, what it wants and what it got."""
    kind = value_type(setting)
    try:
        converted = msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError:
        raise ConfigError(
            f"{origin}: {setting.name} must be {_wanted(kind)}, not {_shown(value)}"
        ) from None
    if kind is float and not math.isfinite(converted):
        raise ConfigError(f"{origin}: {setting.name} must be a finite number, not {value!r}")
    return converted


def check_layer(data: dict[str, Any], origin: str) -> Layer:
    """Check a layer's sections, keys and value types (not ranges: the dataclasses do
    that once every layer is merged)."""
    layer: Layer = {}
    for section, table in data.items():
        if section not in BY_SECTION:
            if not isinstance(table, dict):  # a key outside any section
                owners = [s.section for s in SETTINGS if s.key == section]
                where = (f"; it belongs in [{'] or ['.join(owners)}]" if owners
                         else _nearest_anywhere(section))
                raise ConfigError(
                    f"{origin}: {section!r} is not in a section{where}; settings go in the "
                    f"sections [{'], ['.join(SECTIONS)}]"
                )
            raise ConfigError(
                f"{origin}: unknown section [{section}]{_nearest(section, list(SECTIONS))}; "
                f"the sections are [{'], ['.join(SECTIONS)}]"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: {section} must be a section ([{section}]), not "
                              f"{_shown(table)}")
        keys = BY_SECTION[section]
        checked: dict[str, Any] = {}
        for key, value in table.items():
            setting = keys.get(key)
            if setting is None:
                elsewhere = [s.section for s in SETTINGS if s.key == key]
                hint = (f" (it belongs in [{'] or ['.join(elsewhere)}])" if elsewhere
                        else _nearest(key, list(keys)))
                raise ConfigError(f"{origin}: unknown setting {key!r} in [{section}]{hint}")
            checked[key] = check_value(setting, value, origin)
        layer[section] = checked
    return layer


def _nearest_anywhere(word: str) -> str:
    names = [s.name for s in SETTINGS]
    close = difflib.get_close_matches(word, [s.key for s in SETTINGS], n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {next(n for n in names if n.endswith('.' + close[0]))!r}?)"


def read_config_file(path: Path) -> Layer:
    """The checked layer of a TOML configuration file (ConfigError when it cannot be read,
    is not TOML or names a wrong setting)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: "
                          f"{exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return check_layer(data, str(path))


def parse_assignment(text: str, origin: str) -> tuple[Setting, Any]:
    """``SECTION.KEY=VALUE`` (``--set``) as a setting and its checked value; the value is
    read as a TOML value (``2.5``, ``true``, ``["a", "b"]``), else taken as a string."""
    name, equals, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not equals or not dot:
        raise ConfigError(f"{origin}: {text!r} is not SECTION.KEY=VALUE (e.g. "
                          "sessions.idle_timeout=300)")
    if section not in BY_SECTION:
        raise ConfigError(f"{origin}: unknown section {section!r}"
                          f"{_nearest(section, list(SECTIONS))}; the sections are "
                          f"{', '.join(SECTIONS)}")
    setting = BY_SECTION[section].get(key)
    if setting is None:
        raise ConfigError(f"{origin}: unknown setting {key!r} in [{section}]"
                          f"{_nearest(key, list(BY_SECTION[section]))}")
    return setting, check_value(setting, parse_value(raw.strip()), origin)


def parse_value(text: str) -> Any:
    """A command-line value as TOML reads it, or the text itself when it is not a TOML
    value (so ``debug`` needs no quotes)."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["value"] if parsed.keys() == {"value"} else text


def merge(*layers: Layer) -> Layer:
    """The layers' values, later layers winning key by key."""
    merged: Layer = {}
    for layer in layers:
        for section, table in layer.items():
            merged.setdefault(section, {}).update(table)
    return merged


# -- building the configuration ------------------------------------------------------------------


def _field_value(setting: Setting, value: Any) -> Any:
    if setting.none_value is not None and value == setting.none_value:
        return None
    if setting.target == "server" and setting.field == "data_dir":
        return Path(value)
    return value


def _build(cls: type, values: dict[str, Any], names: dict[str, str]) -> Any:
    """``cls(**values)``; its validation errors become ConfigErrors naming the settings as
    the file spells them (``names``: field -> section.key)."""
    try:
        return cls(**values)
    except (OtaError, ValueError, TypeError) as exc:
        message = str(exc)
        for field_name, setting_name in sorted(names.items(), key=lambda i: -len(i[0])):
            message = _rename(message, field_name, setting_name)
        raise ConfigError(message) from None


def _rename(message: str, field_name: str, setting_name: str) -> str:
    """Replace the whole word ``field_name`` (not part of a longer name) in ``message``."""
    return re.sub(rf"(?<![\w.]){re.escape(field_name)}(?![\w])", setting_name, message)


def build_server_config(values: Layer, *, data_dir_required: bool = True) -> ServerConfig:
    """The :class:`ServerConfig` the merged layers describe (defaults for what they leave
    out); ConfigError when a value is out of range or the data directory is missing."""
    by_target: dict[str, dict[str, Any]] = {name: {} for name in TARGETS}
    names: dict[str, dict[str, str]] = {name: {} for name in TARGETS}
    for setting in SETTINGS:
        names[setting.target][setting.field] = setting.name
        if setting.key in values.get(setting.section, {}):
            raw = values[setting.section][setting.key]
            by_target[setting.target][setting.field] = _field_value(setting, raw)
    server = by_target["server"]
    if server.get("db_url") and _db_password(server["db_url"]) == HIDDEN_PASSWORD:
        # A file written by --print-config, whose password was masked: connecting with
        # "***" would only fail later, at the database, with a less helpful message.
        raise ConfigError("server.db_url holds the password --print-config hid "
                          f"({HIDDEN_PASSWORD}): put the real password back in the file, or "
                          "give the URL with --db-url")
    if "data_dir" not in server:
        if data_dir_required:
            raise ConfigError("no data directory: give --data DIR, or data_dir in the "
                              "[server] section of the configuration file")
        server["data_dir"] = Path()
    limits: SessionLimits = _build(SessionLimits, by_target["sessions"], names["sessions"])
    policy = _build(RetransmitPolicy, by_target["retransmit"], names["retransmit"])
    ota = _build(OtaConfig, {**by_target["ota"], "transfer_policy": policy}, names["ota"])
    api = _build(ApiSettings, {**by_target["api"],
                               "ipv6_prefix_length": limits.ipv6_prefix_length}, names["api"])
    tuning = _build(DeviceTuning, by_target["devices"], names["devices"])
    relay = _build(RelaySettings, by_target["relay"], names["relay"])
    collector = _build(CollectorSettings, by_target["collector"], names["collector"])
    history = _build(HistorySettings, by_target["history"], names["history"])
    if server.get("workers") is None:  # unset: one per CPU when devices connect
        server["workers"] = default_workers("device_port" not in server
                                            or server["device_port"] is not None)
    config: ServerConfig = _build(
        ServerConfig,
        {**server, "api": api, "device_limits": limits, "ota": ota, "device_tuning": tuning,
         "relay": relay, "collector": collector, "history": history},
        names["server"],
    )
    return replace(config, log_level=config.log_level.lower())


def load_server_config(config_file: Path | None, command_line: Layer, *,
                       data_dir_required: bool = True) -> ServerConfig:
    """Defaults < ``config_file`` < ``command_line`` (a checked layer), built."""
    file_layer = read_config_file(config_file) if config_file is not None else {}
    return build_server_config(merge(file_layer, command_line),
                               data_dir_required=data_dir_required)


# -- printing -----------------------------------------------------------------------------------


def setting_value(config: ServerConfig, setting: Setting) -> Any:
    """The setting's value in ``config``, as the file spells it (None: left out)."""
    owner: Any = {
        "server": config,
        "api": config.api,
        "sessions": config.device_limits,
        "ota": config.ota,
        "retransmit": config.ota.transfer_policy,
        "devices": config.device_tuning,
        "relay": config.relay,
        "collector": config.collector,
        "history": config.history,
    }[setting.target]
    return file_value(setting, getattr(owner, setting.field))


def file_value(setting: Setting, value: Any) -> Any:
    """A field's value as the file spells it (None: left out of the file)."""
    if value is None:
        return setting.none_value
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def toml_value(value: Any) -> str:
    """One TOML value, as tomli_w writes it."""
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def render_toml(config: ServerConfig, *, data_dir_given: bool = True,
                show_secrets: bool = False) -> str:
    """``config`` as a configuration file (every setting, each under its description),
    which ``--config`` reads back to the same configuration. A database password is masked
    unless ``show_secrets`` (the output lands in terminals, logs and tickets); such a file
    is refused until the password is put back."""
    out = ["# ota server configuration (ota server --print-config).",
           "# Precedence: built-in defaults < this file (--config) < options given on the",
           "# command line. Every setting is listed with its effective value."]
    for section in SECTIONS:
        out += ["", f"[{section}]"]
        for setting in BY_SECTION[section].values():
            out += textwrap.wrap(describe(setting), 96, initial_indent="# ",
                                 subsequent_indent="# ")
            value = setting_value(config, setting)
            if setting.name == "server.data_dir" and not data_dir_given:
                out.append('# data_dir = "/var/lib/ota"  (required: set it, or give --data)')
            elif value is None:
                out.append(f"# {setting.key} is unset: {setting.none_means}")
            elif setting.name == "server.db_url" and not show_secrets and (
                    hide_db_password(value) != value):
                out.append(f"# The password is hidden: replace {HIDDEN_PASSWORD} with it, or "
                           "give the URL with --db-url.")
                out.append(f"{setting.key} = {toml_value(hide_db_password(value))}")
            else:
                out.append(f"{setting.key} = {toml_value(value)}")
    return "\n".join(out) + "\n"


def settings_markdown() -> str:
    """The README's list of every setting with its default, option and description."""
    out: list[str] = []
    for section in SECTIONS:
        out += ["", f"`[{section}]`", ""]
        for setting in BY_SECTION[section].values():
            shown = _default_text(setting, field_default(setting))
            flag = f" (`{setting.flag}`)" if setting.flag else ""
            out.append(f"- `{setting.key}` = {shown}{flag}: {describe(setting)}")
    return "\n".join(out).lstrip("\n") + "\n"


def _default_text(setting: Setting, default: Any) -> str:
    if default is MISSING:
        return "(required)"
    value = file_value(setting, default)
    if value is None:
        return f"unset ({setting.none_means})"
    if setting.none_value is not None and value == setting.none_value:
        return f"`{value}` ({setting.none_means})"
    return f"`{toml_value(value)}`"


README_BEGIN = "<!-- settings:begin (generated: python -m server.config_file --readme) -->\n"
README_END = "<!-- settings:end -->\n"


def readme_with_settings(readme: str) -> str:
    """``readme`` with the text between its settings markers replaced by
    :func:`settings_markdown` (ValueError when the markers are missing)."""
    start = readme.index(README_BEGIN) + len(README_BEGIN)
    end = readme.index(README_END, start)
    return readme[:start] + settings_markdown() + readme[end:]


def main() -> None:
    """``python -m server.config_file --readme [README.md]``: regenerate the README's list
    of settings."""
    import sys

    args = sys.argv[1:]
    if not args or args[0] != "--readme":
        sys.exit("usage: python -m server.config_file --readme [README.md]")
    path = Path(args[1] if len(args) > 1 else "README.md")
    path.write_text(readme_with_settings(path.read_text()))


if __name__ == "__main__":
    main()
