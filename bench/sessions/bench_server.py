"""The device server as a separate process for session benchmarks (not a test).

Started by the other scripts in this directory::

    python bench/sessions/bench_server.py --pki DIR --devices FILE [--handler echo|once]
                                         [--tracemalloc] [--cpu N]

It prints one JSON line ``{"tcp": port, "udp": port, "pid": pid}`` once listening, then
answers commands read from stdin, one JSON line each:

``rss``       resident set size in bytes (/proc/self/status VmRSS)
``heap``      bytes in use by malloc (glibc mallinfo2: OpenSSL + large Python objects)
``py``        bytes traced by tracemalloc (only with --tracemalloc)
``cpu``       user+system CPU seconds of this process
``stats``     handshake/refusal/close counters and live sessions
``snap``      take a tracemalloc snapshot (with --tracemalloc)
``topN``      the N biggest allocation growths since ``snap``, by source line
``quit``      graceful shutdown and exit
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import resource
import tracemalloc
from pathlib import Path
from typing import Any

import trio
from bench_common import rss_bytes

from server.authorization import MemoryDeviceDirectory
from server.identity import InstallationPki, load_pki
from server.transport import (
    DeviceServer,
    DeviceServerConfig,
    DeviceSession,
    SessionClosed,
    SessionLimits,
)
from server.transport.tls import make_tls_server_context


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            *("arena", "ordblks", "smblks", "hblks", "hblkhd"),
            *("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"),
        )
    ]


def malloc_in_use() -> int:
    """Bytes handed out by glibc malloc (small chunks + mmapped chunks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class EchoHandler:
    """Echo every message; sessions stay open until the device leaves."""

    async def run(self, session: DeviceSession) -> None:
        while True:
            await session.send(await session.receive())

    async def farewell(self, session: DeviceSession) -> None:
        await trio.lowlevel.checkpoint()


class OnceHandler(EchoHandler):
    """Answer the first message (which also delivers the TLS 1.3 tickets), then close."""

    async def run(self, session: DeviceSession) -> None:
        with contextlib.suppress(SessionClosed):
            await session.send(await session.receive())


async def _commands(server: DeviceServer) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffered = b""
    baseline: tracemalloc.Snapshot | None = None
    while True:
        chunk = await stdin.receive_some()
        if not chunk:
            return
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            command = line.decode().strip()
            reply: dict[str, Any]
            if command == "rss":
                gc.collect()
                reply = {"rss": rss_bytes()}
            elif command == "heap":
                gc.collect()
                reply = {"heap": malloc_in_use()}
            elif command == "py":
                gc.collect()
                reply = {
                    "py": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
                }
            elif command == "snap":
                gc.collect()
                baseline = tracemalloc.take_snapshot()
                reply = {"snap": True}
            elif command.startswith("top"):
                gc.collect()
                if baseline is None:
                    reply = {"error": "take a snapshot first (snap)"}
                else:
                    diff = tracemalloc.take_snapshot().compare_to(baseline, "lineno")
                    reply = {"top": [str(stat) for stat in diff[: int(command[3:] or 25)]]}
            elif command == "cpu":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                reply = {"cpu": usage.ru_utime + usage.ru_stime}
            elif command == "stats":
                stats = server.stats
                reply = {
                    "full": sum(stats.full_handshakes.values()),
                    "resumed": sum(stats.resumed_handshakes.values()),
                    "refused": {f"{k[0]}:{k[1]}": v for k, v in stats.refused.items()},
                    "closed": {f"{k[0]}:{k[1]}": v for k, v in stats.closed.items()},
                    "live": dict(server.host.live),
                    "registry": len(server.registry),
                }
            elif command == "quit":
                if server.tcp_address is not None:
                    await server.shutdown()
                print(json.dumps({"quit": True}), flush=True)
                return
            else:
                reply = {"error": f"unknown command {command!r}"}
            print(json.dumps(reply), flush=True)


async def _bare(server: DeviceServer, pki: InstallationPki) -> None:
    """Reference point: a bare trio.serve_ssl_over_tcp server with the same TLS context
    (handshake, getpeercert, one answer, close_notify): no authorization, registry, limits."""
    context = make_tls_server_context(pki)

    async def once(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            stream.getpeercert(True)
            await stream.send_all(await stream.receive_some())
            await stream.aclose()
        except trio.BrokenResourceError:
            return
        counter = (
            server.stats.resumed_handshakes
            if stream.session_reused
            else server.stats.full_handshakes
        )
        counter["tcp"] += 1

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_ssl_over_tcp, once, 0, context, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        print(json.dumps({"tcp": port, "udp": 0, "pid": os.getpid()}), flush=True)
        await _commands(server)
        nursery.cancel_scope.cancel()


async def main(args: argparse.Namespace) -> None:
    if args.tracemalloc:
        tracemalloc.start()
    device_ids = Path(args.devices).read_text().split()
    directory = MemoryDeviceDirectory(device_ids)
    pki = load_pki(Path(args.pki))
    handler = OnceHandler() if args.handler == "once" else EchoHandler()
    limits = SessionLimits(idle_timeout=3600.0, handshake_timeout=30.0, max_sessions=19_500)
    config = DeviceServerConfig(
        pki_dir=pki.directory, host="127.0.0.1", tcp_port=0, udp_port=0, limits=limits
    )
    server = DeviceServer(config, lambda session: handler, directory, pki=pki)
    if args.bare:
        await _bare(server, pki)
        return
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert server.tcp_address and server.udp_address
        print(
            json.dumps(
                {"tcp": server.tcp_address[1], "udp": server.udp_address[1], "pid": os.getpid()}
            ),
            flush=True,
        )
        await _commands(server)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pki", required=True)
    parser.add_argument("--devices", required=True, help="file with the device ids to authorize")
    parser.add_argument("--handler", choices=["echo", "once"], default="echo")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--bare", action="store_true", help="bare trio TLS server (reference)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the server to this CPU")
    arguments = parser.parse_args()
    if arguments.cpu is not None:
        os.sched_setaffinity(0, {arguments.cpu})
    trio.run(main, arguments)
