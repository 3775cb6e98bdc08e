"""Mutual-auth handshakes per server CPU-second, full and resumed (benchmark script).

    .venv/bin/python bench/sessions/handshake_rate.py [--seconds 5] [--client s_time|python]
    .venv/bin/python bench/sessions/handshake_rate.py --transport dtls [--parallel 16]

``--transport tls`` (default) measures TLS 1.3; ``--transport dtls`` measures DTLS 1.2 with
Python clients (trio.DTLSEndpoint, one socket per connection, resuming with the OpenSSL
session of the previous connection; ``--client`` does not apply).

The server (bench_server.py, "once" handler: answer one message, then close_notify) runs
pinned to CPU 0; the load runs pinned to CPU 1:

* ``s_time``: ``openssl s_time -new`` / ``-reuse`` processes (C clients, so the server's
  core can saturate). ``-www /`` makes each connection send a request and read the answer,
  which also delivers the TLS 1.3 session ticket.
* ``python``: trio clients using stdlib ssl, resuming with a saved ``ssl.SSLSession``.

Every connection is one handshake, one request/answer and a close; the figure reported is
connections / (server user+system CPU seconds), i.e. what one core sustains. ``--bare`` runs
a bare ``trio.serve_ssl_over_tcp`` server with the same context instead, as the reference
for the cost of our layers; openssl_cost.py gives OpenSSL's own share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import trio
from bench_common import DEFAULT_WORKDIR, ServerProcess, cpu_seconds, fleet

from server.transport.client import DeviceCredentials, connect_dtls, connect_tls, dtls_session
from server.transport.dtls import send_close_notify


def _s_time_load(
    port: int, device: DeviceCredentials, resumed: bool, seconds: int, processes: int
) -> None:
    command = [
        *("taskset", "-c", "1", "openssl", "s_time", "-tls1_3"),
        *("-connect", f"127.0.0.1:{port}", "-www", "/", "-time", str(seconds)),
        *("-cert", str(device.cert_path), "-key", str(device.key_path)),
        *("-CAfile", str(device.ca_path), "-reuse" if resumed else "-new"),
    ]
    running = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    for process in running:
        process.wait()


async def _python_load(
    port: int, devices: list[DeviceCredentials], resumed: bool, seconds: float, parallel: int
) -> None:
    os.sched_setaffinity(0, {1})
    deadline = trio.current_time() + seconds

    async def worker(device: DeviceCredentials) -> None:
        context = device.tls_context()
        session = None
        while trio.current_time() < deadline:
            stream = await connect_tls(
                ("127.0.0.1", port), device, context=context, session=session
            )
            await stream.send_all(b"GET /\r\n")
            while await stream.receive_some():  # the answer, then close_notify
                pass
            if resumed:
                session = stream.session  # holds the ticket that came with the answer
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for device in devices[:parallel]:
            nursery.start_soon(worker, device)


async def _python_dtls_load(
    port: int, devices: list[DeviceCredentials], resumed: bool, seconds: float, parallel: int
) -> None:
    os.sched_setaffinity(0, {1})
    deadline = trio.current_time() + seconds

    async def worker(device: DeviceCredentials) -> None:
        session = None
        while trio.current_time() < deadline:
            sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            with trio.DTLSEndpoint(sock) as endpoint:
                with trio.move_on_after(10):
                    channel = await connect_dtls(
                        endpoint, ("127.0.0.1", port), device, session=session
                    )
                    await channel.send(b"GET /")
                    await channel.receive()  # the answer; the server then closes
                    if resumed and session is None:
                        session = dtls_session(channel)
                    # Our close_notify too: OpenSSL marks the session of a connection freed
                    # without one not resumable (measured: every other handshake was full).
                    await send_close_notify(channel)

    async with trio.open_nursery() as nursery:
        for device in devices[:parallel]:
            nursery.start_soon(worker, device)


def measure(
    server: ServerProcess, args: argparse.Namespace, devices: list[DeviceCredentials], resumed: bool
) -> dict[str, object]:
    """Run one load and report the server's cost per connection."""
    before_stats, before_cpu = server.ask("stats"), cpu_seconds(server.pid)
    started = time.perf_counter()
    if args.transport == "dtls":
        trio.run(_python_dtls_load, server.udp_port, devices, resumed, args.seconds, args.parallel)
    elif args.client == "s_time":
        _s_time_load(server.tcp_port, devices[0], resumed, args.seconds, args.processes)
    else:
        trio.run(_python_load, server.tcp_port, devices, resumed, args.seconds, args.parallel)
    wall = time.perf_counter() - started
    after_stats, after_cpu = server.ask("stats"), cpu_seconds(server.pid)
    full = after_stats["full"] - before_stats["full"]
    again = after_stats["resumed"] - before_stats["resumed"]
    cpu = after_cpu - before_cpu
    total = full + again
    return {
        "transport": args.transport,
        "mode": "resumed" if resumed else "full",
        "server": "bare trio.SSLStream" if args.bare else "DeviceServer",
        "client": "python" if args.transport == "dtls" else args.client,
        "full_handshakes": full,
        "resumed_handshakes": again,
        "server_cpu_s": round(cpu, 2),
        "server_ms_per_connection": round(cpu / total * 1e3, 3) if total else None,
        "per_server_cpu_second": round(total / cpu) if cpu else None,
        "per_wall_second": round(total / wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--transport", choices=["tls", "dtls"], default="tls")
    parser.add_argument("--client", choices=["s_time", "python"], default="s_time")
    parser.add_argument("--processes", type=int, default=4, help="s_time processes")
    parser.add_argument("--parallel", type=int, default=16, help="python client connections")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    parser.add_argument(
        "--bare", action="store_true", help="measure a bare trio TLS server instead (reference)"
    )
    args = parser.parse_args()
    from pathlib import Path

    ca_dir, devices, listing = fleet(Path(args.workdir), max(args.parallel, 1))
    server = ServerProcess(ca_dir, listing, handler="once", cpu=0, bare=args.bare)
    try:
        for resumed in (False, True):
            print(json.dumps(measure(server, args, devices, resumed)), flush=True)
    finally:
        server.close()


if __name__ == "__main__":
    main()
