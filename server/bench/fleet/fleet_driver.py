"""The load generator's ``fleet_*`` and ``prepare`` commands: its devices as an
EmulatedFleet (factory-programmed, run, stopped), with progress events to the runner and
the counters and per-device times of ``fleet_stats``.

Separate from the load-generator process (:mod:`server.bench.fleet.loadgen`) and from the
bare handshake rounds (:mod:`server.bench.fleet.bare_handshakes`): it owns the fleet and
everything counted about it.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import trio

from otacore.device.emulated import DevicePhase, DeviceStatus, EmulatedDevice
from otacore.platforms import ModuleFunction
from otacore.protocol.link import Transport
from otacore.signing import TrustStore
from server.bench.fleet import BenchError
from server.bench.fleet.lines import JsonLines
from server.bench.fleet.loadgen_spec import LoadGenSpec
from server.bench.fleet.record_devices import RecordDeviceRunner
from server.devices.keys import read_trust_file
from server.emulator.endpoints import Endpoint
from server.emulator.flash import Flash
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings

ONLINE_PHASES = (DevicePhase.ONLINE, DevicePhase.DOWNLOADING, DevicePhase.APPLYING)
PROGRESS_INTERVAL = 0.25


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
