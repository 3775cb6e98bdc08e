"""The rig of the end-to-end OTA tests (tests/test_ota_e2e_*.py): the real server (REST API,
TLS 1.3 / DTLS 1.2 device plane, OTA engine) with a product and provisioned devices, driven
over HTTP with httpx, and emulated devices (``EmulatedFleet``) on real sockets.

This module holds no tests; it is named like the suite so that it sits beside it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import httpx
import trio

from otacore.device.emulated import DeviceFlash
from otacore.module import ModuleDependency, build_module
from otacore.platforms import ModuleFunction
from otacore.protocol.link import Transport
from otacore.signing import TrustStore
from server.devices.keys import TRUST_FILE, read_trust_file
from server.devices.ota import OtaEngine
from server.devices.updater import SessionUpdater
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from server.events import FIRMWARE_RELEASED, Event, EventBus
from server.fleet.deltas import RELEASE_BYTES_EVENT
from tests.device_server import DeviceServerKit, start_device_server

BORON = 13  # the platform of the product start_device_server creates
TRANSPORTS: list[Transport] = ["tcp", "udp"]
#: Short emulator timings: quick reconnects and reboots, so a test takes seconds.
FAST: dict[str, Any] = {
    "backoff_initial": 0.05,
    "backoff_max": 0.3,
    "reboot_delay": 0.05,
    "connect_timeout": 5.0,
    "progress_interval": 0.1,
    "fsync": False,
}
#: How long a test waits for one step (an update of a few tens of KB takes well under 1 s).
STEP = 30.0


def system_part(version: int, size: int = 6000) -> bytes:
    """A Device OS system part 1 of ``version`` (no dependencies)."""
    body = hashlib.shake_256(f"system part {version}".encode()).digest(size)
    return build_module(
        body, platform_id=BORON, function=ModuleFunction.SYSTEM_PART, index=1, version=version
    )


def app(
    version: int,
    *,
    needs_system: int = 5003,
    size: int = 12_000,
    marker: bytes = b"",
    seed: str = "",
) -> bytes:
    """A product application (user part 1) of product version ``version`` that needs system
    part 1 at ``needs_system`` or later; ``marker`` (a test marker) goes into its body."""
    body = hashlib.shake_256(f"app {version} {seed}".encode()).digest(size)
    return app_with_body(version, body[: size // 2] + marker + body[size // 2 :],
                         needs_system=needs_system)


def app_with_body(version: int, body: bytes, *, needs_system: int = 5003) -> bytes:
    """A product application (user part 1) of product version ``version`` made of ``body``,
    needing system part 1 at ``needs_system`` or later."""
    return build_module(
        body,
        platform_id=BORON,
        function=ModuleFunction.USER_PART,
        index=1,
        version=6,
        product_id=BORON,
        product_version=version,
        dependencies=[ModuleDependency(ModuleFunction.SYSTEM_PART, 1, needs_system)],
    )


SYSTEM_5003, SYSTEM_5004, SYSTEM_5005 = (system_part(v) for v in (5003, 5004, 5005))
APP_V1 = app(1)


def sha(image: bytes) -> str:
    """SHA-256 hex of an image (how the server names blobs)."""
    return hashlib.sha256(image).hexdigest()


#: The name of the marker events EventLog.catch_up publishes.
LOG_BARRIER = "test/event-log/barrier"


@dataclass
class EventLog:
    """Every bus event of one product, recorded in order by a background task."""

    events: list[Event] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    barriers: int = 0

    async def catch_up(self, bus: EventBus, product_id: int) -> None:
        """Return once every event of the product published on ``bus`` before this call is
        in the log: a marker event is published after them and waited for (the bus hands
        each subscriber its events in order)."""
        self.barriers += 1
        marker = str(self.barriers)
        bus.publish(Event(LOG_BARRIER, marker, product_id=product_id))
        await self.wait_for(LOG_BARRIER, data=marker)

    def named(self, name: str, device_id: str | None = None) -> list[str | None]:
        """The data of the events called ``name`` (of one device when given)."""
        return [
            e.data
            for e in self.events
            if e.name == name and (device_id is None or e.device_id == device_id)
        ]

    async def wait_for(
        self,
        name: str,
        device_id: str | None = None,
        data: str | None = None,
        *,
        count: int = 1,
        timeout: float = STEP,
    ) -> None:
        """Return once ``count`` events ``name`` (with ``data``, blanks stripped, when
        given) were recorded."""
        with trio.fail_after(timeout):
            while (
                sum(data is None or (d or "").strip() == data for d in self.named(name, device_id))
                < count
            ):
                await self.changed.wait()
                self.changed = trio.Event()


@dataclass
class OtaRig:
    """A running server with its product, an API client, an event log and device helpers."""

    kit: DeviceServerKit
    api: httpx.AsyncClient
    events: EventLog
    trust: TrustStore
    state_root: Path
    nursery: trio.Nursery

    @property
    def product(self) -> int:
        return self.kit.product_id

    @property
    def ids(self) -> list[str]:
        """The provisioned device ids, sorted (the order ``find_credentials`` uses)."""
        return sorted(self.kit.device_ids)

    # --- REST API -----------------------------------------------------------------------------

    async def upload_device_os(self, *images: bytes) -> None:
        for image in images:
            files = {"binary": ("system-part1.bin", image, "application/octet-stream")}
            response = await self.api.post("/v1/device-os", files=files)
            assert response.status_code == 201, response.text

    async def upload(self, version: int, image: bytes) -> dict[str, Any]:
        files = {"binary": ("firmware.bin", image, "application/octet-stream")}
        data = {"version": str(version), "title": f"v{version}"}
        response = await self.api.post(
            f"/v1/products/{self.product}/firmware", data=data, files=files
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def release(self, version: int, **fields: Any) -> dict[str, Any]:
        """``PUT .../firmware/release`` (force: the test devices never ran the version)."""
        response = await self.api.put(
            f"/v1/products/{self.product}/firmware/release",
            json={"version": version, "force": True, **fields},
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def firmware(self, version: int) -> dict[str, Any]:
        response = await self.api.get(f"/v1/products/{self.product}/firmware/{version}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def device(self, device_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/v1/products/{self.product}/devices/{device_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def put_device(self, device_id: str, **fields: Any) -> dict[str, Any]:
        response = await self.api.put(
            f"/v1/products/{self.product}/devices/{device_id}", json=fields
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def create_group(self, name: str) -> None:
        response = await self.api.post(f"/v1/products/{self.product}/groups", json={"name": name})
        assert response.status_code == 201, response.text

    async def wait_device(
        self, device_id: str, check: Callable[[dict[str, Any]], bool], timeout: float = STEP
    ) -> dict[str, Any]:
        """Poll the device object until ``check`` holds; return it (TooSlowError otherwise)."""
        with trio.fail_after(timeout):
            while True:
                body = await self.device(device_id)
                if check(body):
                    return body
                await trio.sleep(0.05)

    @property
    def engine(self) -> OtaEngine:
        """The server's OTA engine."""
        plane = self.kit.handle.devices
        assert plane is not None and isinstance(plane.ota, OtaEngine)
        return plane.ota

    async def engine_done(self, device_id: str, *, releases: int = 0) -> SessionUpdater:
        """The device's current session updater, once the engine has handled ``releases``
        release events in all (``engine.handled``), this session's Describe is recorded, and
        a finished check of the updater covered every kick asked of it so far; every event
        published until then is in the event log. What the engine did not do by then it
        will not do without a new cause: the causal marker a test waits for before it
        asserts that nothing was offered (never a sleep)."""
        engine = self.engine
        with trio.fail_after(STEP):
            await engine.handled[FIRMWARE_RELEASED].reached(releases)
            updater = engine.updaters[device_id]
            await updater.handler.described.wait()
            await updater.handled.reached(updater.kicks)
            await self.events.catch_up(self.kit.handle.bus, self.product)
        return updater

    def tune_engine(self, **changes: Any) -> None:
        """Change the running OTA engine's settings (``OtaConfig`` fields)."""
        self.engine.config = replace(self.engine.config, **changes)

    # --- emulated devices ---------------------------------------------------------------------

    def cut(self, device_id: str) -> bool:
        """Close the device's live session from the server side (True if it had one)."""
        assert self.kit.handle.device_server is not None
        return self.kit.handle.device_server.registry.close_device(device_id, "test: link cut")

    async def reconnect(self, fleet: EmulatedFleet, device_id: str) -> None:
        """Drop the device's session; return once it handshook again and is online."""
        device = fleet.device(device_id).device
        sessions = device.sessions
        assert self.cut(device_id)
        await fleet.wait_until(lambda f: device.sessions > sessions and device.online, timeout=STEP)

    def settings(
        self,
        firmware: tuple[bytes, ...] = (SYSTEM_5003, APP_V1),
        trust: TrustStore | None = None,
        **changes: Any,
    ) -> FleetSettings:
        values: dict[str, Any] = {
            "server": self.kit.tcp,
            "udp_server": self.kit.udp,
            "firmware": firmware,
            "trust_store": trust or self.trust,
            **FAST,
        }
        values.update(changes)
        return FleetSettings(**values)

    def fleet(self, devices: list[tuple[str, Transport]], **settings: Any) -> EmulatedFleet:
        """Emulated devices (id, transport) whose flash lives in ``state_root/<id>``;
        ``settings`` go to :meth:`settings` (firmware, trust, timings)."""
        creds = dict(find_credentials(self.kit.creds_dir))
        members = [
            FleetMember(device_id, creds[device_id], self.state_root / device_id, kind)
            for device_id, kind in devices
        ]
        return EmulatedFleet(members, self.settings(**settings))


