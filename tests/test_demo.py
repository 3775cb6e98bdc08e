"""The README's main job runs end to end: server, emulated fleet, safe release flow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_rolls_out_v2_to_the_whole_fleet(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli.main", "demo", "--data", str(tmp_path / "demo"),
         "--devices", "6", "--api-port", "0", "--device-port", "0", "--exit-when-done"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "COLUMNS": "80"},  # what rich assumes when stdout is no terminal
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all 6 devices run v2" in result.stdout
    assert "'failed': 0" in result.stdout and "'updating': 0" in result.stdout
    # The line to paste is one line, however narrow the output.
    explore = r"(?m)^explore: export OTA_API_URL=http://\S+ OTA_TOKEN=[0-9a-f]{40} OTA_PRODUCT=\d+$"
    assert re.search(explore, result.stdout), result.stdout[-3000:]
