"""Many emulated devices in one process: the Python API of ``ota device emulate``, the demo
and the fleet benchmark.

Each device is an :class:`~otacore.device.emulated.EmulatedDevice` on its own
:class:`~server.emulator.flash.Flash` (``<state root>/<device id>/``), run by a
:class:`~server.emulator.device.DeviceRunner`. All runners share one trio nursery and one
semaphore bounding concurrent handshakes (``max_concurrent_connects``), so thousands of
devices start without a handshake storm. With several ``endpoints`` (the nodes of one
installation) each device starts at its first choice by rendezvous hashing
(:mod:`server.emulator.endpoints`) and fails over along its own order; the summary counts the
devices online at each endpoint. Progress is reported two ways: ``on_status`` runs on
every device's phase or result change, ``on_progress`` every ``progress_interval`` seconds
with a :class:`FleetSummary`.

Typical use::

    fleet = EmulatedFleet.from_credentials(creds_dir, state_root, settings, count=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(fleet.run)
        await fleet.wait_until(lambda f: f.summary().online == 100, timeout=60)
        nursery.cancel_scope.cancel()
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import trio

from otacore.delta import NEWEST_VERSION as NEWEST_DELTA_FORMAT
from otacore.device.emulated import DeviceConfig, DevicePhase, DeviceStatus, EmulatedDevice
from otacore.errors import NotFoundError, ValidationError
from otacore.module import parse_module
from otacore.protocol.link import Transport
from otacore.signing import TrustStore
from server.emulator.device import DeviceRunner, LinkSettings
from server.emulator.endpoints import Endpoint, check_endpoints, endpoint_order
from server.emulator.flash import Flash
from server.identity import (
    CA_CERT_FILE,
    DEVICE_CERT_FILE,
    DEVICE_ID_PATTERN,
    DEVICE_KEY_FILE,
)
from server.transport.client import DeviceCredentials

TransportChoice = Literal["tcp", "udp", "both"]
logger = logging.getLogger("otacloud.emulator")


@dataclass(frozen=True)
class FleetMember:
    """One device of the fleet: its identity files, its flash directory, its transport."""

    device_id: str
    credentials: DeviceCredentials
    state_dir: Path
    transport: Transport


@dataclass(frozen=True)
class FleetSettings:
    """How every device of the fleet behaves (times in seconds)."""

    server: tuple[str, int] = ("127.0.0.1", 5684)
    #: The DTLS endpoint when it is not ``server`` (the same port serves both by default).
    udp_server: tuple[str, int] | None = None
    #: Several server nodes (each device starts at one and fails over to the others, see
    #: :mod:`server.emulator.endpoints`); when given, ``server`` and ``udp_server`` are unused.
    endpoints: tuple[Endpoint, ...] = ()
    #: Module images a device with an empty flash starts with (factory programming).
    firmware: tuple[bytes, ...] = ()
    #: Trust store a device with an empty flash is provisioned with.
    trust_store: TrustStore | None = None
    #: fsync flash writes (power-loss safety); False for benchmarks (SIGKILL-safe still).
    fsync: bool = True
    max_concurrent_connects: int = 32
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    reboot_delay: float = 0.1
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 10.0
    hello_timeout: float = 30.0
    heartbeat_interval: float | None = None
    product_id: int | None = None
    max_binary_size: int = 1024 * 1024
    ota_chunk_size: int | None = None
    progress_interval: float = 1.0
    #: Devices announce compressed OTA and inflate zstd-compressed images.
    compressed_ota: bool = True
    #: Largest zstd window (log2 bytes) a device inflates a compressed image with.
    max_zstd_window_log: int = 17
    #: Devices take key rotation statements mid-session (Hello ``key_push``); False
    #: emulates older firmware, which the server makes reconnect to learn a rotation.
    key_push: bool = True
    #: The newest delta patch format the devices' applier reads (Hello ``delta_format``);
    #: None: they name none, as older firmware did (otacore.device.emulated_api).
    delta_format: int | None = NEWEST_DELTA_FORMAT
    #: Devices have a real-time clock (set from this host's): they check the expiry of
    #: downgrade authorisations. False: clockless devices (see otacore.downgrade).
    wall_clock: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrent_connects < 1:
            raise ValidationError("max_concurrent_connects must be at least 1")
        if not self.progress_interval > 0:
            raise ValidationError("progress_interval must be positive")
        check_endpoints(self.node_endpoints())

    def node_endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints devices spread over: ``endpoints``, or the one of ``server``."""
        return self.endpoints or (Endpoint(self.server, self.udp_server),)