@asynccontextmanager
async def running(fleet: EmulatedFleet) -> AsyncIterator[EmulatedFleet]:
    """Run a fleet for the ``async with`` block; leaving it cuts every device's power."""
    async with trio.open_nursery() as nursery:
        await nursery.start(fleet.run)
        try:
            yield fleet
        finally:
            nursery.cancel_scope.cancel()
    assert fleet.crashed == {}, fleet.crashed


async def _record(
    rig_events: EventLog, kit: DeviceServerKit, task_status: trio.TaskStatus[None]
) -> None:
    with kit.handle.bus.subscribe(product_id=kit.product_id, buffer=10_000) as subscription:
        task_status.started()
        async for event in subscription.receive:
            rig_events.events.append(event)
            rig_events.changed.set()


@asynccontextmanager
async def ota_rig(nursery: trio.Nursery, tmp_path: Path, count: int = 2,
                  **server_options: Any) -> AsyncIterator[OtaRig]:
    """Start the server with ``count`` provisioned devices and an API client
    (``server_options``: more arguments of :func:`start_device_server`)."""
    kit = await start_device_server(nursery, tmp_path, count=count, **server_options)
    trust = TrustStore.initial(kit.product_id, read_trust_file(kit.creds_dir / TRUST_FILE))
    events = EventLog()
    await nursery.start(_record, events, kit)
    async with kit.api() as api:
        yield OtaRig(kit, api, events, trust, tmp_path / "state", nursery)
    kit.handle.shutdown.set()


