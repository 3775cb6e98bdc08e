"""A real ``ota server`` in its own process (the console script's code, ``python -m
server.cli.main server``), for tests that need what only the command does: reading
``OTA_DB_URL``, holding the data directory's lock, being stopped by a signal."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class ServerProcess:
    """A started ``ota server``: its process, API URL and device addresses."""

    proc: subprocess.Popen[bytes]
    api_url: str
    tls: tuple[str, int]
    dtls: tuple[str, int]
    log: Path

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful stop) and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"ota server did not stop on SIGTERM; log: {self.tail()}") \
                from None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def start_ota_server(data: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                     timeout: float = 90) -> ServerProcess:
    """Start ``ota server --data DATA --api-port 0 --device-port 0 ARGS`` and wait until it
    printed its API URL and both device listeners (the lines ``_run_server`` prints)."""
    command = [sys.executable, "-m", "server.cli.main", "server", "--data", str(data),
               "--api-port", "0", "--device-port", "0", "--workers", "1", *args]
    with log.open("ab") as err:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                env=env if env is not None else dict(os.environ))
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buffered = b""
    found: dict[str, str] = {}
    try:
        while not {"api", "TLS", "DTLS"} <= found.keys():
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                proc.kill()
                raise AssertionError(f"ota server did not start; log: {log.read_text()[-3000:]}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait()
                raise AssertionError(f"ota server exited ({proc.returncode}); log: "
                                     f"{log.read_text()[-3000:]}")
            buffered += chunk
            *lines, rest = buffered.split(b"\n")
            buffered = rest
            for raw in lines:
                line = raw.decode(errors="replace")
                if "API listening on " in line:
                    found["api"] = line.split("listening on ", 1)[1].split()[0]
                for name in ("TLS", "DTLS"):
                    if f"devices on {name} " in line:
                        found[name] = line.split(f"devices on {name} ", 1)[1].split()[0]
    finally:
        selector.close()
    return ServerProcess(proc, found["api"], _address(found["TLS"]), _address(found["DTLS"]),
                         log)


def free_device_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 right now: a server binds both device
    transports on it (``device_port``; the emulator gives both one ``--server`` address).
    A free UDP port alone may be some other socket's TCP port, and that server then fails."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1")