@dataclass(frozen=True)
class FleetSummary:
    """Counts over the whole fleet."""

    devices: int
    phases: Counter[DevicePhase] = field(default_factory=Counter)
    #: (module function, index, version) -> devices running it.
    versions: Counter[tuple[int, int, int]] = field(default_factory=Counter)
    #: last result status ("committed", "rolled_back", "failed") -> devices.
    results: Counter[str] = field(default_factory=Counter)
    bytes_received: int = 0
    bytes_total: int = 0
    #: Endpoint name -> devices online there (every endpoint, zeros included).
    endpoints: dict[str, int] = field(default_factory=dict)

    @property
    def online(self) -> int:
        """Devices with a session whose Hello was answered (downloading/applying included)."""
        return sum(
            self.phases[p]
            for p in (DevicePhase.ONLINE, DevicePhase.DOWNLOADING, DevicePhase.APPLYING)
        )

    def running(self, function: int, index: int, version: int) -> int:
        """Devices running this module version."""
        return self.versions[(function, index, version)]

    def line(self) -> str:
        """A one-line text form for terminals and logs."""
        phases = ", ".join(
            f"{p.value} {n}" for p, n in sorted(self.phases.items(), key=lambda kv: kv[0].value)
        )
        results = ", ".join(f"{k} {n}" for k, n in sorted(self.results.items()))
        progress = ""
        if self.bytes_total:
            progress = f"; download {100 * self.bytes_received / self.bytes_total:.0f}%"
        at = ""
        if len(self.endpoints) > 1:
            at = "; online at " + ", ".join(f"{name} {n}" for name, n in self.endpoints.items())
        text = f"{self.devices} devices: {phases}" + (f"; {results}" if results else "")
        return text + progress + at


def find_credentials(
    creds_dir: Path, count: int | None = None
) -> list[tuple[str, DeviceCredentials]]:
    """The first ``count`` (all when None) provisioned devices in ``creds_dir``, by device id.

    ``creds_dir`` is what :func:`server.identity.provision_devices` wrote: ``ca.pem`` and
    ``<device id>/cert.pem``, ``key.pem``.
    """
    creds_dir = Path(creds_dir)
    ca_path = creds_dir / CA_CERT_FILE
    if not ca_path.is_file():
        raise NotFoundError(
            f"{ca_path} is missing: is {creds_dir} a provisioned device directory "
            "(ota device provision --out)?"
        )
    found = []
    for entry in sorted(creds_dir.iterdir()):
        cert, key = entry / DEVICE_CERT_FILE, entry / DEVICE_KEY_FILE
        if DEVICE_ID_PATTERN.fullmatch(entry.name) and cert.is_file() and key.is_file():
            found.append((entry.name, DeviceCredentials(cert, key, ca_path)))
            if count is not None and len(found) == count:
                break
    if not found:
        raise NotFoundError(
            f"no provisioned device (a <device id>/cert.pem, key.pem) in {creds_dir}"
        )
    if count is not None and len(found) < count:
        raise NotFoundError(
            f"{creds_dir} holds {len(found)} provisioned devices, {count} requested"
        )
    return found


def transports_for(choice: TransportChoice, count: int) -> list[Transport]:
    """Each device's transport: all TCP, all UDP, or alternating (``both``)."""
    if choice == "both":
        return ["tcp" if i % 2 == 0 else "udp" for i in range(count)]
    if choice not in ("tcp", "udp"):
        raise ValidationError(f"transport must be tcp, udp or both, not {choice!r}")
    return [choice] * count


