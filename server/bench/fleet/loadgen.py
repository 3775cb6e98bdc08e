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

Times are ``time.monotonic()`` (CLOCK_MONOTONIC is one clock for all processes of a Linux
machine, so the runner compares them with its own).
"""

from __future__ import annotations

import gc
import json
import os
import random
import resource
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import trio
from OpenSSL import SSL

from otacore.device.emulated import DevicePhase, DeviceStatus, EmulatedDevice
from otacore.errors import RecordError, RecordHandoverError
from otacore.platforms import ModuleFunction
from otacore.protocol.link import TcpLink, Transport, UdpLink
from otacore.signing import TrustStore
from server.bench.fleet import BenchError, error_text
from server.bench.fleet.holder import HeldDevices, HoldSettings
from server.bench.fleet.lines import JsonLines
from server.bench.fleet.nginx_baseline import fetch_all
from server.bench.fleet.procs import rss_kib
from server.bench.fleet.record_devices import (
    DEVICE_STACKS,
    DeviceResumption,
    RecordDeviceRunner,
    connect_records,
)
from server.devices.keys import read_trust_file
from server.emulator.endpoints import Endpoint, endpoint_order
from server.emulator.flash import Flash
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings
from server.identity import DEVICE_CERT_FILE, DEVICE_KEY_FILE
from server.transport.client import (
    DeviceCredentials,
    connect_dtls,
    dtls_session,
    dtls_session_reused,
)
from server.transport.dtls import send_close_notify

ONLINE_PHASES = (DevicePhase.ONLINE, DevicePhase.DOWNLOADING, DevicePhase.APPLYING)
PROGRESS_INTERVAL = 0.25
_READ_SIZE = 65536


@dataclass(frozen=True)
class LoadGenSpec:
    """Everything a load generator needs (written as JSON by the runner)."""

    index: int
    creds_dir: str
    #: (device id, transport) of each device this process runs.
    devices: list[tuple[str, str]]
    state_root: str
    firmware: list[str]
    product_id: int
    target_version: int
    #: Loopback source addresses, used in turn (ephemeral ports are per source address).
    sources: list[str]
    max_connects: int
    #: ``records``: devices over our record layers (record_devices); ``openssl``: trio's
    #: DTLSEndpoint and stdlib ssl (the emulator's devices).
    device_stack: str = "records"

    def __post_init__(self) -> None:
        if self.device_stack not in DEVICE_STACKS:
            raise BenchError(
                f"device stack must be one of {', '.join(DEVICE_STACKS)}, not {self.device_stack!r}"
            )

    def dump(self, path: Path) -> None:
        """Write the spec as JSON."""
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> LoadGenSpec:
        """Read a spec written by :meth:`dump`."""
        raw = json.loads(path.read_text())
        raw["devices"] = [(d, t) for d, t in raw["devices"]]
        return cls(**raw)

    def credentials(self, device_id: str) -> DeviceCredentials:
        """The device's certificate, key and the CA that signed the server's certificate."""
        root = Path(self.creds_dir)
        return DeviceCredentials(
            root / device_id / DEVICE_CERT_FILE, root / device_id / DEVICE_KEY_FILE, root / "ca.pem"
        )

    def source(self, position: int) -> str:
        """The source address of the device at ``position``."""
        return self.sources[position % len(self.sources)]


def _ping(transport: Transport) -> list[bytes]:
    """What a device sends first: over TCP its CSM (RFC 8323 5.3) and a 7.02 Ping, over
    UDP an Empty CON (CoAP ping)."""
    link = TcpLink() if transport == "tcp" else UdpLink()
    link.ping(0.0)
    return link.take_outgoing()


class HandshakeRounds:
    """Bare handshakes of every device of one transport: connect all, hold, close all."""

    def __init__(self, spec: LoadGenSpec) -> None:
        self.spec = spec
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        self._tls_sessions: dict[str, ssl.SSLSession] = {}
        self._dtls_sessions: dict[str, SSL.Session] = {}
        #: records stack: each device's credentials and last session, per transport.
        self._resumables: dict[tuple[str, str], DeviceResumption] = {}

    async def run(
        self,
        transport: str,
        endpoints: list[Endpoint],
        *,
        resume: bool,
        concurrency: int,
        timeout: float,
    ) -> dict[str, Any]:
        """One round, each device at its first-choice endpoint; returns counts (in all and
        per endpoint), first start, last completion and per-connection times."""
        devices = [
            (position, device_id)
            for position, (device_id, kind) in enumerate(self.spec.devices)
            if kind == transport
        ]
        home = {
            device_id: endpoints[endpoint_order(device_id, endpoints)[0]]
            for _, device_id in devices
        }
        ok_by_endpoint: Counter[str] = Counter()
        slots = trio.Semaphore(concurrency)
        closers: list[Callable[[], Awaitable[None]]] = []
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        reused = 0
        starts: list[float] = []
        ends: list[float] = []
        rss_before = rss_kib(os.getpid())
        connect = self._records if self.spec.device_stack == "records" else (
            self._tls if transport == "tcp" else self._dtls
        )

        async def one(position: int, device_id: str) -> None:
            nonlocal reused
            async with slots:
                started = time.monotonic()
                starts.append(started)
                endpoint = home[device_id]
                address = endpoint.address(cast(Transport, transport))
                try:
                    with trio.fail_after(timeout):
                        closer, was_reused = await connect(
                            transport, device_id, address, position, resume
                        )
                except (
                    RecordError,
                    RecordHandoverError,
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    SSL.Error,
                    OSError,
                    ValueError,
                ) as exc:
                    errors[error_text(exc)] += 1
                    return
                done = time.monotonic()
                ends.append(done)
                latencies.append(done - started)
                reused += was_reused
                closers.append(closer)
                ok_by_endpoint[endpoint.name] += 1

        async with trio.open_nursery() as nursery:
            for position, device_id in devices:
                nursery.start_soon(one, position, device_id)
        # Every connection is up and idle: what holding them costs this process.
        gc.collect()
        rss_held = rss_kib(os.getpid())
        async with trio.open_nursery() as nursery:  # disconnect all, gracefully
            for closer in closers:
                nursery.start_soon(closer)
        return {
            "transport": transport,
            "resume": resume,
            "devices": len(devices),
            "ok": len(latencies),
            "ok_by_endpoint": dict(ok_by_endpoint),
            "reused": reused,
            "failed": sum(errors.values()),
            "errors": dict(errors.most_common(5)),
            "t_first": min(starts, default=None),
            "t_last": max(ends, default=None),
            "latencies": latencies,
            "device_stack": self.spec.device_stack,
            "loadgen_rss_before_kib": rss_before,
            "loadgen_rss_held_kib": rss_held,
        }

    async def _records(
        self, transport: str, device_id: str, address: tuple[str, int], position: int,
        resume: bool,
    ) -> tuple[Callable[[], Awaitable[None]], bool]:
        """The records stack: our handshake objects, then our record layers."""
        key = (device_id, transport)
        resumable = self._resumables.get(key)
        if resumable is None:
            resumable = self._resumables[key] = DeviceResumption(
                self.spec.credentials(device_id)
            )
        connection, was_reused = await connect_records(
            transport, address, resumable, resume=resume, source=self.spec.source(position)
        )
        try:
            # A CoAP ping answered proves the server authorised the session (as below).
            await connection.send(_ping(cast(Transport, transport)))
            await connection.receive()
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.aclose()
            raise
        if connection.session is not None:
            resumable.session = connection.session

        async def close() -> None:
            with trio.move_on_after(2.0):
                await connection.aclose()

        return close, was_reused

    async def _tls(
        self, _transport: str, device_id: str, address: tuple[str, int], position: int,
        resume: bool,
    ) -> tuple[Callable[[], Awaitable[None]], bool]:
        context = self._tls_contexts.get(device_id)
        if context is None:  # a ticket only resumes with the context that received it
            context = self._tls_contexts[device_id] = self.spec.credentials(device_id).tls_context()
        tcp = await trio.open_tcp_stream(*address, local_address=self.spec.source(position))
        stream = trio.SSLStream(tcp, context)
        try:
            session = self._tls_sessions.get(device_id) if resume else None
            if session is not None:
                stream.session = session
            await stream.do_handshake()
            # A CoAP ping answered proves the server authorised the session and runs its
            # handler; the TLS 1.3 NewSessionTicket comes before the answer (RFC 8446 4.6.1).
            await stream.send_all(b"".join(_ping("tcp")))
            if not await stream.receive_some(_READ_SIZE):
                raise trio.BrokenResourceError("the server closed the connection at once")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if stream.session is not None:
            self._tls_sessions[device_id] = stream.session

        async def close() -> None:
            with trio.move_on_after(2.0):
                try:
                    await stream.aclose()  # close_notify, then the socket
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            await trio.aclose_forcefully(stream)

        return close, bool(stream.session_reused)

    async def _dtls(
        self, _transport: str, device_id: str, address: tuple[str, int], position: int,
        resume: bool,
    ) -> tuple[Callable[[], Awaitable[None]], bool]:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            await sock.bind((self.spec.source(position), 0))
        except OSError:
            sock.close()
            raise
        endpoint = trio.DTLSEndpoint(sock)
        try:
            session = self._dtls_sessions.get(device_id) if resume else None
            channel = await connect_dtls(
                endpoint, address, self.spec.credentials(device_id), session=session
            )
        except BaseException:
            endpoint.close()
            raise
        try:
            for datagram in _ping("udp"):  # answered with an empty ACK (RFC 7252 4.3)
                await channel.send(datagram)
            await channel.receive()
        except BaseException:
            channel.close()
            endpoint.close()
            raise
        saved = dtls_session(channel)
        if saved is not None:
            self._dtls_sessions[device_id] = saved

        async def close() -> None:
            # trio sends no close_notify itself (RFC 6347 4.2.7: a DTLS session ends with it)
            with trio.move_on_after(1.0):
                with suppress(SSL.Error, OSError, trio.BrokenResourceError):
                    await send_close_notify(channel)
            channel.close()
            endpoint.close()

        return close, dtls_session_reused(channel)


class FleetDriver:
    """This process's devices as an EmulatedFleet, with progress reports to the runner."""

    def __init__(self, spec: LoadGenSpec, lines: JsonLines) -> None:
        self.spec = spec
        self.lines = lines
        self.kinds = dict(spec.devices)
        self.fleet: EmulatedFleet | None = None
        self.scope: trio.CancelScope | None = None
        self.bytes_received = 0
        self.online: dict[str, bool] = {}
        self.online_count = 0
        self.first_online: dict[str, float] = {}
        self.updated: dict[str, float] = {}
        #: Device id -> the endpoint (node) it was connected to when it verified the update.
        self.updated_at: dict[str, str] = {}
        #: Device id -> [download started, download ended] times.
        self.stages: dict[str, list[float]] = {}
        self.outcomes: Counter[str] = Counter()
        #: Why sessions ended (a lost link, an unanswered Hello or keep-alive, the server's
        #: close), by transport and reason, counted at every end but a reboot's.
        self.errors_seen: Counter[str] = Counter()
        self._unreported: list[tuple[str, float]] = []
        self._dirty = trio.Event()

    def members(self) -> list[FleetMember]:
        """The fleet members (device ids, credentials, flash directories, transports)."""
        root = Path(self.spec.state_root)
        return [
            FleetMember(
                device_id, self.spec.credentials(device_id), root / device_id, cast(Transport, kind)
            )
            for device_id, kind in self.spec.devices
        ]

    def images(self) -> tuple[bytes, ...]:
        """The modules a device starts with."""
        return tuple(Path(path).read_bytes() for path in self.spec.firmware)

    def trust_store(self) -> TrustStore:
        """The product's signing keys, as provisioning wrote them next to the credentials."""
        keys = read_trust_file(Path(self.spec.creds_dir) / "signing-keys.txt")
        return TrustStore.initial(self.spec.product_id, keys)

    def provision(self) -> int:
        """Factory-program every flash that is empty (blocking; a worker thread runs it)."""
        images, store = self.images(), self.trust_store()
        programmed = 0
        for device_id, _ in self.spec.devices:
            flash = Flash.open(Path(self.spec.state_root) / device_id, fsync=False)
            if not flash.boot_record().active:
                flash.provision(images, store)
                programmed += 1
        return programmed

    def open(self, endpoints: list[Endpoint]) -> None:
        """Build the fleet over the nodes' ``endpoints`` and open its flashes (blocking; a
        worker thread runs it)."""
        settings = FleetSettings(
            endpoints=tuple(endpoints),
            firmware=self.images(),
            trust_store=self.trust_store(),
            fsync=False,
            max_concurrent_connects=self.spec.max_connects,
            connect_timeout=10.0,
            backoff_initial=0.2,
            backoff_max=5.0,
            reboot_delay=0.1,
            keepalive_interval=60.0,
            keepalive_timeout=30.0,
            hello_timeout=60.0,
        )
        fleet = EmulatedFleet(self.members(), settings, on_status=self._on_status)
        fleet.open()
        if self.spec.device_stack == "records":
            # The same devices and loop, over our record layers (record_devices).
            slots = trio.Semaphore(settings.max_concurrent_connects)
            for device_id, runner in list(fleet.runners.items()):
                fleet.runners[device_id] = RecordDeviceRunner(
                    runner.device, runner.link, connect_slots=slots,
                    rng=random.Random(), wall_clock=settings.wall_clock,
                )  # fmt: skip
        for device_id, runner in fleet.runners.items():
            self._count_received(runner.device)
            self._count_session_ends(runner.device, self.kinds[device_id])
        self.fleet = fleet

    def _count_received(self, device: EmulatedDevice) -> None:
        """Count every byte the device's link delivers (CoAP messages after TLS/DTLS)."""
        deliver = device.receive

        def receive(data: bytes, now: float) -> None:
            self.bytes_received += len(data)
            deliver(data, now)

        device.receive = receive  # type: ignore[method-assign]  # instrumentation only

    def _count_session_ends(self, device: EmulatedDevice, kind: str) -> None:
        """Count why each of the device's sessions ended (the runner reports every end
        except a reboot through ``disconnected``)."""
        disconnected = device.disconnected

        def count_then_disconnect(now: float, reason: str) -> None:
            self.errors_seen[f"{kind}: {reason[:100]}"] += 1
            disconnected(now, reason)

        device.disconnected = count_then_disconnect  # type: ignore[method-assign]

    def _on_status(self, status: DeviceStatus) -> None:
        now = time.monotonic()
        device_id = status.device_id
        online = status.phase in ONLINE_PHASES
        if online != self.online.get(device_id, False):
            self.online[device_id] = online
            self.online_count += 1 if online else -1
            if online:
                self.first_online.setdefault(device_id, now)
        self._note_stage(device_id, status.phase, now)
        result = status.last_result
        if result is not None and device_id not in self.updated:
            target = self.spec.target_version
            if (
                result.status == "committed"
                and result.function == ModuleFunction.USER_PART
                and result.version == target
                and status.product_version == target
            ):
                self.updated[device_id] = now
                self._unreported.append((device_id, now))
                if self.fleet is not None:
                    self.updated_at[device_id] = self.fleet.endpoint_of(device_id).name
            elif result.status != "committed":
                self.outcomes[f"{result.status}: {result.detail}"] += 1
        self._dirty.set()

    def _note_stage(self, device_id: str, phase: DevicePhase, now: float) -> None:
        """When the update reached each stage: the download started, the download ended
        (applying or rebooting); then ``updated`` (back online: its Hello answered is what
        commits the new image)."""
        stages = self.stages.setdefault(device_id, [])
        if not stages:
            if phase is DevicePhase.DOWNLOADING:
                stages.append(now)
        elif len(stages) == 1 and phase is not DevicePhase.DOWNLOADING:
            stages.append(now)

    async def run(self, *, task_status: trio.TaskStatus[float]) -> None:
        """Run the fleet and report progress until :meth:`stop`."""
        if self.fleet is None:
            raise BenchError("fleet_run before fleet_open")
        with trio.CancelScope() as scope:
            self.scope = scope
            async with trio.open_nursery() as nursery:
                started = time.monotonic()
                await nursery.start(self.fleet.run)
                nursery.start_soon(self._report)
                task_status.started(started)

    async def _report(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            updated, self._unreported = self._unreported, []
            fleet = self.fleet
            await self.lines.write(
                {
                    "event": "progress",
                    "online": self.online_count,
                    "updated": updated,
                    "bytes": self.bytes_received,
                    "outcomes": dict(self.outcomes),
                    "crashed": dict(list(fleet.crashed.items())[:3]) if fleet else {},
                }
            )
            await trio.sleep(PROGRESS_INTERVAL)

    def stop(self) -> None:
        """Cancel the fleet (a power cut for every device) and drop it."""
        if self.scope is not None:
            self.scope.cancel()
        self.fleet = None

    def stats(self) -> dict[str, Any]:
        """Counters and per-device times so far."""
        return {
            "online": self.online_count,
            "bytes": self.bytes_received,
            "first_online": sorted(self.first_online.values()),
            "updated": sorted(self.updated.values()),
            "updated_by_transport": {
                kind: sorted(t for d, t in self.updated.items() if self.kinds[d] == kind)
                for kind in sorted(set(self.kinds.values()))
            },
            "outcomes": dict(self.outcomes),
            "stages_by_transport": {
                kind: [
                    [*stages, self.updated[device_id]]
                    for device_id, stages in self.stages.items()
                    if len(stages) == 2
                    and device_id in self.updated
                    and self.kinds[device_id] == kind
                ]
                for kind in sorted(set(self.kinds.values()))
            },
            "online_by_endpoint": self.fleet.online_by_endpoint() if self.fleet else {},
            "updated_by_endpoint": dict(Counter(self.updated_at.values())),
            "failovers": sum(r.failovers for r in self.fleet.runners.values())
            if self.fleet
            else 0,
            "connect_errors": dict(self._connect_errors().most_common(5)),
            "errors_seen": dict(self.errors_seen),
            "not_updated": self._not_updated(),
        }

    def _not_updated(self) -> dict[str, dict[str, int]]:
        """Devices not (yet) updated: by transport and phase, and their last errors."""
        phases: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        if self.fleet is not None:
            for device_id, runner in self.fleet.runners.items():
                if device_id not in self.updated:
                    status = runner.device.status()
                    phases[f"{self.kinds[device_id]} {status.phase.value}"] += 1
                    if status.last_error:
                        errors[status.last_error[:120]] += 1
        return {"phases": dict(phases), "last_errors": dict(errors.most_common(5))}

    def _connect_errors(self) -> Counter[str]:
        """Devices by the last error of a failed connection attempt (if they had one)."""
        errors: Counter[str] = Counter()
        if self.fleet is not None:
            for runner in self.fleet.runners.values():
                if runner.last_connect_error:
                    errors[f"{runner.link.transport}: {runner.last_connect_error[:120]}"] += 1
        return errors


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
