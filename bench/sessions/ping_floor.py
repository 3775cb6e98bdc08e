"""The floor under a keep-alive ping: the same path with nothing of ours (benchmark script).

    .venv/bin/python bench/sessions/ping_floor.py [--pings 20000] [--rate 1000] [--loops 200000]

Three figures, each in microseconds of server CPU per ping, to set beside
``plane_ping_cost.py`` (the real ``ota server``):

1. **echo servers in their own process** (CPU from /proc/<pid>/stat, user + system), answering
   one small datagram or TCP segment per ping, pings paced at ``--rate`` per second as in
   ``plane_ping_cost.py`` (so each ping wakes the server on its own):
   ``blocking-udp`` (plain ``socket.recvfrom``/``sendto``, no event loop: the kernel's and
   CPython's floor), ``trio-udp`` (a trio task on a trio UDP socket: one trio wake-up per
   datagram), ``trio-udp-lowlevel`` (a plain non-blocking socket, ``trio.lowlevel.wait_readable``
   then ``recvfrom``/``sendto`` until it would block: the pattern of the server's UDP endpoint),
   ``trio-tcp`` (a trio task on one TCP stream), ``trio-tcp-2000`` (the same with 2,000 more
   idle streams, each with a server task waiting to read), ``trio-udp-2000`` (the same trio
   UDP echo while 2,000 other idle UDP sockets are open in the server, as a server holding
   sessions has file descriptors, to show whether trio's wake-up grows with them).
2. **record protection in one process** (timeit, ``--loops``): a bare `cryptography` AES-128-GCM
   open + seal of a CoAP ping's size, the same with the AEAD objects made per call (as the
   record layer does after ``release_aeads()``), and our ``DtlsRecordLayer.open_datagram`` +
   ``seal`` of the same ping.

Results as JSON on stdout (and ``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

from bench_common import cpu_seconds
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from otacore.records.dtls12 import DtlsRecordLayer
from otacore.records.tls12_keys import SUITES, TrafficKeys

#: An Empty CON CoAP message (RFC 7252 4.3), what a UDP device sends as a keep-alive.
COAP_PING = bytes([0x40, 0x00, 0x12, 0x34])
COAP_RESET = bytes([0x70, 0x00, 0x12, 0x34])

_SERVER = r'''
import socket, sys
mode, port_file = sys.argv[1], sys.argv[2]
if mode == "blocking-udp":
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    open(port_file, "w").write(str(sock.getsockname()[1]))
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)
import trio
async def main():
    if mode == "trio-udp-lowlevel":  # the UDP endpoint's pattern: wait, then plain calls
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        open(port_file, "w").write(str(sock.getsockname()[1]))
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, peer = sock.recvfrom(2048)
                except BlockingIOError:
                    break
                sock.sendto(data, peer)
    if mode.startswith("trio-udp"):
        held = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(
            int(mode.split("-")[2]) if mode.count("-") == 2 else 0)]
        for extra in held:
            extra.bind(("127.0.0.1", 0))
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        open(port_file, "w").write(str(sock.getsockname()[1]))
        while True:
            data, peer = await sock.recvfrom(2048)
            await sock.sendto(data, peer)
    else:
        async def echo(stream):
            async for data in stream:
                await stream.send_all(data)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        open(port_file, "w").write(str(listeners[0].socket.getsockname()[1]))
        await trio.serve_listeners(echo, listeners)
trio.run(main)
'''


def user_system_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def echo_server_cost(mode: str, pings: int, rate: float, workdir: Path) -> dict[str, Any]:
    """Server CPU per ping of an echo server of kind ``mode`` in its own process."""
    port_file = workdir / f"port-{mode}"
    port_file.unlink(missing_ok=True)
    idle_streams: list[socket.socket] = []
    server = subprocess.Popen([sys.executable, "-c", _SERVER, mode, str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the {mode} echo server did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        # trio-tcp-2000: 2,000 more streams held open and idle, each with a server task
        # waiting to read (registered in trio's epoll set), as a TLS server's sessions are.
        idle_streams = [socket.create_connection(("127.0.0.1", port))
                        for _ in range(2000 if mode == "trio-tcp-2000" else 0)]
        if mode.startswith("trio-tcp"):
            client = socket.create_connection(("127.0.0.1", port))
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.connect(("127.0.0.1", port))
        with client:
            client.settimeout(2.0)
            for _ in range(100 + len(idle_streams) // 10):  # warm-up, not measured
                client.send(COAP_PING)
                client.recv(2048)
            before = cpu_seconds(server.pid)
            user_before, system_before = user_system_seconds(server.pid)
            started = time.perf_counter()
            interval = 1.0 / rate
            for index in range(pings):
                client.send(COAP_PING)
                client.recv(2048)
                pause = started + (index + 1) * interval - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            elapsed = time.perf_counter() - started
            spent = cpu_seconds(server.pid) - before
            user_after, system_after = user_system_seconds(server.pid)
    finally:
        for stream in idle_streams:
            stream.close()
        server.kill()
        server.wait()
    return {"mode": mode, "pings": pings, "seconds": round(elapsed, 2),
            "server_cpu_s": round(spent, 3), "us_per_ping": round(spent / pings * 1e6, 1),
            "user_us_per_ping": round((user_after - user_before) / pings * 1e6, 1),
            "system_us_per_ping": round((system_after - system_before) / pings * 1e6, 1)}


def record_costs(loops: int) -> dict[str, float]:
    """Microseconds per ping of opening the ping's record and sealing the answer's."""
    suite = SUITES[0]  # ECDHE-ECDSA-AES128-GCM-SHA256, what the server's DTLS picks first
    keys = TrafficKeys(suite, os.urandom(16), os.urandom(16), os.urandom(4), os.urandom(4))
    device = DtlsRecordLayer(keys, is_server=False)
    server = DtlsRecordLayer(keys, is_server=True)
    records = [device.seal(COAP_PING) for _ in range(loops)]
    feed = iter(records)

    def ours() -> None:
        server.open_datagram(next(feed))
        server.seal(COAP_RESET)

    key, salt = keys.client_write_key, keys.client_write_iv
    aead = AESGCM(key)
    aad = bytes(13)
    sealed = aead.encrypt(salt + bytes(8), COAP_PING, aad)

    def bare() -> None:
        aead.decrypt(salt + bytes(8), sealed, aad)
        aead.encrypt(salt + bytes(8), COAP_RESET, aad)

    def bare_fresh_aeads() -> None:
        AESGCM(key).decrypt(salt + bytes(8), sealed, aad)
        AESGCM(key).encrypt(salt + bytes(8), COAP_RESET, aad)

    out = {}
    for name, call in (("aesgcm_open_seal", bare),
                       ("aesgcm_open_seal_new_objects", bare_fresh_aeads),
                       ("dtls_layer_open_seal", ours)):
        out[name + "_us"] = round(min(timeit.repeat(call, number=loops // 5, repeat=5))
                                  / (loops // 5) * 1e6, 2)
    feed = iter(device.seal(COAP_PING) for _ in range(loops))

    def ours_released() -> None:
        server.release_aeads()  # what an idle session's ping meets: AEADs rebuilt
        server.open_datagram(next(feed))
        server.seal(COAP_RESET)

    out["dtls_layer_open_seal_after_release_us"] = round(
        min(timeit.repeat(ours_released, number=loops // 5, repeat=5)) / (loops // 5) * 1e6, 2)
    return out


def main() -> None:
    """Run the floors and print them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pings", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--loops", type=int, default=200000)
    parser.add_argument("--modes", nargs="*",
                        default=["blocking-udp", "trio-udp", "trio-udp-lowlevel", "trio-udp-2000",
                                 "trio-tcp", "trio-tcp-2000"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/otacloud-bench-ping-floor"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"load_before": os.getloadavg()[0],
                              "records": record_costs(args.loops)}
    print(json.dumps(result["records"]), flush=True)
    result["echo"] = []
    for mode in args.modes:
        row = echo_server_cost(mode, args.pings, args.rate, args.workdir)
        print(json.dumps(row), flush=True)
        result["echo"].append(row)
    result["load_after"] = os.getloadavg()[0]
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