class EmulatedFleet:
    """Many emulated devices in one trio nursery (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[FleetMember],
        settings: FleetSettings,
        *,
        on_status: Callable[[DeviceStatus], None] | None = None,
        on_progress: Callable[[FleetSummary], None] | None = None,
        seed: int | None = None,
    ) -> None:
        if len({m.device_id for m in members}) != len(members):
            raise ValidationError("a device appears twice in the fleet")
        self.members = list(members)
        self.settings = settings
        self.on_status = on_status
        self.on_progress = on_progress
        self.runners: dict[str, DeviceRunner] = {}
        self.endpoints = settings.node_endpoints()
        #: Device id -> indexes of ``endpoints`` in the order the device tries them.
        self.endpoint_orders: dict[str, list[int]] = {}
        #: Devices stopped by an unexpected error: device id -> the error (a bug to report).
        self.crashed: dict[str, str] = {}
        self._latest: dict[str, DeviceStatus] = {}  # each device's last reported status
        self._rng = random.Random(seed)
        self._changed = trio.Event()

    @classmethod
    def from_credentials(
        cls,
        creds_dir: Path,
        state_root: Path,
        settings: FleetSettings,
        *,
        count: int | None = None,
        transport: TransportChoice = "tcp",
        on_status: Callable[[DeviceStatus], None] | None = None,
        on_progress: Callable[[FleetSummary], None] | None = None,
    ) -> EmulatedFleet:
        """A fleet of the first ``count`` devices provisioned in ``creds_dir``; device ``X``
        keeps its flash in ``state_root/X``."""
        found = find_credentials(creds_dir, count)
        members = [
            FleetMember(device_id, creds, Path(state_root) / device_id, kind)
            for (device_id, creds), kind in zip(
                found, transports_for(transport, len(found)), strict=True
            )
        ]
        return cls(members, settings, on_status=on_status, on_progress=on_progress)

    # --- setting up ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (and, when empty, provision) every device's flash; make the runners.

        Blocking file I/O: :meth:`run` calls it in a worker thread. Idempotent.
        """
        if self.runners:
            return
        settings = self.settings
        slots = trio.Semaphore(settings.max_concurrent_connects)
        for member in self.members:
            flash = Flash.open(member.state_dir, fsync=settings.fsync)
            if not flash.boot_record().active:
                self._provision(flash, member)
            device = EmulatedDevice(self._config(member, flash), flash, on_status=self._status)
            order = endpoint_order(member.device_id, self.endpoints)
            self.endpoint_orders[member.device_id] = order
            addresses = [self.endpoints[i].address(member.transport) for i in order]
            link = LinkSettings(
                addresses[0],
                member.transport,
                member.credentials,
                connect_timeout=settings.connect_timeout,
                backoff_initial=settings.backoff_initial,
                backoff_max=settings.backoff_max,
                reboot_delay=settings.reboot_delay,
                fallbacks=tuple(addresses[1:]),
            )
            rng = random.Random(self._rng.random())
            self.runners[member.device_id] = DeviceRunner(
                device, link, connect_slots=slots, rng=rng, wall_clock=settings.wall_clock
            )

    def _provision(self, flash: Flash, member: FleetMember) -> None:
        settings = self.settings
        if not settings.firmware:
            raise ValidationError(
                f"device {member.device_id} has an empty flash in "
                f"{member.state_dir}: give the firmware it starts with"
            )
        if settings.trust_store is None:
            raise ValidationError(
                f"device {member.device_id} has an empty flash: give the "
                "product's firmware signing keys (trust store)"
            )
        flash.provision(settings.firmware, settings.trust_store)

    def _config(self, member: FleetMember, flash: Flash) -> DeviceConfig:
        platforms = {
            state.platform_id
            for pair in flash.slot_states().values()
            for state in pair
            if state.valid
        }
        if len(platforms) != 1:
            raise ValidationError(
                f"device {member.device_id}: its modules name platforms "
                f"{sorted(p for p in platforms if p is not None)}; need exactly one"
            )
        (platform_id,) = platforms
        assert platform_id is not None
        s = self.settings
        return DeviceConfig(
            member.device_id,
            platform_id,
            product_id=s.product_id,
            max_binary_size=s.max_binary_size,
            ota_chunk_size=s.ota_chunk_size,
            keepalive_interval=s.keepalive_interval,
            keepalive_timeout=s.keepalive_timeout,
            hello_timeout=s.hello_timeout,
            heartbeat_interval=s.heartbeat_interval,
            compressed_ota=s.compressed_ota,
            max_zstd_window_log=s.max_zstd_window_log,
            key_push=s.key_push,
            delta_format=s.delta_format,
        )

    # --- running ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[EmulatedFleet] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the flashes, start every device, report started, run until cancelled."""
        await trio.to_thread.run_sync(self.open)
        async with trio.open_nursery() as nursery:
            for device_id, runner in self.runners.items():
                nursery.start_soon(self._run_device, device_id, runner)
            if self.on_progress is not None:
                nursery.start_soon(self._report_progress)
            task_status.started(self)

    async def _run_device(self, device_id: str, runner: DeviceRunner) -> None:
        """Run one device; a bug in one device stops that device, not the whole fleet."""
        try:
            await runner.run()
        except Exception as exc:
            logger.exception("emulated device %s stopped", device_id)
            self.crashed[device_id] = f"{type(exc).__name__}: {exc}"
            self._changed.set()

    async def _report_progress(self) -> None:
        assert self.on_progress is not None
        while True:
            await trio.sleep(self.settings.progress_interval)
            self.on_progress(self.summary())

    def _status(self, status: DeviceStatus) -> None:
        self._latest[status.device_id] = status
        self._changed.set()
        if self.on_status is not None:
            self.on_status(status)

    async def wait_until(
        self, condition: Callable[[EmulatedFleet], bool], timeout: float = float("inf")
    ) -> None:
        """Return once ``condition(fleet)`` holds (checked at each device's status change);
        trio.TooSlowError after ``timeout`` seconds."""
        with trio.fail_after(timeout):
            while not condition(self):
                await self._changed.wait()
                self._changed = trio.Event()

    # --- looking at it ----------------------------------------------------------------------

    def device(self, device_id: str) -> DeviceRunner:
        """The runner of one device (its ``device`` is the protocol machine)."""
        try:
            return self.runners[device_id]
        except KeyError:
            raise NotFoundError(f"device {device_id} is not in this fleet") from None

    def endpoint_of(self, device_id: str) -> Endpoint:
        """The endpoint the device uses now (connected, or its next attempt)."""
        runner = self.device(device_id)
        order = self.endpoint_orders.get(device_id) or [0]
        return self.endpoints[order[runner.endpoint_index]]

    def online_by_endpoint(self) -> dict[str, int]:
        """Endpoint name -> devices online there now (every endpoint, zeros included)."""
        counts = {endpoint.name: 0 for endpoint in self.endpoints}
        for device_id, runner in self.runners.items():
            if runner.device.online:
                counts[self.endpoint_of(device_id).name] += 1
        return counts

    def statuses(self) -> list[DeviceStatus]:
        """Every device's status, in member order."""
        return [
            self.runners[m.device_id].device.status()
            for m in self.members
            if m.device_id in self.runners
        ]

    def summary(self) -> FleetSummary:
        """Counts of phases, running versions, last results and download progress.

        Built from each device's last reported status (no status is rebuilt: one pass over
        a dict), with live byte counts for the devices that are downloading.
        """
        latest = self._latest
        summary = summarize(
            latest.get(device_id) or runner.device.status()
            for device_id, runner in self.runners.items()
        )
        received = total = 0
        for device_id, status in latest.items():
            if status.phase is DevicePhase.DOWNLOADING:
                device = self.runners[device_id].device
                received += min(device.bytes_received, device.bytes_total)
                total += device.bytes_total
        return replace(
            summary,
            bytes_received=received,
            bytes_total=total,
            endpoints=self.online_by_endpoint(),
        )


def summarize(statuses: Iterable[DeviceStatus]) -> FleetSummary:
    """A :class:`FleetSummary` of ``statuses``."""
    phases: Counter[DevicePhase] = Counter()
    versions: Counter[tuple[int, int, int]] = Counter()
    results: Counter[str] = Counter()
    count = received = total = 0
    for status in statuses:
        count += 1
        phases[status.phase] += 1
        for module in status.modules:
            versions[(module.function, module.index, module.version)] += 1
        if status.last_result is not None:
            results[status.last_result.status] += 1
        if status.phase is DevicePhase.DOWNLOADING:
            received += status.bytes_received
            total += status.bytes_total
    return FleetSummary(count, phases, versions, results, received, total)


def platform_of(images: Iterable[bytes]) -> int:
    """The one platform id a set of module images is built for."""
    platforms = {parse_module(image).platform_id for image in images}
    if len(platforms) != 1:
        raise ValidationError(
            f"the firmware images are for platforms {sorted(platforms)}; a device runs one platform"
        )
    return platforms.pop()
