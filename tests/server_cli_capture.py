"""``ota server`` with its serving replaced by recording the configuration it built: for
tests that check an option or a settings-file entry reaches the server's config."""

from __future__ import annotations

import pytest

from server.app import ServerConfig
from server.cli import server_cmd


def capture_server_configs(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """Make ``ota server`` append its configuration to the returned list instead of serving."""
    captured: list[ServerConfig] = []

    async def run_server(config: ServerConfig) -> None:
        captured.append(config)

    monkeypatch.setattr(server_cmd, "_run_server", run_server)
    return captured
