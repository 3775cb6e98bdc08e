"""Graceful restart of the real ``ota server`` with N online DTLS devices (benchmark script).

    .venv/bin/python bench/sessions/plane_restart.py --devices 2000 [--load-procs 2]
        [--parallel 64] [--retry every-second|rfc7252] [--settle SECONDS]
        [--set SECTION.KEY=VALUE ...] [--control-forget] [--workdir DIR]

Unlike ``restart.py`` (the transport and an echo handler), this restarts ``ota server``
itself (one process, its embedded store, a fixed UDP port, its data directory), whose device
plane suspends each session's Hello, product, key sequence, Describe and CoAP message ids:

1. N devices are provisioned into a product (once, cached in ``--workdir``). Each is a real
   OpenSSL DTLS 1.2 client (``trio.DTLSEndpoint``, one socket each), spread over
   ``--load-procs`` load processes; each handshakes, sends its Hello and its Describe over
   CoAP and gets both answered (2.04 Changed).
2. The server gets SIGTERM (graceful: its DTLS sessions are sealed to the data directory),
   exits, and a new ``ota server`` starts on the same data directory and port.
3. Once the new process listens, every device sends one event (CoAP ``POST e/<name>``,
   RFC 7252 CON) on its old DTLS session; only a session that knows the device's product
   answers it 2.04 Changed (an Empty ping would be answered by the link alone). A request
   unanswered is sent again every second (``--retry rfc7252``: after 2-3 s, doubling, as
   RFC 7252 4.8), with the same message id (the server's deduplication answers a repeat,
   RFC 7252 4.5).

One JSON line: new handshakes in the new process, devices served again, p50/max seconds
until served from the new process's listen and from the SIGTERM, sessions saved/restored,
the server's RSS.

Handshake and session counters are the server's own (``TransportStats`` and ``UdpStats`` of
the device endpoint): ``ota server`` exposes them neither in its log nor over its API, so the
server runs as ``python plane_restart.py --probe-server -- server ...``, which is the ``ota``
command's own entry point in a process that also answers SIGUSR2 by writing those counters
to a file. The counts of sessions saved and restored are also read from the server's log
lines ("saved N DTLS sessions", "restored N saved DTLS sessions"), as a cross-check.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_seconds, provision_product, rss_bytes

from otacore.coap import Code, Message
from otacore.messages import (
    Dependency,
    Describe,
    Direction,
    Event,
    Hello,
    ModuleDescription,
    to_message,
)
from otacore.protocol.link import ResponseReceived, UdpLink
from server.identity import DEVICE_CERT_FILE, DEVICE_KEY_FILE
from server.transport.client import DeviceCredentials, connect_dtls

DEFAULT_WORKDIR = Path("/tmp/otacloud-bench-plane-restart")
#: Seconds between two sends of an unanswered request (a CoAP device retransmits).
RETRY_EVERY = 1.0
#: Seconds a device tries before it counts as not served.
GIVE_UP = 60.0
#: The file the device endpoint seals its sessions to, inside the data directory.
SEALED_NAME = "dtls-sessions.sealed"


# --- the server process (the ota CLI with a counter probe) ----------------------------------


def probe_server(argv: list[str], stats_file: Path) -> None:
    """Run the ``ota`` command line with ``argv``; SIGUSR2 writes the device endpoint's
    counters to ``stats_file`` (each counter object is noted as it is made: no server code
    is changed)."""
    from server.cli.main import main as ota_main
    from server.transport.session_host import TransportStats
    from server.transport.udp_endpoint import UdpStats

    # The counters are created at start-up (and then frozen out of gc.get_objects() by the
    # server's collector tuning): note each instance as it is made.
    made: dict[type[Any], list[Any]] = {TransportStats: [], UdpStats: []}
    for kind, instances in made.items():
        original = vars(kind)["__init__"]

        def noting(self: Any, *a: Any, _original: Any = original, _instances: list[Any] =
                   instances, **k: Any) -> None:
            _original(self, *a, **k)
            _instances.append(self)

        setattr(kind, "__init__", noting)  # noqa: B010 (mypy refuses the assignment)

    def write_stats(signum: int, frame: object) -> None:
        transport, udp = made[TransportStats], made[UdpStats]
        report = {
            "full_handshakes": sum(s.full_handshakes["udp"] for s in transport),
            "resumed_handshakes": sum(s.resumed_handshakes["udp"] for s in transport),
            "saved": sum(s.saved for s in udp),
            "restored": sum(s.restored for s in udp),
            "not_restored": {k: v for s in udp for k, v in s.not_restored.items()},
            "endpoints": len(udp),
        }
        partial = stats_file.with_suffix(".partial")
        partial.write_text(json.dumps(report))
        partial.replace(stats_file)

    signal.signal(signal.SIGUSR2, write_stats)
    sys.argv = ["ota", *argv]
    ota_main()


class Server:
    """``ota server`` (one process) on ``data`` and a fixed device port."""

    def __init__(self, data: Path, port: int, stats_file: Path, log_file: Path,
                 settings: tuple[str, ...] = ()) -> None:
        self.stats_file = stats_file
        self.log_file = log_file
        self.log = log_file.open("w")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--probe-server", str(stats_file), "--",
             "server", "--data", str(data), "--api-port", "0", "--device-port", str(port),
             "--workers", "1", "--device-limit", "max_sessions=19000",
             # Connecting 10,000 devices takes longer than the default 120 s idle timeout,
             # and these devices send no keep-alives while they wait.
             "--device-limit", "idle_timeout=3600",
             *(arg for setting in settings for arg in ("--set", setting))],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if re.search(r"devices on DTLS [\d.]+:(\d+)", line):
                break
        else:
            raise RuntimeError(f"ota server exited before listening; see {log_file}")
        #: Wall-clock time the bench read the "listening" line (just after the real listen).
        self.listening = time.time()
        # Keep reading its stdout so the pipe never fills.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def stats(self) -> dict[str, Any]:
        """The server's counters (SIGUSR2 to the probe, then its file)."""
        self.stats_file.unlink(missing_ok=True)
        self.process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not self.stats_file.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the server did not write its counters")
            time.sleep(0.05)
        answer: dict[str, Any] = json.loads(self.stats_file.read_text())
        return answer

    def stop(self) -> float:
        """SIGTERM (graceful); wait for the exit. Returns the time SIGTERM was sent."""
        sent = time.time()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        return sent

    def logged(self, pattern: str) -> int | None:
        """The first number of the server log line matching ``pattern``, if any."""
        found = re.search(pattern, self.log_file.read_text())
        return int(found.group(1)) if found else None


