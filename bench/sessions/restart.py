"""Graceful restart with N online DTLS devices (issue 14 item 6 goal row): new handshakes
after the restart, and the time until every device is served again. Not a test.

    python bench/sessions/restart.py --devices 2000 [--parallel 64] [--workdir DIR]

1. A server process (this script with ``--serve``: the real ``DeviceServer``, an echo
   handler that can be suspended, a fixed UDP port) and N devices, each a real OpenSSL
   DTLS 1.2 client (``trio.DTLSEndpoint``, one socket per device) that handshakes and gets
   one echo.
2. The server is shut down gracefully (its sessions sealed to the data directory) and
   exits; a new server process starts on the same port (restoring them).
3. Every device sends one request on its old DTLS session at once (retrying every second,
   as a CoAP device retransmits, RFC 7252 4.2); the time until the last one is answered,
   and the new server's handshake counters, are reported as one JSON line.

Devices are provisioned once into ``--workdir`` (its own data directory: the saved-session
file lives in it, so no other benchmark's server takes it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sessions.bench_common import fleet
from server.authorization import MemoryDeviceDirectory
from server.identity import load_pki
from server.transport import DeviceServer, DeviceServerConfig, SessionLimits
from server.transport.client import DeviceCredentials, connect_dtls
from server.transport.session import DeviceSession

DEFAULT_WORKDIR = Path("/tmp/otacloud-bench-restart")


# --- the server process ---------------------------------------------------------------------


class SuspendableEcho:
    """Echo every message; nothing of its own to carry over a restart."""

    async def run(self, session: DeviceSession) -> None:
        while True:
            await session.send(await session.receive())

    async def farewell(self, session: DeviceSession) -> None:
        await trio.lowlevel.checkpoint()

    def suspend(self, session: DeviceSession) -> bytes:
        return b""


async def serve(args: argparse.Namespace) -> None:
    """Serve on ``--port`` until a ``shutdown`` line on stdin; answer ``stats`` lines."""
    device_ids = Path(args.device_list).read_text().split()
    pki = load_pki(Path(args.pki))
    limits = SessionLimits(idle_timeout=3600.0, handshake_timeout=60.0, max_sessions=40_000)
    config = DeviceServerConfig(pki_dir=pki.directory, host="127.0.0.1", tcp_port=None,
                                udp_port=args.port, limits=limits)  # fmt: skip
    handler = SuspendableEcho()
    server = DeviceServer(config, lambda session: handler, MemoryDeviceDirectory(device_ids),
                          pki=pki)  # fmt: skip
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        endpoint = server.udp_endpoint
        assert endpoint is not None
        _say({"ready": True, "pid": os.getpid(), "start_seconds": time.perf_counter() - started,
              "restored_tables": len(endpoint.peers)})  # fmt: skip
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffered = b""
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                break
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                command = line.decode().strip()
                if command == "stats":
                    stats = server.stats
                    _say({"full": stats.full_handshakes["udp"],
                          "resumed": stats.resumed_handshakes["udp"],
                          "restored": endpoint.stats.restored,
                          "not_restored": dict(endpoint.stats.not_restored),
                          "registry": len(server.registry)})  # fmt: skip
                elif command == "shutdown":
                    began = time.perf_counter()
                    await server.shutdown()
                    _say({"saved": endpoint.stats.saved,
                          "shutdown_seconds": time.perf_counter() - began})  # fmt: skip
                    return
        nursery.cancel_scope.cancel()


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class ServerProcess:
    """One ``--serve`` process, driven by lines on its stdin."""

    def __init__(self, pki: Path, device_list: Path, port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--pki", str(pki), "--device-list",
             str(device_list), "--port", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self.ready = self.read()

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the server process exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()


# --- the devices ----------------------------------------------------------------------------


async def ask_until_answered(channel: trio.DTLSChannel, message: bytes, give_up: float) -> bool:
    """Send ``message`` and wait for its echo, sending again every second (a lost datagram
    is retransmitted, as CoAP does); False if nothing came within ``give_up`` seconds."""
    with trio.move_on_after(give_up):
        while True:
            await channel.send(message)
            with trio.move_on_after(1.0):
                while await channel.receive() != message:
                    pass
                return True
    return False


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pki, devices, device_list = fleet(args.workdir, args.devices)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    first = ServerProcess(pki, device_list, port)
    channels: list[trio.DTLSChannel] = []
    limiter = trio.CapacityLimiter(args.parallel)

    async def open_one(device: DeviceCredentials) -> None:
        async with limiter:
            sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            endpoint = trio.DTLSEndpoint(sock)
            channel = await connect_dtls(endpoint, ("127.0.0.1", port), device)
            if not await ask_until_answered(channel, b"hello", 60.0):
                raise RuntimeError("a device got no echo before the restart")
            channels.append(channel)

    result: dict[str, Any] = {"devices": args.devices}
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        async with trio.open_nursery() as opening:
            for device in devices:
                opening.start_soon(open_one, device)
        result["connect_seconds"] = round(time.perf_counter() - started, 1)
        result["before"] = first.ask("stats")

        down = time.perf_counter()
        result["shutdown"] = first.ask("shutdown")
        first.process.wait(timeout=120)
        second = ServerProcess(pki, device_list, port)
        listening = time.perf_counter()
        result["restart"] = second.ready
        answered: list[float] = []
        failed = 0

        async def again(channel: trio.DTLSChannel) -> None:
            nonlocal failed
            if await ask_until_answered(channel, b"again", 30.0):
                answered.append(time.perf_counter())
            else:
                failed += 1

        async with trio.open_nursery() as asking:
            for channel in channels:
                asking.start_soon(again, channel)
        result["after"] = second.ask("stats")
        result["answered"] = len(answered)
        result["unanswered"] = failed
        if answered:
            answered.sort()
            result["served_again_seconds_from_listening"] = {
                "p50": round(answered[len(answered) // 2] - listening, 3),
                "max": round(answered[-1] - listening, 3),
            }
            result["served_again_seconds_from_shutdown"] = round(answered[-1] - down, 3)
        result["new_handshakes_after_restart"] = (
            result["after"]["full"] + result["after"]["resumed"]
        )
        second.ask("shutdown")
        second.process.wait(timeout=120)
        for channel in channels:
            channel.close()
        nursery.cancel_scope.cancel()
    # The second shutdown saved the sessions again: leave no state behind for a later run.
    for name in ("dtls-sessions.sealed",):
        (pki / name).unlink(missing_ok=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=64, help="handshakes at once")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    parser.add_argument("--device-list", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args)
    else:
        print(json.dumps(trio.run(run, args)), flush=True)


if __name__ == "__main__":
    main()
