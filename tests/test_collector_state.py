"""tests/collector_state.py: a test that tunes the process's garbage collector as
``ota server`` does (server.gc_tuning) leaves it as it found it, so the tests after it in
the same pytest worker run with the collector they expect."""

from __future__ import annotations

import gc
import socket
from pathlib import Path

from typer.testing import CliRunner

from server.cli.server_cmd import app
from server.gc_tuning import CollectorSettings
from tests.collector_state import collector_kept, collector_off


def _state() -> tuple[tuple[int, ...], bool, int]:
    return gc.get_threshold(), gc.isenabled(), gc.get_freeze_count()


def test_a_server_tuning_inside_the_block_is_undone() -> None:
    before = _state()
    assert before[2] == 0, "nothing is frozen in a test process"
    server = CollectorSettings()
    with collector_kept():
        server.apply_thresholds()
        server.started()  # gc.freeze()
        gc.disable()
        assert gc.get_threshold() == (50_000, 10, 10) and gc.get_freeze_count() > 0
    assert _state() == before


def test_collector_off_switches_it_off_for_the_block_only() -> None:
    before = _state()
    with collector_off():
        assert not gc.isenabled()
    assert _state() == before


def test_ota_server_run_in_process_changes_the_collector(
        tmp_path: Path) -> None:
    """Why the autouse fixture exists: the ``ota server`` command tunes the collector of
    the process it runs in (here it then fails on a busy port, as tests/test_api_cli.py's
    test does); the block undoes it."""
    before = _state()
    with collector_kept():
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = CliRunner().invoke(app, ["server", "--data", str(tmp_path),
                                              "--api-port", str(port)])
        assert result.exit_code == 1 and "Address already in use" in result.output
        assert gc.get_threshold() == (CollectorSettings().young_threshold, 10, 10)
    assert _state() == before