# --- the devices (load processes) -----------------------------------------------------------


MODULES = (
    ModuleDescription(4, 1, 5003, 0, 600_000, bytes(range(32)), (Dependency(2, 0, 2001),)),
    ModuleDescription(5, 1, 7, 0, 90_000, bytes(32), (Dependency(4, 1, 5003),)),
)


class Device:
    """One device: a DTLS channel and a CoAP link over it."""

    def __init__(self, device_id: str, channel: trio.DTLSChannel, retry: str) -> None:
        self.device_id = device_id
        self.channel = channel
        self.link = UdpLink()
        self.retry = retry
        #: Datagrams sent for requests, first sends and retransmissions.
        self.sends = 0

    def _waits(self) -> Iterator[float]:
        """Seconds to wait for an answer before each retransmission: every RETRY_EVERY s,
        or RFC 7252 4.8's ACK_TIMEOUT 2 s x ACK_RANDOM_FACTOR 1.5, doubling each time."""
        if self.retry == "every-second":
            yield from itertools.repeat(RETRY_EVERY)
        wait = random.uniform(2.0, 3.0)
        while True:
            yield wait
            wait *= 2

    async def ask(self, message: Message, give_up: float = GIVE_UP) -> int | None:
        """Send a CON request, again while unanswered (``_waits``); its answer's code, or
        None after ``give_up`` seconds."""
        token = self.link.request(message, trio.current_time())
        datagrams = self.link.take_outgoing()
        with trio.move_on_after(give_up):
            for wait in self._waits():
                for datagram in datagrams:
                    await self.channel.send(datagram)
                    self.sends += 1
                with trio.move_on_after(wait):
                    while True:
                        data = await self.channel.receive()
                        events = self.link.receive(data, trio.current_time())
                        for reply in self.link.take_outgoing():  # ACKs to the server's CONs
                            await self.channel.send(reply)
                        for event in events:
                            if isinstance(event, ResponseReceived) and event.token == token:
                                return event.message.code
        return None


