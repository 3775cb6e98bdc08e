"""The server processes' garbage-collector settings (server.gc_tuning): validated, reachable
from the configuration, and in force in the real main and worker processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from otacore.errors import ValidationError
from server.config_file import ConfigError, load_server_config
from server.gc_tuning import CollectorSettings


@pytest.mark.parametrize(
    "fields",
    [{"young_threshold": 0}, {"middle_threshold": 0}, {"old_threshold": -1}],
)
def test_a_threshold_that_would_stop_the_collector_is_refused(fields: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match="at least 1"):
        CollectorSettings(**fields)


def test_the_configuration_file_sets_the_collector(tmp_path: Path) -> None:
    config_file = tmp_path / "ota.toml"
    config_file.write_text("[garbage_collector]\nyoung_threshold = 1234\nfreeze_at_start = false\n")
    config = load_server_config(config_file, {"server": {"data_dir": str(tmp_path)}})
    assert config.collector == CollectorSettings(young_threshold=1234, freeze_at_start=False)
    config_file.write_text("[garbage_collector]\nyoung_threshold = 0\n")
    with pytest.raises(ConfigError, match="young_threshold"):
        load_server_config(config_file, {"server": {"data_dir": str(tmp_path)}})


async def test_the_main_and_worker_processes_run_with_the_settings(tmp_path: Path) -> None:
    """A real ``ota server`` with a worker: each process logs its collector state as read
    back from ``gc`` once it serves."""
    ota = Path(sys.executable).with_name("ota")
    command = [
        str(ota), "server", "--data", str(tmp_path / "data"), "--api-port", "0",
        "--device-port", "0", "--workers", "2",
        "--set", "garbage_collector.young_threshold=12345",
        "--set", "garbage_collector.middle_threshold=7",
    ]
    lines: list[str] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                lambda task_status: trio.run_process(
                    command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, check=False,
                    task_status=task_status,
                )
            )
            assert process.stderr is not None
            buffered = b""
            while sum("garbage collector thresholds" in line for line in lines) < 2:
                chunk = await process.stderr.receive_some()
                assert chunk, f"ota server exited early:\n{''.join(lines)}"
                buffered += chunk
                *complete, buffered = buffered.split(b"\n")
                lines += [line.decode() + "\n" for line in complete]
            process.terminate()
    states = [line for line in lines if "garbage collector thresholds" in line]
    print("".join(states))
    assert len(states) == 2
    assert any("worker" in line for line in states)
    for line in states:
        found = re.search(r"thresholds (\d+)/(\d+)/(\d+), (\d+) start-up objects frozen", line)
        assert found, line
        assert found.group(1, 2, 3) == ("12345", "7", "10")
        assert int(found.group(4)) > 0  # freeze_at_start is on by default
