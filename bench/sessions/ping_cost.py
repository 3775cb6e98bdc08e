"""Server CPU per keep-alive message on idle sessions, TLS and DTLS (benchmark script, not a test).

    .venv/bin/python bench/sessions/ping_cost.py --sessions 1000 2000 [--transport tls dtls]
                                                 [--pings 20000] [--rate 2000]

Starts bench_server.py (echo handler) in its own process, opens ``--sessions`` sessions of
distinct devices from this process, then sends ``--pings`` small messages spread over all
sessions at about ``--rate`` per second, each answered by the server, and reports the
server's CPU seconds per message (/proc/<pid>/stat, user + system). The same run at two
session counts shows whether a message costs more when more sessions are held, which it
should not: a keep-alive touches one session.

``--profile FILE`` records the server with py-spy during the pings of the largest count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from bench_common import DEFAULT_WORKDIR, ServerProcess, cpu_seconds, fleet, open_all, paced

from server.transport.client import DeviceCredentials, connect_dtls, connect_tls

PING = b"p"


class _Tls:
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def ping(self) -> None:
        await self.stream.send_all(PING)
        await self.stream.receive_some()


class _Dtls:
    def __init__(self, channel: Any) -> None:
        self.channel = channel

    async def ping(self) -> None:
        await self.channel.send(PING)
        await self.channel.receive()


async def _open_tls(port: int, device: DeviceCredentials, stack: AsyncExitStack) -> _Tls:
    stream = await connect_tls(("127.0.0.1", port), device)
    stack.push_async_callback(trio.aclose_forcefully, stream)
    link = _Tls(stream)
    await link.ping()
    return link


async def _open_dtls(port: int, device: DeviceCredentials, stack: AsyncExitStack) -> _Dtls:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    endpoint = trio.DTLSEndpoint(sock)
    stack.callback(endpoint.close)
    link = _Dtls(await connect_dtls(endpoint, ("127.0.0.1", port), device))
    await link.ping()
    return link


async def ping_cost(
    server: ServerProcess,
    transport: str,
    devices: list[DeviceCredentials],
    args: argparse.Namespace,
    profile: Path | None,
) -> dict[str, Any]:
    """Hold one session per device, then measure server CPU per answered message."""
    port = server.tcp_port if transport == "tls" else server.udp_port
    opener = _open_tls if transport == "tls" else _open_dtls
    async with AsyncExitStack() as stack:
        links: list[_Tls | _Dtls] = await open_all(
            devices, lambda device: opener(port, device, stack), args.parallel
        )
        await trio.sleep(1.0)  # let the server settle after the openings (not measured)
        spy = None
        if profile is not None:
            spy = subprocess.Popen(
                ["py-spy", "record", "-p", str(server.pid), "-o", str(profile), "-f", "speedscope"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            await trio.sleep(1.0)
        cpu_before = cpu_seconds(server.pid)
        elapsed = await paced(links, args.pings, args.rate, args.parallel,
                              lambda link: link.ping())
        cpu = cpu_seconds(server.pid) - cpu_before
        if spy is not None:
            spy.send_signal(2)
            spy.wait(timeout=60)
    return {
        "transport": transport,
        "sessions": len(links),
        "pings": args.pings,
        "seconds": round(elapsed, 2),
        "server_cpu_us_per_ping": round(cpu / args.pings * 1e6, 1),
    }


async def main(args: argparse.Namespace) -> None:
    largest = max(args.sessions)
    ca_dir, devices, listing = fleet(args.workdir, largest)
    for transport in args.transport:
        for count in args.sessions:
            server = ServerProcess(ca_dir, listing)
            profile = None
            if args.profile is not None and count == largest:
                profile = args.profile.with_name(f"{args.profile.stem}-{transport}.json")
            try:
                result = await ping_cost(server, transport, devices[:count], args, profile)
            finally:
                server.close()
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--transport", nargs="+", choices=["tls", "dtls"], default=["tls", "dtls"])
    parser.add_argument("--pings", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="messages per second")
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output (speedscope)")
    trio.run(main, parser.parse_args())