async def load(args: argparse.Namespace) -> None:
    """A load process: connect its devices (handshake, Hello, Describe), say so, then on a
    ``go`` line send one event from each and report when each was answered."""
    creds = args.workdir / "creds"
    random.seed(args.seed)  # the RFC 7252 backoff's random factor
    ids = Path(args.device_ids).read_text().split()
    devices: list[Device] = []
    limiter = trio.CapacityLimiter(args.parallel)
    refused: dict[str, int] = {}

    async def connect(device_id: str) -> None:
        credentials = DeviceCredentials(creds / device_id / DEVICE_CERT_FILE,
                                        creds / device_id / DEVICE_KEY_FILE, creds / "ca.pem")
        async with limiter:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            endpoint = trio.DTLSEndpoint(sock)
            channel = await connect_dtls(endpoint, ("127.0.0.1", args.port), credentials)
            device = Device(device_id, channel, args.retry)
            hello = Hello(device_id=device_id, platform_id=13, product_id=13,
                          product_version=7, system_version=5003,
                          supports_immediate_updates=True, updates_enabled=True,
                          reset_pending=False, max_message_size=1500)
            for message in (to_message(hello, Direction.TO_CLOUD),
                            to_message(Describe(MODULES), Direction.TO_CLOUD)):
                code = await device.ask(message)
                if code != Code.CHANGED:
                    refused[_code_name(code)] = refused.get(_code_name(code), 0) + 1
                    return
            devices.append(device)

    started = time.time()
    async with trio.open_nursery() as nursery:
        for device_id in ids:
            nursery.start_soon(connect, device_id)
    _say({"connected": len(devices), "refused": refused,
          "connect_seconds": round(time.time() - started, 1)})  # fmt: skip
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffered = b""
    while b"\n" not in buffered:
        chunk = await stdin.receive_some()
        if not chunk:
            return
        buffered += chunk
    served: list[float] = []
    codes: dict[str, int] = {}
    cpu_before = time.process_time()
    sends_before = sum(device.sends for device in devices)

    async def again(device: Device) -> None:
        event = to_message(Event("bench/restart", "again", 60), Direction.TO_CLOUD)
        code = await device.ask(event)
        if code == Code.CHANGED:
            served.append(time.time())
        codes[_code_name(code)] = codes.get(_code_name(code), 0) + 1

    async with trio.open_nursery() as nursery:
        for device in devices:
            nursery.start_soon(again, device)
    _say({"served": served, "codes": codes, "cpu_seconds": time.process_time() - cpu_before,
          "sends": sum(device.sends for device in devices) - sends_before})
    # Hold the sessions until told to go (the parent reads the server's counters first).
    await stdin.receive_some()
    for device in devices:
        device.channel.close()


