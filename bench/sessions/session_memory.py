"""Server memory per idle device session, TLS and DTLS (benchmark script, not a test).

    .venv/bin/python bench/sessions/session_memory.py --sessions 2000 [--transport tls|dtls]

Starts bench_server.py in its own process, opens ``--sessions`` sessions of distinct devices
from this process (each exchanges one message so TLS 1.3 tickets are delivered, then stays
idle), and reports the server's growth per session: RSS, malloc'd bytes (OpenSSL and large
Python objects) and, in a second run with tracemalloc, Python-allocated bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from bench_common import DEFAULT_WORKDIR, ServerProcess, fleet

from server.transport.client import DeviceCredentials, connect_dtls, connect_tls


async def _open_tls(port: int, device: DeviceCredentials, stack: AsyncExitStack) -> None:
    stream = await connect_tls(("127.0.0.1", port), device)
    stack.push_async_callback(trio.aclose_forcefully, stream)
    await stream.send_all(b"hello")
    await stream.receive_some()


async def _open_dtls(port: int, device: DeviceCredentials, stack: AsyncExitStack) -> None:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    endpoint = trio.DTLSEndpoint(sock)
    stack.callback(endpoint.close)
    channel = await connect_dtls(endpoint, ("127.0.0.1", port), device)
    await channel.send(b"hello")
    await channel.receive()


async def hold_sessions(
    server: ServerProcess,
    transport: str,
    devices: list[DeviceCredentials],
    parallel: int,
    settle: float,
) -> dict[str, float]:
    """Open one session per device, measure the server 1 s after the last one opened and
    again once they have been quiet for ``settle`` seconds (an idle TLS session drops its
    ciphers after 5 s), close them all."""
    port = server.tcp_port if transport == "tls" else server.udp_port
    opener = _open_tls if transport == "tls" else _open_dtls
    async with AsyncExitStack() as stack:
        # Warm up: a few sessions make the server allocate its one-time structures. They
        # stay open (a closed client port could be reused and replace a DTLS channel).
        for device in devices[-10:]:
            await opener(port, device, stack)
        await trio.sleep(0.5)
        before = {key: server.ask(key)[key] for key in ("rss", "heap", "py")}
        registered_before = server.ask("stats")["registry"]
        limiter = trio.CapacityLimiter(parallel)
        started = time.perf_counter()

        async def one(device: DeviceCredentials) -> None:
            async with limiter:
                await opener(port, device, stack)

        async with trio.open_nursery() as nursery:
            for device in devices[:-10]:
                nursery.start_soon(one, device)
        elapsed = time.perf_counter() - started
        await trio.sleep(1.0)
        count = len(devices) - 10
        just_opened = server.ask("rss")["rss"]
        await trio.sleep(max(0.0, settle - 1.0))
        after = {key: server.ask(key)[key] for key in ("rss", "heap", "py")}
        stats = server.ask("stats")
        assert stats["registry"] - registered_before == count, stats
        result = {
            "sessions": count,
            "open_seconds": round(elapsed, 2),
            "rss_kib_per_session_after_1s": round(
                (just_opened - before["rss"]) / count / 1024, 2
            ),
            "settle_seconds": settle,
            "rss_kib_per_session": round((after["rss"] - before["rss"]) / count / 1024, 2),
            "malloc_kib_per_session": round((after["heap"] - before["heap"]) / count / 1024, 2),
        }
        if after["py"] is not None:
            result["python_kib_per_session"] = round((after["py"] - before["py"]) / count / 1024, 2)
    return result


async def main(args: argparse.Namespace) -> None:
    ca_dir, devices, listing = fleet(args.workdir, args.sessions + 10)
    for transport in args.transport:
        for traced in (False, True):
            server = ServerProcess(ca_dir, listing, tracemalloc=traced)
            try:
                result = await hold_sessions(
                    server, transport, devices, args.parallel, args.settle
                )
            finally:
                server.close()
            result = {"transport": transport, "tracemalloc": traced, **result}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--transport", nargs="+", choices=["tls", "dtls"], default=["tls", "dtls"])
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument(
        "--settle",
        type=float,
        default=8.0,
        help="seconds the sessions stay quiet before the idle measurement (default 8)",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    trio.run(main, parser.parse_args())
