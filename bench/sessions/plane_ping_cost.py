"""Server CPU per CoAP keep-alive ping through the whole device plane (benchmark script).

    .venv/bin/python bench/sessions/plane_ping_cost.py --sessions 1000 2000 [--transport tcp udp]
                                                       [--pings 20000] [--rate 1000]

Unlike ``ping_cost.py`` (transport and an echo handler only), this runs a real ``ota server``
(one process, its embedded store) and speaks CoAP: each session sends what a device sends
first (over TCP its CSM and a 7.02 Ping, RFC 8323 5.3-5.4; over UDP an Empty CON, RFC 7252
4.3), then ``--pings`` more pings spread over all sessions at about ``--rate`` per second,
each answered by the server's link. It reports the server's CPU seconds per ping
(/proc/<pid>/stat), at each session count, so growth with the number of sessions shows.

``--variant "SECTION.KEY=VALUE ..."`` (repeatable) runs each session count once per list of
server settings, e.g. CPython's collector defaults against the server's.
``--profile DIR`` records the server with py-spy during the pings (speedscope files).
``--gc-probe PREFIX`` loads ``gc_probe/sitecustomize.py`` into the server: the time of its
garbage collections before and after the pings, and what they promoted, in ``PREFIX.*``
files (``GCPROBE_THRESHOLD=a,b,c`` in the environment sets other thresholds for it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from bench_common import OTA, cpu_seconds, open_all, paced, provision_product, rss_bytes

from otacore.protocol.link import TcpLink, UdpLink
from server.identity import DEVICE_CERT_FILE, DEVICE_KEY_FILE, pki_dir
from server.transport.client import DeviceCredentials, connect_dtls, connect_tls
from server.transport.udp_saved import SAVED_SESSIONS_FILE

DEFAULT_WORKDIR = Path("/tmp/otacloud-bench-plane-ping")
#: Seconds to wait for a ping's answer before sending another, and tries per ping.
ANSWER_WAIT = 2.0
PING_TRIES = 5
#: Sessions opened before the RSS baseline (one-time allocations of the first sessions).
WARM_UP = 10


def prepare(workdir: Path, count: int) -> tuple[Path, list[DeviceCredentials]]:
    """A data directory with one product and ``count`` provisioned devices (made once)."""
    data, creds, ids = provision_product(workdir, count)
    ca = creds / "ca.pem"
    return data, [DeviceCredentials(creds / i / DEVICE_CERT_FILE, creds / i / DEVICE_KEY_FILE, ca)
                  for i in ids]


class Server:
    """``ota server`` in a child process, one process, device listeners on free ports."""

    def __init__(self, data: Path, gc_probe: Path | None = None,
                 settings: tuple[str, ...] = ()) -> None:
        env = dict(os.environ)
        if gc_probe is not None:
            env["PYTHONPATH"] = str(Path(__file__).with_name("gc_probe"))
            env["GCPROBE_OUT"] = str(gc_probe)
        self.probed = gc_probe is not None
        self.process = subprocess.Popen(
            [*OTA, "server", "--data", str(data), "--api-port", "0", "--device-port", "0",
             "--workers", "1", "--device-limit", "max_sessions=19000",
             *(arg for setting in settings for arg in ("--set", setting))],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        self.ports: dict[str, int] = {}
        assert self.process.stdout is not None
        for line in self.process.stdout:
            found = re.search(r"devices on (TLS|DTLS) [\d.]+:(\d+)", line)
            if found:
                self.ports["tcp" if found.group(1) == "TLS" else "udp"] = int(found.group(2))
            if len(self.ports) == 2:
                break
        if set(self.ports) != {"tcp", "udp"}:
            raise RuntimeError(f"ota server did not report its device ports: {self.ports}")

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Session:
    """One device's link and transport, as the bench needs them (pings only)."""

    def __init__(self, link: TcpLink | UdpLink, send: Any, receive: Any) -> None:
        self.link, self._send, self._receive = link, send, receive

    async def ping(self) -> int:
        """One ping answered; returns how many tries it took (a datagram may be lost: a
        try unanswered within ANSWER_WAIT is sent again, as a device would)."""
        for attempt in range(1, PING_TRIES + 1):
            self.link.ping(trio.current_time())
            for data in self.link.take_outgoing():
                await self._send(data)
            with trio.move_on_after(ANSWER_WAIT):
                answer = await self._receive()
                if not answer:
                    raise trio.BrokenResourceError("the server closed the session")
                self.link.receive(answer, trio.current_time())
                return attempt
        raise trio.TooSlowError(f"no answer to {PING_TRIES} pings")