def _code_name(code: int | None) -> str:
    """``2.04`` for a CoAP code (RFC 7252 3), ``none`` for no answer."""
    return "none" if code is None else f"{code >> 5}.{code & 31:02d}"


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class LoadProcess:
    """One load process, driven by lines on its stdin."""

    def __init__(self, args: argparse.Namespace, port: int, ids: list[str], index: int) -> None:
        listing = args.workdir / "logs" / f"load-{index}.ids"
        listing.write_text("\n".join(ids) + "\n")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--load", "--port", str(port), "--workdir",
             str(args.workdir), "--parallel", str(args.parallel), "--device-ids", str(listing),
             "--retry", args.retry, "--seed", str(args.seed + index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("a load process exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()


# --- the run ---------------------------------------------------------------------------------


def prepare(workdir: Path, count: int) -> tuple[Path, list[str]]:
    """A data directory with one product and ``count`` provisioned devices (made once)."""
    data, _, ids = provision_product(workdir, count)
    return data, ids


def _forget_saved_sessions(data: Path) -> None:
    """Remove sealed sessions a previous run left (its devices are gone)."""
    for sealed in data.rglob(SEALED_NAME):
        sealed.unlink()


def _seconds(times: list[float], since: float) -> dict[str, float]:
    after = sorted(t - since for t in times)
    return {"p50": round(statistics.median(after), 3), "max": round(after[-1], 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    data, ids = prepare(args.workdir, args.devices)
    _forget_saved_sessions(data)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    logs = args.workdir / "logs"
    logs.mkdir(exist_ok=True)
    settings = tuple(args.set)
    first = Server(data, port, logs / "first.stats", logs / "first.log", settings)
    shares = [ids[i::args.load_procs] for i in range(args.load_procs)]
    loads = [LoadProcess(args, port, share, i) for i, share in enumerate(shares) if share]
    result: dict[str, Any] = {"devices": args.devices, "load_procs": len(loads),
                              "seed": args.seed, "settings": list(settings)}  # fmt: skip
    try:
        ready = [load.read() for load in loads]
        result["connected"] = sum(r["connected"] for r in ready)
        result["refused_before"] = [r["refused"] for r in ready if r["refused"]]
        result["connect_seconds"] = max(r["connect_seconds"] for r in ready)
        time.sleep(2.0)  # the last Describes' store writes settle (not measured)
        before = first.stats()
        result["first_process"] = {"full_handshakes": before["full_handshakes"],
                                   "resumed_handshakes": before["resumed_handshakes"],
                                   "rss_mib": round(rss_bytes(first.process.pid) / 2**20, 1)}

        sigterm = first.stop()
        exited = time.time()
        if args.control_forget:
            _forget_saved_sessions(data)
        second = Server(data, port, logs / "second.stats", logs / "second.log", settings)
        server_cpu = cpu_seconds(second.process.pid)
        for load in loads:
            load.tell("go")
        answers = [load.read() for load in loads]
        server_cpu = cpu_seconds(second.process.pid) - server_cpu
        after = second.stats()
        served = [t for a in answers for t in a["served"]]
        codes: dict[str, int] = {}
        for answer in answers:
            for code, n in answer["codes"].items():
                codes[code] = codes.get(code, 0) + n
        result.update({
            "new_handshakes_after_restart": after["full_handshakes"] + after["resumed_handshakes"],
            "served_again": len(served),
            "not_served": result["connected"] - len(served),
            "answer_codes": codes,
            "seconds_from_listen": _seconds(served, second.listening) if served else None,
            "seconds_from_sigterm": _seconds(served, sigterm) if served else None,
            "shutdown_seconds": round(exited - sigterm, 2),
            "start_seconds": round(second.listening - exited, 2),
            "saved": first.logged(r"saved (\d+) DTLS sessions"),
            "restored": after["restored"],
            "restored_logged": second.logged(r"restored (\d+) saved DTLS sessions"),
            "not_restored": after["not_restored"],
            "rss_mib_after": round(rss_bytes(second.process.pid) / 2**20, 1),
            # CPU seconds from "go" to the last answer: what bounds the time to serve.
            "server_cpu_seconds": round(server_cpu, 2),
            "load_cpu_seconds": [round(a["cpu_seconds"], 2) for a in answers],
            "requests_sent": sum(a["sends"] for a in answers),
            "retry": args.retry,
        })
        time.sleep(args.settle)  # quiet before the new process is stopped in turn
        for load in loads:
            load.tell("done")
        second.stop()
        # The new process saves the sessions again as it stops (a second restart's start);
        # it logs no "saved" line when it saved none.
        result["saved_by_new_process"] = second.logged(r"saved (\d+) DTLS sessions") or 0
        result["new_process_exit_code"] = second.process.returncode
    finally:
        for process in [*(load.process for load in loads), first.process]:
            if process.poll() is None:
                process.kill()
                process.wait()
        if "second" in locals() and second.process.poll() is None:
            second.process.kill()
            second.process.wait()
        _forget_saved_sessions(data)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--load-procs", type=int, default=2,
                        help="load processes the devices are spread over (one fd per device)")
    parser.add_argument("--parallel", type=int, default=64,
                        help="handshakes in flight per load process")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--control-forget", action="store_true",
                        help="a control run: delete the sealed sessions before the new process "
                        "starts (as after a crash); the devices' old sessions are then unknown")
    parser.add_argument(
        "--retry", choices=["every-second", "rfc7252"], default="every-second",
        help="when a device sends an unanswered request again: every second, or with "
        "RFC 7252 4.8's backoff (2-3 s, doubling)",
    )
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds of quiet before the new process is stopped in turn "
                        "(its own save count: saved_by_new_process)")
    parser.add_argument("--set", action="append", default=[],
                        help="a server setting SECTION.KEY=VALUE for both processes (ota server "
                        "--set); repeatable")
    parser.add_argument("--seed", type=int, default=int(time.time()),
                        help="seed of the backoff's random factor (load process i: seed + i)")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device-ids", help=argparse.SUPPRESS)
    if "--probe-server" in sys.argv[1:2]:
        split = sys.argv.index("--")
        probe_server(sys.argv[split + 1:], Path(sys.argv[2]))
        return
    args = parser.parse_args()
    if args.load:
        trio.run(load, args)
    else:
        print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
