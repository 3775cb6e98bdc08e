"""``ota server --config FILE``, ``--set`` and ``--print-config`` (issue 14, item 9): a file's
settings reach the running server's objects, in the main process and in its workers; options
given on the command line beat the file; wrong files stop with a message naming the setting
(exit 2, no traceback); the printed configuration reads back to the same configuration."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from typer.testing import CliRunner, Result

from otacore.transfer import RetransmitPolicy
from server.app import ServerConfig, ServerHandle, serve, worker_settings, worker_specs
from server.cli import server_cmd
from server.config_file import ConfigError, load_server_config, read_config_file
from server.workers import WorkerSettings, WorkerSpec
from tests.server_cli_capture import capture_server_configs

SETTINGS_FILE = """
[server]
data_dir = "{data}"
workers = 1
store_threads = 3
worker_stop_grace = 9

[api]
host = "127.0.0.1"
port = 0
keep_alive_timeout = 30
max_json_bytes = 2048

[sign_in]
password_hash_threads = 3
max_failures_per_address = 7

[devices]
port = 0
request_timeout = 12.5
shutdown_hold_off = 7
dtls_queue_size = 20
udp_buffer_bytes = 0
save_dtls_sessions = false
saved_session_max_age = 120
server_dns_names = ["ota.example.com", "localhost"]

[sessions]
idle_timeout = 300
max_sessions = 5000
handshake_timeout = 12
max_pending_per_address = 900
cipher_idle_timeout = 2.5
heap_trim_interval = 0

[delivery]
max_concurrent_transfers = 100
downgrades = "device"

[transfer]
window_limit = 32
attempts = 5
congestion_control = false
initial_rto = 2
max_rounds = 6

[relay]
poll_interval = 0.03
batch = 500