class WatchedFlash:
    """A device's flash seen through a test probe: counts the bytes written to the user
    part's slot and the downloads started from zero, calls ``on_mark(offset)`` once each
    time the written count passes one of ``marks``, and can flip a byte at ``corrupt_at``
    (once) to tamper with the stored image behind the transfer's back.

    Install it with :meth:`install` after ``fleet.open()``; everything else is delegated.
    """

    def __init__(
        self,
        flash: DeviceFlash,
        marks: list[int] | None = None,
        on_mark: Callable[[int], None] | None = None,
        corrupt_at: int | None = None,
    ) -> None:
        self.flash = flash
        self.marks = sorted(marks or [])
        self.on_mark = on_mark
        self.corrupt_at = corrupt_at
        self.written = 0  # user-part bytes written, duplicates included
        self.restarts = 0  # downloads of the user part begun at offset 0

    @classmethod
    def install(cls, fleet: EmulatedFleet, device_id: str, **kwargs: Any) -> WatchedFlash:
        fleet.open()
        device = fleet.device(device_id).device
        watched = cls(device.flash, **kwargs)
        device.flash = cast(DeviceFlash, watched)
        return watched

    def __getattr__(self, name: str) -> Any:
        return getattr(self.flash, name)

    def begin_inactive(self, function: int, index: int) -> int:
        if function == ModuleFunction.USER_PART:
            self.restarts += 1
        return self.flash.begin_inactive(function, index)

    def write_inactive(self, function: int, index: int, offset: int, data: bytes) -> None:
        if function != ModuleFunction.USER_PART:
            self.flash.write_inactive(function, index, offset, data)
            return
        at = self.corrupt_at
        if at is not None and offset <= at < offset + len(data):
            self.corrupt_at = None
            flipped = bytearray(data)
            flipped[at - offset] ^= 0x5A
            data = bytes(flipped)
        self.flash.write_inactive(function, index, offset, data)
        self.written += len(data)
        while self.marks and self.written >= self.marks[0]:
            mark = self.marks.pop(0)
            if self.on_mark is not None:
                self.on_mark(mark)


def product_version(fleet: EmulatedFleet, device_id: str) -> int:
    """The product version of the application the emulated device runs."""
    return fleet.device(device_id).device.status().product_version


def updated_to(
    device_id: str,
    version: int,
    system: int | None = None,
) -> Callable[[EmulatedFleet], bool]:
    """A ``wait_until`` condition: the device runs product ``version`` (and ``system``)
    and is online."""

    def check(fleet: EmulatedFleet) -> bool:
        status = fleet.device(device_id).device.status()
        return (
            status.product_version == version
            and status.phase.value == "online"
            and (system is None or status.system_version == system)
        )

    return check


def flash_statuses(events: EventLog, device_id: str) -> list[str]:
    """The ``spark/flash/status`` data of one device, stripped."""
    return [(d or "").strip() for d in events.named("spark/flash/status", device_id)]


def transfers_of(events: EventLog, version: int) -> dict[str, dict[str, Any]]:
    """Device id -> data of its ``ota/release/bytes`` event for firmware ``version`` (how
    the image travelled: full, zstd or delta, and the bytes sent)."""
    found = {}
    for event in events.events:
        if event.name == RELEASE_BYTES_EVENT and event.device_id:
            data = json.loads(event.data or "{}")
            if data["version"] == version:
                found[event.device_id] = data
    return found


def release_data(events: EventLog) -> list[dict[str, Any]]:
    """The parsed data of every firmware release event."""
    return [json.loads(d or "{}") for d in events.named("particle/product/firmware/released")]
