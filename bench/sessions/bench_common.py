"""Shared by the session benchmarks: a cached fleet of provisioned devices and the server
process (bench_server.py) driven over its stdin/stdout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from server.identity import DEVICE_CERT_FILE, init_pki, pki_dir, provision_devices
from server.transport.client import DeviceCredentials

DEFAULT_WORKDIR = Path("/tmp/otacloud-bench-sessions")
T = TypeVar("T")


def fleet(workdir: Path, count: int) -> tuple[Path, list[DeviceCredentials], Path]:
    """``count`` provisioned devices under ``workdir`` (created once, then reused).

    Returns the PKI directory, the devices' credentials and a file listing their ids.
    """
    ca_dir = pki_dir(workdir / "data")
    out = workdir / "devices"
    listing = workdir / "device-ids.txt"
    known = listing.read_text().split() if listing.exists() else []
    if len(known) < count:
        init_pki(ca_dir)
        added = provision_devices(ca_dir, count - len(known), out)
        known += [device.device_id for device in added]
        listing.write_text("\n".join(known) + "\n")
    ca_path = out / "ca.pem"
    credentials = [
        DeviceCredentials(out / device_id / "cert.pem", out / device_id / "key.pem", ca_path)
        for device_id in known[:count]
    ]
    return ca_dir, credentials, listing


class ServerProcess:
    """bench_server.py in a child process."""

    def __init__(
        self,
        ca_dir: Path,
        device_list: Path,
        *,
        handler: str = "echo",
        tracemalloc: bool = False,
        cpu: int | None = None,
        bare: bool = False,
    ) -> None:
        command = [
            sys.executable,
            str(Path(__file__).with_name("bench_server.py")),
            *("--pki", str(ca_dir), "--devices", str(device_list), "--handler", handler),
        ]
        if tracemalloc:
            command.append("--tracemalloc")
        if cpu is not None:
            command += ["--cpu", str(cpu)]
        if bare:
            command.append("--bare")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        hello = self._read()
        self.tcp_port: int = hello["tcp"]
        self.udp_port: int = hello["udp"]
        self.pid: int = hello["pid"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the bench server exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, command: str) -> dict[str, Any]:
        """Send one command (rss, heap, py, cpu, stats) and return its JSON answer."""
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Ask the server to shut down gracefully; kill it if it does not."""
        try:
            self.ask("quit")
            self.process.wait(timeout=30)
        except (RuntimeError, BrokenPipeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of process ``pid`` (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def open_all(
    devices: list[DeviceCredentials],
    opener: Callable[[DeviceCredentials], Awaitable[T]],
    parallel: int,
) -> list[T]:
    """``opener(device)`` for every device, at most ``parallel`` at once; what each returned."""
    opened: list[T] = []
    limiter = trio.CapacityLimiter(parallel)

    async def one(device: DeviceCredentials) -> None:
        async with limiter:
            opened.append(await opener(device))

    async with trio.open_nursery() as nursery:
        for device in devices:
            nursery.start_soon(one, device)
    return opened


async def paced(
    targets: list[T], count: int, rate: float, parallel: int,
    call: Callable[[T], Awaitable[object]],
) -> float:
    """``count`` calls of ``call`` spread round-robin over ``targets`` at about ``rate`` per
    second (keep-alives arrive spread out, not in one burst), at most ``parallel`` in
    flight; returns the seconds it took."""
    started = time.perf_counter()
    in_flight = trio.CapacityLimiter(parallel)

    async def one(target: T) -> None:
        async with in_flight:
            await call(target)

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(one, targets[n % len(targets)])
            delay = started + (n + 1) / rate - time.perf_counter()
            if delay > 0:
                await trio.sleep(delay)
    return time.perf_counter() - started


#: The installed ``ota`` command beside this interpreter.
OTA = [str(Path(sys.executable).with_name("ota"))]


def run_ota(*args: str) -> str:
    """Run ``ota ARGS``; its standard output (CalledProcessError if it fails)."""
    return subprocess.run([*OTA, *args], check=True, capture_output=True, text=True).stdout


def provision_product(workdir: Path, count: int) -> tuple[Path, Path, list[str]]:
    """A data directory with one product and at least ``count`` provisioned devices, made
    once through the ``ota`` CLI (a real server's store): (data dir, credentials dir, the
    first ``count`` device ids)."""
    data, creds = workdir / "data", workdir / "creds"
    marker = workdir / "count"
    if not marker.exists() or int(marker.read_text()) < count:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        product = json.loads(run_ota("product", "create", "bench", "--platform-id", "13",
                                     "--data", str(data), "--json"))
        run_ota("device", "provision", "--data", str(data), "--product", str(product["id"]),
                "--count", str(count), "--out", str(creds))
        marker.write_text(str(count))
    ids = sorted(p.name for p in creds.iterdir() if (p / DEVICE_CERT_FILE).exists())[:count]
    return data, creds, ids
