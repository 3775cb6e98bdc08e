"""The configuration schema covers every tunable, and the README lists every setting with
its default (issue 14, item 9): these tests fail when a field is added to a configuration
dataclass without a setting, or when the README's list drifts from the code."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from server.app import ServerConfig
from server.cli.server_cmd import server
from server.cli.server_options import OPTION_SETTINGS
from server.config_file import (
    build_server_config,
    file_value,
    readme_with_settings,
    setting_value,
)
from server.config_schema import DERIVED, NESTED, SETTINGS, TARGETS, describe, field_default
from server.devices.plane import DevicePlaneConfig
from server.transport.server import DeviceServerConfig

README = Path(__file__).resolve().parent.parent / "README.md"
ROOTS = (ServerConfig, DevicePlaneConfig, DeviceServerConfig)


def _reachable() -> dict[type, list[dataclasses.Field[object]]]:
    """Every dataclass reachable from the roots through dataclass-typed fields."""
    found: dict[type, list[dataclasses.Field[object]]] = {}
    todo = list(ROOTS)
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found[cls] = list(dataclasses.fields(cls))
        hints = typing.get_type_hints(cls)
        for item in found[cls]:
            hint = hints[item.name]
            for candidate in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
                    todo.append(candidate)
    return found


def test_every_field_of_every_reachable_dataclass_is_a_setting_or_derived() -> None:
    reachable = _reachable()
    assert set(TARGETS.values()) <= set(reachable)  # no target outside the tree
    settable = {(TARGETS[s.target], s.field) for s in SETTINGS}
    missing = [
        f"{cls.__name__}.{item.name}"
        for cls, items in reachable.items()
        for item in items
        if (cls, item.name) not in settable | set(NESTED) | set(DERIVED)
    ]
    assert not missing, f"fields with no setting in server/config_schema.py: {missing}"
    stale = [f"{cls.__name__}.{name}" for cls, name in (*settable, *NESTED, *DERIVED)
             if name not in {item.name for item in reachable.get(cls, [])}]
    assert not stale, f"settings naming no field: {stale}"
    assert not (settable & set(DERIVED)), "a field is both a setting and derived"


def test_settings_are_unique_and_described() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    targets = [(s.target, s.field) for s in SETTINGS]
    assert len(targets) == len(set(targets)), "two keys set one field"
    undocumented = [s.name for s in SETTINGS if len(describe(s)) < 10]
    assert not undocumented


def test_the_readme_lists_every_setting_with_its_default() -> None:
    readme = README.read_text()
    assert readme_with_settings(readme) == readme, (
        "the README's settings list is out of date: run python -m server.config_file --readme"
    )
    for setting in SETTINGS:
        assert f"- `{setting.key}` = " in readme


def test_documented_defaults_are_what_an_empty_configuration_runs() -> None:
    config = build_server_config({"server": {"data_dir": "d"}})
    for setting in SETTINGS:
        if setting.name in ("server.data_dir", "server.workers"):
            continue  # required; resolved from the CPU count
        documented = file_value(setting, field_default(setting))
        assert setting_value(config, setting) == documented, setting.name


def test_each_dedicated_option_sets_the_setting_the_readme_names() -> None:
    parameters = set(typing.get_type_hints(server)) - {"return"}
    assert set(OPTION_SETTINGS) <= parameters
    by_name = {s.name: s for s in SETTINGS}
    for parameter, name in OPTION_SETTINGS.items():
        flag = by_name[name].flag
        assert flag is not None and flag.startswith("--" + parameter.replace("_", "-")), (
            parameter, flag)
    dedicated = {s.name for s in SETTINGS if s.flag and not s.flag.startswith("--device-limit")}
    assert dedicated == set(OPTION_SETTINGS.values())