[logging]
level = "warning"
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(server_cmd.app, ["server", *args])


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_a_file_reaches_the_running_server(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the real server through ``ota server --config`` and look at its parts."""
    config_path = _write(tmp_path / "ota.toml", SETTINGS_FILE.format(data=tmp_path / "data"))
    seen: dict[str, Any] = {}

    async def serve_and_inspect(config: ServerConfig) -> None:
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(serve, config)
            plane, listener = handle.devices, handle.device_server
            assert plane is not None and listener is not None and plane.ota is not None
            seen.update(
                limits=listener.host.limits,
                tuning=plane.config.tuning,
                listener=listener.config,
                ota=plane.ota.config,
                transfer_slots=plane.ota.limiter.total_tokens,
                hash_threads=handle.fleet.hash_limiter.total_tokens,
                store_threads=config.store_threads,
            )
            token = handle.fleet.create_api_token_sync("owner").access_token
            async with httpx.AsyncClient(base_url=handle.api_url) as client:
                response = await client.post(
                    "/v1/products", json={"name": "x", "platform_id": 6,
                                          "description": "y" * 4096},
                    headers={"Authorization": f"Bearer {token}"})
                seen["big_json"] = response.status_code
            handle.shutdown.set()

    monkeypatch.setattr(server_cmd, "_run_server", serve_and_inspect)
    result = _invoke(["--config", str(config_path)])
    assert result.exit_code == 0, result.output
    limits = seen["limits"]
    assert (limits.idle_timeout, limits.max_sessions, limits.handshake_timeout,
            limits.max_pending_per_address) == (300, 5000, 12, 900)
    assert (limits.cipher_idle_timeout, limits.heap_trim_interval) == (2.5, 0)
    assert limits.hello_timeout == 5.0 and limits.idle_sweep_interval == 1.0  # defaults
    tuning = seen["tuning"]
    assert (tuning.request_timeout, tuning.shutdown_hold_off) == (12.5, 7)
    listener = seen["listener"]
    assert (listener.dtls_queue_size, listener.udp_buffer_bytes) == (20, None)
    assert (listener.save_dtls_sessions, listener.saved_session_max_age) == (False, 120)
    assert listener.server_dns_names == ("ota.example.com", "localhost")
    ota = seen["ota"]
    assert (ota.window_limit, ota.transfer_attempts, ota.downgrades.value) == (32, 5, "device")
    assert ota.transfer_policy == RetransmitPolicy(congestion_control=False, initial_rto=2.0,
                                                   max_rounds=6)
    assert seen["transfer_slots"] == 100
    assert seen["hash_threads"] == 3 and seen["store_threads"] == 3
    assert seen["big_json"] == 413  # api.max_json_bytes = 2048


def test_options_given_beat_the_file_and_defaults_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the relative data directory (and its lock) goes there
    captured = capture_server_configs(monkeypatch)
    config_path = _write(tmp_path / "ota.toml", """
        [server]
        data_dir = "from-file"
        [api]
        port = 9000
        [sessions]
        idle_timeout = 300
        max_sessions = 4000
        [transfer]
        congestion_control = false
        window_limit = 16
        [logging]
        level = "debug"
    """)
    result = _invoke(["--config", str(config_path), "--data", "from-cli",
                      "--idle-timeout", "200", "--device-limit", "max_sessions=3000",
                      "--congestion-control", "--set", "transfer.initial_cwnd=4",
                      "--log-level", "info"])
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert config.data_dir == Path("from-cli")
    assert config.api_port == 9000  # --api-port was not given: its default does not win
    assert config.device_limits.idle_timeout == 200
    assert config.device_limits.max_sessions == 3000
    assert config.ota.transfer_policy.congestion_control is True
    assert config.ota.transfer_policy.initial_cwnd == 4
    assert config.ota.window_limit == 16
    assert config.log_level == "info"


def test_the_same_setting_twice_on_the_command_line_is_refused(tmp_path: Path) -> None:
    result = _invoke(["--data", str(tmp_path), "--idle-timeout", "200",
                      "--set", "sessions.idle_timeout=100"])
    assert result.exit_code == 2
    assert "--set sessions.idle_timeout and --idle-timeout both set sessions.idle_timeout" in (
        _flat(result.output))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sesions]\nidle_timeout = 3\n",
         "unknown section [sesions] (did you mean 'sessions'?)"),
        ("[sessions]\nidle_timout = 3\n",
         "unknown setting 'idle_timout' in [sessions] (did you mean 'idle_timeout'?)"),
        ("[api]\nidle_timeout = 3\n",
         "unknown setting 'idle_timeout' in [api] (it belongs in [sessions])"),
        ("idle_timeout = 3\n", "'idle_timeout' is not in a section; it belongs in [sessions]"),
        ("host = \"::\"\n", "'host' is not in a section; it belongs in [api] or [devices]"),
        ("idle_timout = 3\n", "'idle_timout' is not in a section (did you mean "
                               "'sessions.idle_timeout'?)"),
        ("[server]\nstore_threads = 100000\n", "server.store_threads must be at most 1024"),
        ("[sessions]\nidle_timeout = \"long\"\n",
         "sessions.idle_timeout must be a number, not 'long'"),
        ("[sessions]\nmax_sessions = 1.5\n", "sessions.max_sessions must be an integer"),
        ("[transfer]\ncongestion_control = 1\n",
         "transfer.congestion_control must be true or false, not 1"),
        ("[devices]\nserver_dns_names = \"a\"\n",
         "devices.server_dns_names must be a list of strings"),
        ("[sessions]\nidle_timeout = nan\n", "sessions.idle_timeout must be a finite number"),
        ("sessions = 3\n", "sessions must be a section ([sessions]), not 3"),
        ("[sessions]\nmax_pending_per_address = 0\n",
         "sessions.max_pending_per_address must be at least 1"),
        ("[sessions]\nipv6_prefix_length = 40\n",
         "sessions.ipv6_network_prefix_length must be between 1 and "
         "sessions.ipv6_prefix_length (40)"),
        ("[transfer]\nmin_rto = 5\nmax_rto = 1\n",
         "transfer.min_rto (5.0) must not exceed transfer.max_rto (1.0)"),
        ("[transfer]\nwindow_limit = 5000\n", "transfer.window_limit must be 1 to 1024 chunks"),
        ("[transfer]\nudp_chunk_size = 1001\n", "transfer.udp_chunk_size must be a multiple of 4"),
        ("[transfer]\nattempts = 0\n", "transfer.attempts must be at least 1"),
        ("[delivery]\ndowngrades = \"sometimes\"\n", "unknown downgrade policy 'sometimes'"),
        ("[sign_in]\nmax_failures_per_user = 0\n",
         "sign_in.max_failures_per_user must be at least 1"),
        ("[devices]\nserver_ip_addresses = [\"localhost\"]\n",
         "devices.server_ip_addresses: 'localhost' is not an IP address"),
        ("[api]\nport = 70000\n", "API port 70000 is not between 0 and 65535"),
        ("[logging]\nlevel = \"loud\"\n", "log level 'loud' is not one of"),
        ("[sessions\n", "is not valid TOML"),
    ],
)
def test_a_wrong_file_stops_with_a_message(tmp_path: Path, text: str, message: str) -> None:
    config_path = tmp_path / "ota.toml"
    config_path.write_text(text)
    result = _invoke(["--data", str(tmp_path), "--config", str(config_path)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    assert "Traceback" not in result.output
    assert message in _flat(result.output), result.output
    assert result.output.startswith("error: ")


def test_an_unreadable_file_stops_with_a_message(tmp_path: Path) -> None:
    missing = _invoke(["--data", str(tmp_path), "--config", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2
    assert "cannot read the configuration file" in missing.output
    assert "No such file or directory" in missing.output
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[api]\nhost = \"\xff\"\n")
    result = _invoke(["--data", str(tmp_path), "--config", str(binary)])
    assert result.exit_code == 2 and "is not UTF-8 text" in result.output


def test_no_data_directory_is_a_usage_error() -> None:
    result = _invoke([])
    assert result.exit_code == 2
    assert "no data directory: give --data DIR, or data_dir in the [server] section" in (
        _flat(result.output))


def test_wrong_options_name_the_setting(tmp_path: Path) -> None:
    for args, message in [
        (["--set", "sessions.idle_timeout"], "is not SECTION.KEY=VALUE"),
        (["--set", "session.idle_timeout=3"], "unknown section 'session' (did you mean "
                                              "'sessions'?)"),
        (["--set", "transfer.initial_rtoo=3"], "unknown setting 'initial_rtoo' in [transfer] "
                                              "(did you mean 'initial_rto'?)"),
        (["--set", "transfer.initial_rto=soon"], "transfer.initial_rto must be a number, not "
                                                 "'soon'"),
        (["--device-limit", "idle_timout=3"], "unknown device limit 'idle_timout' (did you "
                                              "mean 'idle_timeout'?)"),
        (["--window-limit", "0"], "transfer.window_limit must be 1 to 1024 chunks, not 0"),
        (["--idle-timeout", "-1"], "session limit sessions.idle_timeout must be positive"),
    ]:
        result = _invoke(["--data", str(tmp_path), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in _flat(result.output), (args, result.output)


def test_print_config_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What --print-config prints, read back with --config, is the same configuration and
    prints the same text."""
    captured = capture_server_configs(monkeypatch)
    config_path = _write(tmp_path / "ota.toml", SETTINGS_FILE.format(data=tmp_path / "data"))
    options = ["--config", str(config_path), "--idle-timeout", "250", "--db-url",
               f"sqlite:///{tmp_path}/other.db", "--device-host", "::1",
               "--set", "devices.server_ip_addresses=[\"10.0.0.1\"]"]
    printed = _invoke([*options, "--print-config"])
    assert printed.exit_code == 0, printed.output
    assert "idle_timeout = 250.0" in printed.output
    assert 'host = "::1"' in printed.output
    assert _invoke(options).exit_code == 0
    again_path = tmp_path / "printed.toml"
    again_path.write_text(printed.output)
    assert _invoke(["--config", str(again_path)]).exit_code == 0
    original, reread = captured
    assert reread == original
    reprinted = _invoke(["--config", str(again_path), "--print-config"])
    assert reprinted.output == printed.output


def test_print_config_hides_the_database_password(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--print-config's output lands in terminals, logs and tickets: a database password is
    masked, and a file with the masked password is refused with what to do, instead of
    connecting with "***" (regression: it printed the password)."""
    captured = capture_server_configs(monkeypatch)
    url = "postgresql+psycopg://ota:s3cret-pw@db.example:5432/ota"
    printed = _invoke(["--data", str(tmp_path), "--db-url", url, "--print-config"])
    assert printed.exit_code == 0, printed.output
    assert "s3cret-pw" not in printed.output
    assert 'db_url = "postgresql+psycopg://ota:***@db.example:5432/ota"' in printed.output
    path = tmp_path / "printed.toml"
    path.write_text(printed.output)
    refused = _invoke(["--config", str(path)])
    assert refused.exit_code == 2
    assert "password --print-config hid" in _flat(refused.output)
    # The real URL given on the command line overrides the file's masked one.
    assert _invoke(["--config", str(path), "--db-url", url]).exit_code == 0
    assert captured[-1].db_url == url
    # A URL without a password is printed as given.
    plain = _invoke(["--data", str(tmp_path), "--db-url", f"sqlite:///{tmp_path}/x.db",
                     "--print-config"])
    assert f'db_url = "sqlite:///{tmp_path}/x.db"' in plain.output


def test_print_config_without_a_data_directory_prints_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new installation starts from ``ota server --print-config > ota.toml``: every
    setting at its default, the data directory to fill in."""
    captured = capture_server_configs(monkeypatch)
    printed = _invoke(["--print-config"])
    assert printed.exit_code == 0, printed.output
    assert '# data_dir = "/var/lib/ota"  (required: set it, or give --data)' in printed.output
    assert "# db_url is unset" in printed.output
    path = tmp_path / "ota.toml"
    path.write_text(printed.output)
    assert _invoke(["--config", str(path), "--data", str(tmp_path)]).exit_code == 0
    assert _invoke(["--data", str(tmp_path)]).exit_code == 0
    from_file, from_defaults = captured
    assert from_file == from_defaults


def _load(tmp_path: Path, text: str) -> ServerConfig:
    return load_server_config(_write(tmp_path / "ota.toml", text), {})


def test_workers_get_the_main_processworker_settings(tmp_path: Path) -> None:
    """What a worker rebuilds from its spec line is what the main process runs."""
    config = _load(tmp_path, SETTINGS_FILE.format(data=tmp_path) + "\n")
    config = ServerConfig(**{**config.__dict__, "workers": 3})

    class Bound:
        tcp_address = ("127.0.0.1", 1)
        udp_address = ("127.0.0.1", 2)

    specs = worker_specs(config, Bound())  # type: ignore[arg-type]
    assert len(specs) == 2
    for spec in specs:
        settings = WorkerSettings.from_spec(WorkerSpec.from_json(spec.to_json()))
        assert settings == WorkerSettings(config.device_limits, config.ota,
                                          config.device_tuning, config.relay, config.collector)
        assert spec.log_level == "warning"


async def _wait_for(condition: Callable[[], bool]) -> None:
    with trio.fail_after(60):
        while not condition():
            await trio.sleep(0.05)


async def test_worker_processes_run_the_filesworker_settings(tmp_path: Path) -> None:
    """Real worker processes report the digest of the settings they built; it is the main
    process's."""
    config = _load(tmp_path, SETTINGS_FILE.format(data=tmp_path / "data").replace(
        "workers = 1", "workers = 2"))
    expected = worker_settings(config).digest()
    assert expected != worker_settings(ServerConfig(data_dir=tmp_path)).digest()
    async with trio.open_nursery() as nursery:
        handle: ServerHandle = await nursery.start(serve, config)
        assert handle.workers is not None and handle.relay is not None
        assert handle.workers.stop_grace == 9
        assert (handle.relay.settings.poll_interval, handle.relay.settings.batch) == (0.03, 500)
        (worker,) = handle.workers.workers
        await _wait_for(lambda: worker.settings is not None)
        assert worker.settings == expected == handle.workers.expected_settings
        handle.shutdown.set()


def test_read_config_file_returns_the_checked_layer(tmp_path: Path) -> None:
    layer = read_config_file(_write(tmp_path / "a.toml", """
        [transfer]
        initial_rto = 2
        [devices]
        server_dns_names = ["a.example"]
    """))
    assert layer == {"transfer": {"initial_rto": 2.0}, "devices": {"server_dns_names":
                                                                   ("a.example",)}}
    assert isinstance(layer["transfer"]["initial_rto"], float)
    with pytest.raises(ConfigError, match="unknown section"):
        read_config_file(_write(tmp_path / "b.toml", "[nope]\n"))
