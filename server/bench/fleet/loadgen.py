"""A load-generator process of the fleet benchmark: ``python -m server.bench.fleet.loadgen SPEC``.

It runs its share of the benchmark's devices and obeys the runner's commands, one JSON
object per line on stdin, answering each (``{"reply": id, ...}``, or ``{"reply": id,
"error": ...}``) and reporting the fleet's progress (``{"event": "progress", ...}``) on
stdout. Commands:

* ``prepare``: factory-program every device's flash (system part, application v1, trust);
* ``handshakes`` (transport, endpoints, resume, concurrency, timeout): connect every device
  of that transport, at its first-choice endpoint (:mod:`server.emulator.endpoints`), with a
  bare TLS 1.3 / DTLS 1.2 client (mutual authentication with its own
  certificate), hold all connections until the last is up, then close them all; ``resume``
  offers each device's session from the previous round (RFC 8446 section 2.2 tickets for
  TLS, RFC 5077 tickets for DTLS); the reply includes this process's RSS before the round and
  while every connection was held;
* ``fleet_open`` (endpoints: ``[[tcp, udp], ...]``, one per server node) / ``fleet_run`` /
  ``fleet_stop``: the devices as an :class:`~server.emulator.fleet.EmulatedFleet` spread over
  the nodes (each device at its first choice, failing over to the others);
* ``fleet_stats``: bytes received and per-device times, devices online and updated per node;
* ``fetch`` (host, port, path, clients, expect): HTTPS GETs by that many concurrent clients;
* ``hold_start`` (tcp, udp, seed and :class:`~server.bench.fleet.holder.HoldSettings`) /
  ``hold_stats`` / ``hold_stop``: every device held connected, pinging at its keep-alive
  interval, and the counters so far (:mod:`server.bench.fleet.holder`);
* ``quit``.

The spec's ``device_stack`` chooses the devices' sessions: ``records`` (default) runs them
over the project's record layers (``record_devices``: OpenSSL only for handshakes, one plain
socket per device), ``openssl`` over trio's DTLSEndpoint and stdlib ``ssl`` as the emulator
does. The CoAP/OTA side is the same either way.

This module is the process: its command loop and entry point. The commands' work is in
:mod:`server.bench.fleet.bare_handshakes` (``handshakes``),
:mod:`server.bench.fleet.fleet_driver` (``prepare``, ``fleet_*``),
:mod:`server.bench.fleet.nginx_baseline` (``fetch``) and :mod:`server.bench.fleet.holder`
(``hold_*``); the spec is :mod:`server.bench.fleet.loadgen_spec`.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC is one clock for all processes of a Linux
machine, so the runner compares them with its own).
"""

from __future__ import annotations

import os
import resource
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio
from OpenSSL import SSL

from server.bench.fleet import BenchError, error_text
from server.bench.fleet.bare_handshakes import HandshakeRounds
from server.bench.fleet.fleet_driver import FleetDriver
from server.bench.fleet.holder import HeldDevices, HoldSettings
from server.bench.fleet.lines import JsonLines
from server.bench.fleet.loadgen_spec import LoadGenSpec
from server.bench.fleet.nginx_baseline import fetch_all
from server.emulator.endpoints import Endpoint