async def _open_tcp(port: int, device: DeviceCredentials, stack: AsyncExitStack) -> _Session:
    stream = await connect_tls(("127.0.0.1", port), device)
    stack.push_async_callback(trio.aclose_forcefully, stream)
    session = _Session(TcpLink(), stream.send_all, stream.receive_some)
    await session.ping()  # CSM + Ping: the server authorised the session and runs it
    return session


async def _open_udp(port: int, device: DeviceCredentials, stack: AsyncExitStack) -> _Session:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    endpoint = trio.DTLSEndpoint(sock)
    stack.callback(endpoint.close)
    channel = await connect_dtls(endpoint, ("127.0.0.1", port), device)
    session = _Session(UdpLink(), channel.send, channel.receive)
    await session.ping()
    return session


async def ping_cost(
    server: Server, transport: str, devices: list[DeviceCredentials], args: argparse.Namespace
) -> dict[str, Any]:
    """Hold one session per device, then measure server CPU per answered ping."""
    port = server.ports[transport]
    opener = _open_tcp if transport == "tcp" else _open_udp
    async with AsyncExitStack() as stack:
        # A few sessions first, so one-time allocations are not counted per session.
        sessions: list[_Session] = await open_all(
            devices[:WARM_UP], lambda device: opener(port, device, stack), args.parallel
        )
        await trio.sleep(1.0)
        rss_before = rss_bytes(server.process.pid)
        sessions += await open_all(
            devices[WARM_UP:], lambda device: opener(port, device, stack), args.parallel
        )
        await trio.sleep(2.0)  # let the server's session starts settle (not measured)
        spy = None
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            out = args.profile / f"plane-{transport}-{len(devices)}.json"
            spy = subprocess.Popen(
                ["py-spy", "record", "-p", str(server.process.pid), "-o", str(out),
                 "-f", "speedscope", "-r", "200"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            await trio.sleep(1.0)
        idle_before = cpu_seconds(server.process.pid)
        await trio.sleep(args.idle)  # what the held sessions cost with no traffic at all
        idle_cpu = cpu_seconds(server.process.pid) - idle_before
        # After 2 s + --idle of quiet: the idle cost of a session of the real device plane.
        rss_idle = rss_bytes(server.process.pid)
        if server.probed:  # gc_probe: collections so far; start the promotion census
            server.process.send_signal(signal.SIGUSR1)
        cpu_before = cpu_seconds(server.process.pid)
        retries = 0

        async def ping(session: _Session) -> None:
            nonlocal retries
            retries += await session.ping() - 1

        elapsed = await paced(sessions, args.pings, args.rate, args.parallel, ping)
        cpu = cpu_seconds(server.process.pid) - cpu_before
        if server.probed:
            server.process.send_signal(signal.SIGUSR1)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=120)
    idle_share = idle_cpu / args.idle * elapsed if args.idle else 0.0
    return {
        "transport": transport,
        "sessions": len(sessions),
        "pings": args.pings,
        "pings_sent_again": retries,
        "seconds": round(elapsed, 2),
        "server_cpu_us_per_ping": round(cpu / args.pings * 1e6, 1),
        "rss_kib_per_idle_session": round(
            (rss_idle - rss_before) / (len(sessions) - WARM_UP) / 1024, 2
        ),
        "idle_cpu_percent": round(idle_cpu / args.idle * 100, 2) if args.idle else None,
        "server_cpu_us_per_ping_less_idle": round((cpu - idle_share) / args.pings * 1e6, 1),
    }


async def main(args: argparse.Namespace) -> None:
    data, devices = prepare(args.workdir, max(args.sessions))
    variants = [tuple(v.split()) for v in args.variant] or [()]
    for transport in args.transport:
        for count, variant in ((c, v) for c in args.sessions for v in variants):
            probe = None if args.gc_probe is None else Path(f"{args.gc_probe}-{transport}-{count}")
            # The last run's server saved its DTLS sessions as it stopped (issue 14 item 6):
            # restored, they would be replaced by this run's handshakes and free their
            # memory while the RSS per session is measured.
            (pki_dir(data) / SAVED_SESSIONS_FILE).unlink(missing_ok=True)
            server = Server(data, probe, variant)
            try:
                result = await ping_cost(server, transport, devices[:count], args)
            finally:
                server.close()
            print(json.dumps({**result, "settings": " ".join(variant)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--transport", nargs="+", choices=["tcp", "udp"], default=["tcp", "udp"])
    parser.add_argument("--pings", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="pings per second")
    parser.add_argument("--idle", type=float, default=6.0, help="seconds of idle CPU reading")
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    parser.add_argument("--gc-probe", type=Path, default=None, help="gc probe output prefix")
    parser.add_argument(
        "--variant", action="append", default=[],
        help="server settings to compare, each a space-separated list of SECTION.KEY=VALUE "
        "(ota server --set); repeat for several, each run at every session count",
    )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    trio.run(main, parser.parse_args())
