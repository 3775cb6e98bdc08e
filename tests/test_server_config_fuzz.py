"""Random configuration files (issue 14, item 9): whatever TOML an operator writes, the loader
either builds a configuration or raises ConfigError with a message; it never crashes with
another exception. Hypothesis prints the failing file and its seed (``print_blob``)."""

from __future__ import annotations

import datetime as dt
import string
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import ServerConfig
from server.config_file import (
    ConfigError,
    build_server_config,
    check_layer,
    merge,
    parse_assignment,
    read_config_file,
    render_toml,
    value_type,
)
from server.config_schema import BY_SECTION, SECTIONS, SETTINGS, Setting

names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-3, max_value=70_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1, max_value=1e6),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["targeted", "device", "never", "debug", "info", "127.0.0.1", "::1",
                     "localhost", "sqlite:///x.db"]),
    st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    st.dates(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def sections(draw: st.DrawFn) -> dict[str, Any]:
    """A section's table: mostly real keys (with any value), sometimes made-up ones."""
    section = draw(st.sampled_from(SECTIONS))
    keys = list(BY_SECTION[section])
    table = draw(st.dictionaries(st.sampled_from(keys) | names, values, max_size=6))
    return {section: table}


def _typed_value(setting: Setting) -> st.SearchStrategy[Any]:
    """Values of the setting's type, often in range, sometimes not."""
    kind = value_type(setting)
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(min_value=-1, max_value=70_000)
    if kind is float:
        return st.floats(min_value=0, max_value=1e6) | st.integers(0, 100)
    if kind is str:
        return st.sampled_from(["targeted", "device", "never", "debug", "WARNING", "::1",
                                "127.0.0.1", "sqlite:///x.db", ""])
    return st.lists(st.sampled_from(["localhost", "10.0.0.1", "::1", "a b", ""]), max_size=3)


@st.composite
def typed_sections(draw: st.DrawFn) -> dict[str, Any]:
    """A section whose keys are real and whose values have the right type."""
    section = draw(st.sampled_from(SECTIONS))
    chosen = draw(st.lists(st.sampled_from(list(BY_SECTION[section].values())), max_size=4,
                           unique_by=lambda s: s.key))
    return {section: {s.key: draw(_typed_value(s)) for s in chosen}}


documents = st.one_of(
    st.lists(sections(), max_size=4).map(lambda parts: merge(*parts)),
    st.lists(typed_sections(), max_size=4).map(lambda parts: merge(*parts)),
    st.dictionaries(names | st.sampled_from(SECTIONS), values, max_size=4),
)


def _load(document: dict[str, Any]) -> ServerConfig | None:
    """Check and build ``document``; None when the loader refused it with ConfigError."""
    try:
        layer = check_layer(document, "fuzz")
        return build_server_config(merge({"server": {"data_dir": "d"}}, layer))
    except ConfigError as exc:
        assert str(exc), "a ConfigError without a message"
        return None


@settings(max_examples=400, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_documents_build_or_raise_config_error(document: dict[str, Any]) -> None:
    config = _load(document)
    if config is not None:  # what loaded prints and reads back the same
        import tomllib

        printed = render_toml(config, show_secrets=True)
        assert build_server_config(check_layer(tomllib.loads(printed), "printed")) == config


@settings(max_examples=150, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_random_files_read_or_raise_config_error(tmp_path: Path,
                                                 document: dict[str, Any]) -> None:
    path = tmp_path / "ota.toml"
    path.write_text(tomli_w.dumps(document))
    try:
        layer = read_config_file(path)
        build_server_config(merge({"server": {"data_dir": "d"}}, layer))
    except ConfigError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None, print_blob=True)
@given(st.sampled_from([s.name for s in SETTINGS]) | names, st.text(max_size=30))
def test_random_assignments_parse_or_raise_config_error(name: str, text: str) -> None:
    try:
        parse_assignment(f"{name}={text}", "--set")
    except ConfigError as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None, print_blob=True)
@given(st.binary(max_size=200))
def test_random_bytes_read_or_raise_config_error(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ota.toml"
        path.write_bytes(data)
        try:
            read_config_file(path)
        except ConfigError as exc:
            assert str(exc)