class LoadGenerator:
    """The command loop of one load-generator process."""

    def __init__(self, spec: LoadGenSpec, lines: JsonLines) -> None:
        self.spec = spec
        self.lines = lines
        self.handshakes = HandshakeRounds(spec)
        self.driver = FleetDriver(spec, lines)
        self.held: HeldDevices | None = None

    async def serve(self) -> None:
        """Obey commands until ``quit`` or the end of stdin (the runner is gone)."""
        async with trio.open_nursery() as nursery:
            while True:
                request = await self.lines.read()
                if request is None:
                    break
                command = str(request.get("cmd"))
                try:
                    reply = await self.handle(command, request, nursery)
                except (BenchError, OSError, ValueError, SSL.Error) as exc:
                    reply = {"error": f"load generator {self.spec.index}: {error_text(exc)}"}
                await self.lines.write({"reply": request.get("id"), **reply})
                if command == "quit":
                    break
            self.driver.stop()
            if self.held is not None:
                self.held.stop()
            nursery.cancel_scope.cancel()

    async def handle(
        self, command: str, request: dict[str, Any], nursery: trio.Nursery
    ) -> dict[str, Any]:
        """Carry out one command; returns the reply's fields."""
        if command == "prepare":
            return {"programmed": await trio.to_thread.run_sync(self.driver.provision)}
        if command == "handshakes":
            return await self.handshakes.run(
                request["transport"],
                _endpoints(request["endpoints"]),
                resume=bool(request["resume"]),
                concurrency=int(request["concurrency"]),
                timeout=float(request["timeout"]),
            )
        if command == "fleet_open":
            endpoints = _endpoints(request["endpoints"])
            await trio.to_thread.run_sync(self.driver.open, endpoints)
            return {"devices": len(self.spec.devices)}
        if command == "fleet_run":
            return {"started": await nursery.start(self.driver.run)}
        if command == "fleet_stats":
            return self.driver.stats()
        if command == "fleet_stop":
            self.driver.stop()
            return {"stopped": True}
        if command == "fetch":
            return await fetch_all(
                _address(request["address"]),
                request["path"],
                clients=int(request["clients"]),
                concurrency=int(request["concurrency"]),
                expect=int(request["expect"]),
                sources=self.spec.sources,
                timeout=float(request["timeout"]),
            )
        if command == "hold_start":
            if self.held is not None:
                raise BenchError("hold_start twice")
            settings = HoldSettings.from_request(request)
            self.held = HeldDevices(
                self.spec.devices, self.spec.credentials, self.spec.sources, int(request["seed"])
            )
            addresses = {"tcp": _address(request["tcp"]), "udp": _address(request["udp"])}
            return {"started": await nursery.start(self.held.run, settings, addresses)}
        if command == "hold_stats":
            if self.held is None:
                raise BenchError("hold_stats before hold_start")
            return self.held.stats()
        if command == "hold_stop":  # every session closed (close_notify) before the reply
            if self.held is not None:
                self.held.stop()
                with trio.move_on_after(float(request.get("timeout", 60.0))):
                    await self.held.finished.wait()
            return {"stopped": self.held is None or self.held.finished.is_set()}
        if command == "quit":
            return {}
        raise BenchError(f"unknown command {command!r}")


def _address(value: list[Any]) -> tuple[str, int]:
    host, port = value
    return str(host), int(port)


def _endpoints(value: list[Any]) -> list[Endpoint]:
    """``[[tcp address, udp address], ...]`` (one per server node) as endpoints."""
    return [Endpoint(_address(tcp), _address(udp)) for tcp, udp in value]


async def _main(spec: LoadGenSpec) -> None:
    lines = JsonLines(trio.lowlevel.FdStream(os.dup(0)), trio.lowlevel.FdStream(os.dup(1)))
    await LoadGenerator(spec, lines).serve()


def raise_descriptor_limit(devices: int) -> int:
    """Let this process open a descriptor per device and some to spare (one socket each):
    the soft limit up to the hard one, and the hard one too where allowed (root). Returns
    the soft limit now in force."""
    wanted = devices + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with suppress(ValueError, OSError):  # not privileged: keep the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m server.bench.fleet.loadgen SPEC.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m server.bench.fleet.loadgen SPEC.json")
    spec = LoadGenSpec.load(Path(args[0]))
    limit = raise_descriptor_limit(len(spec.devices))
    if limit < len(spec.devices) + 256:
        print(
            f"load generator {spec.index}: {len(spec.devices)} devices but at most {limit} "
            "open files (one socket per device): raise the hard limit (ulimit -Hn) or use "
            "more load generators",
            file=sys.stderr,
        )
    with suppress(KeyboardInterrupt):  # Ctrl-C reaches the process group; the runner cleans up
        trio.run(_main, spec)


if __name__ == "__main__":
    main()
