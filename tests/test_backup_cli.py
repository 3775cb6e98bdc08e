"""The backup commands as an operator runs them (``ota admin backup``, ``verify-backup``,
``restore``) and the data directory's lock as a real ``ota server`` holds it: a second
server and a restore refuse its directory while it runs, and both work once it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from server.cli.main import app
from tests.ota_server_process import REPO, start_ota_server

runner = CliRunner()


def test_a_second_server_and_a_restore_refuse_a_running_servers_directory(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    made = runner.invoke(app, ["product", "create", "Sensors", "--platform-id", "13",
                               "--data", str(data)])
    assert made.exit_code == 0, made.output
    server = start_ota_server(data, tmp_path / "server.log")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "server.cli.main", "server", "--data", str(data),
             "--api-port", "0", "--device-port", "-1"],
            cwd=REPO, capture_output=True, timeout=120, check=False)
        assert second.returncode == 1, second.stderr.decode()
        assert b"in use by another process" in second.stderr
        assert f"pid {server.proc.pid}".encode() in second.stderr
        backup = tmp_path / "backup"
        taken = runner.invoke(app, ["admin", "backup", str(backup), "--data", str(data),
                                    "--json"])
        assert taken.exit_code == 0, taken.output
        assert json.loads(taken.output)["schema_version"] is not None
        checked = runner.invoke(app, ["admin", "verify-backup", str(backup)])
        assert checked.exit_code == 0 and "is whole" in checked.output, checked.output
        refused = runner.invoke(app, ["admin", "restore", str(backup), "--data", str(data),
                                      "--force"])
        assert refused.exit_code == 1 and "in use" in refused.output, refused.output
    finally:
        assert server.stop() == 0, server.tail()
    restored = runner.invoke(app, ["admin", "restore", str(backup), "--data", str(data),
                                   "--force"])
    assert restored.exit_code == 0 and "replaced the installation" in restored.output
    server = start_ota_server(data, tmp_path / "again.log")  # the lock was released
    assert server.stop() == 0, server.tail()


def test_backup_of_a_postgresql_installation_names_pg_dump(tmp_path: Path) -> None:
    result = runner.invoke(app, ["admin", "backup", str(tmp_path / "b"), "--data",
                                 str(tmp_path / "d")],
                           env={"OTA_DB_URL": "postgresql+psycopg://ota@db.example/ota"})
    assert result.exit_code == 1
    assert "pg_dump" in result.output and "Traceback" not in result.output


def test_restore_of_a_damaged_backup_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    result = runner.invoke(app, ["admin", "restore", str(tmp_path / "b"), "--data",
                                 str(tmp_path / "d")])
    assert result.exit_code == 1 and "holds no manifest.json" in result.output
    assert not (tmp_path / "d").exists()
