"""``ota server --log-level``: what an operator must see reaches stderr, time-stamped, from a
real server process (a silent connection's refusal is a WARNING)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import trio

from server.cli.main import app
from tests.test_api_cli import runner

#: ``ota`` as a subprocess, from this interpreter.
OTA = [sys.executable, "-c", "from server.cli.main import main; main()"]


async def _read_until(stream: trio.abc.ReceiveStream, pattern: re.Pattern[bytes],
                      seen: bytearray) -> re.Match[bytes]:
    """Read ``stream`` into ``seen`` until ``pattern`` matches what was read."""
    while (found := pattern.search(seen)) is None:
        chunk = await stream.receive_some(4096)
        assert chunk, f"the server exited; it wrote: {bytes(seen).decode(errors='replace')}"
        seen += chunk
    return found


async def test_a_refused_silent_connection_is_a_time_stamped_warning(tmp_path: Path) -> None:
    command = [
        *OTA, "server", "--data", str(tmp_path / "data"), "--api-port", "0",
        "--device-port", "0", "--workers", "1", "--log-level", "info",
        "--device-limit", "hello_timeout=0.2",
    ]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            lambda **kw: trio.run_process(command, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, check=False, **kw)
        )
        try:
            with trio.fail_after(120):
                out, err = bytearray(), bytearray()
                tls = await _read_until(
                    process.stdout, re.compile(rb"devices on TLS ([\d.]+):(\d+)\n"), out)
                silent = await trio.open_tcp_stream(tls[1].decode(), int(tls[2]))
                # Nothing is sent: the server closes the connection after hello_timeout ...
                assert await silent.receive_some(1) == b""
                # ... and says so at WARNING, one line with a time stamp in front.
                line = await _read_until(
                    process.stderr, re.compile(rb"(?m)^(.*)WARNING (.*)no ClientHello in time.*$"),
                    err)
                assert re.match(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} $", line[1]), line[0]
                await silent.aclose()
        finally:
            process.terminate()


def test_an_unknown_log_level_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["server", "--data", str(tmp_path), "--log-level", "loud"])
    assert result.exit_code == 2
    words = " ".join(result.output.replace("│", " ").split())  # rich wraps the message
    assert "log level 'loud' is not one of: debug, info, warning, error" in words, words
