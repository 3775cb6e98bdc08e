"""Emulated devices over real TLS and DTLS: the Trio shell, the fleet API and the CLI function.

The server is the real device endpoint (server.transport) with the scripted cloud of
tests/test_emulated_device.py as its session handler, so these tests exercise real sockets,
real handshakes with provisioned device certificates, reconnects and resumed downloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from otacore.device import make_test_marker
from otacore.device.emulated import DevicePhase, DeviceStatus
from otacore.errors import NotFoundError, ValidationError
from otacore.messages import Hello
from otacore.protocol.link import Transport
from otacore.protocol.ota_wire import UPDATE_RESULT_EVENT, parse_update_result
from otacore.signing import TrustStore
from server.authorization import MemoryDeviceDirectory
from server.cli.emulate_cmd import emulate, parse_server, trust_store_of
from server.emulator.fleet import (
    EmulatedFleet,
    FleetMember,
    FleetSettings,
    FleetSummary,
    TransportChoice,
    find_credentials,
    transports_for,
)
from server.identity import pki_dir, provision_devices
from server.transport import (
    DeviceServer,
    DeviceServerConfig,
    DeviceSession,
    SessionClosed,
    serve_devices,
)
from tests.test_emulated_device import (
    BIG,
    KEY,
    PRODUCT,
    STORE,
    SYSTEM,
    V1,
    V2,
    CloudLog,
    Offer,
    ScriptedCloud,
    offer_when_behind,
    user_part,
)

FAST: dict[str, Any] = {
    "backoff_initial": 0.05,
    "backoff_max": 0.5,
    "reboot_delay": 0.05,
    "connect_timeout": 5.0,
    "progress_interval": 0.1,
}


@dataclass
class CloudHandler:
    """Runs a ScriptedCloud per session; ``stop_after_chunks`` ends a device's first session
    once that many chunks were sent (the server drops the link mid-download)."""

    make_cloud: Callable[[Transport, CloudLog], ScriptedCloud]
    stop_after_chunks: int | None = None
    logs: dict[str, CloudLog] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)

    async def run(self, session: DeviceSession) -> None:
        log = self.logs.setdefault(session.device_id, CloudLog())
        number = self.sessions[session.device_id] = self.sessions.get(session.device_id, 0) + 1
        cloud = self.make_cloud(session.transport, log)
        cloud.now = trio.current_time()
        wake = trio.Event()

        async def read() -> None:
            try:
                while True:
                    data = await session.receive()
                    cloud.receive(data, trio.current_time())
                    wake.set()
            except SessionClosed:
                nursery.cancel_scope.cancel()  # the device left: end this handler

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while True:
                out = cloud.take_outgoing()
                if session.transport == "tcp" and out:
                    out = [b"".join(out)]
                for data in out:
                    await session.send(data)
                stop = self.stop_after_chunks
                if number == 1 and stop is not None and log.chunks_sent >= stop:
                    nursery.cancel_scope.cancel()  # the session ends: the link drops
                    return
                deadline = cloud.next_deadline()
                with trio.move_on_at(float("inf") if deadline is None else deadline):
                    await wake.wait()
                wake = trio.Event()
                cloud.poll(trio.current_time())

    async def farewell(self, session: DeviceSession) -> None:
        await trio.lowlevel.checkpoint()


@dataclass
class Rig:
    server: DeviceServer
    handler: CloudHandler
    creds: Path
    device_ids: list[str]

    def settings(self, **changes: object) -> FleetSettings:
        values: dict[str, Any] = {
            "server": address(self, "tcp"),
            "udp_server": address(self, "udp"),
            "firmware": (SYSTEM, V1),
            "trust_store": STORE,
            "fsync": False,
            **FAST,
        }
        values.update(changes)
        return FleetSettings(**values)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("fleet")
    devices = provision_devices(pki_dir(root / "data"), 4, root / "devices")
    return root / "data", root / "devices", sorted(d.device_id for d in devices)


async def start_rig(
    nursery: trio.Nursery,
    provisioned: tuple[Path, Path, list[str]],
    handler: CloudHandler,
) -> Rig:
    data, creds, ids = provisioned
    config = DeviceServerConfig(pki_dir=pki_dir(data), host="127.0.0.1", tcp_port=0, udp_port=0)
    server: DeviceServer = await nursery.start(
        serve_devices, config, lambda session: handler, MemoryDeviceDirectory(ids)
    )
    return Rig(server, handler, creds, ids)


def address(rig: Rig, transport: Transport) -> tuple[str, int]:
    found = rig.server.tcp_address if transport == "tcp" else rig.server.udp_address
    assert found is not None
    return found


def all_committed(count: int) -> Callable[[EmulatedFleet], bool]:
    def check(fleet: EmulatedFleet) -> bool:
        summary = fleet.summary()
        return summary.results["committed"] == count and summary.running(5, 1, 2) == count

    return check


@pytest.mark.parametrize("transport", ["tcp", "udp", "both"])
async def test_fleet_takes_an_update_over_real_sockets(
    nursery: trio.Nursery,
    provisioned: tuple[Path, Path, list[str]],
    tmp_path: Path,
    transport: TransportChoice,
) -> None:
    offer = Offer.of(V2)
    handler = CloudHandler(lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)))
    rig = await start_rig(nursery, provisioned, handler)
    statuses: list[DeviceStatus] = []
    progress: list[FleetSummary] = []
    reported = trio.Event()

    def on_progress(summary: FleetSummary) -> None:
        progress.append(summary)
        if summary.results["committed"] == 3:
            reported.set()

    fleet = EmulatedFleet.from_credentials(
        rig.creds,
        tmp_path / "state",
        rig.settings(max_concurrent_connects=2),
        count=3,
        transport=transport,
        on_status=statuses.append,
        on_progress=on_progress,
    )
    async with trio.open_nursery() as inner:
        await inner.start(fleet.run)
        await fleet.wait_until(all_committed(3), timeout=30)
        await fleet.wait_until(lambda f: f.summary().online == 3, timeout=30)
        # The periodic report catches up with the fleet at its next tick, however fast the
        # update was (on an idle machine it ends before the first tick).
        with trio.fail_after(30):
            await reported.wait()
        inner.cancel_scope.cancel()
    assert fleet.crashed == {}
    assert sorted(handler.logs) == rig.device_ids[:3]
    for device_id, log in handler.logs.items():
        assert [h.product_version for h in log.hellos][-1] == 2
        assert log.hellos[0].device_id == device_id
        status = fleet.device(device_id).device.status()
        assert status.boots == 2 and status.transport == fleet.device(device_id).link.transport
    assert {fleet.device(d).link.transport for d in handler.logs} == (
        {"tcp", "udp"} if transport == "both" else {transport}
    )
    assert {s.phase for s in statuses} >= {DevicePhase.DOWNLOADING, DevicePhase.ONLINE}
    assert "3 devices: " in progress[-1].line() and "committed 3" in progress[-1].line()
    # The flash persists: a new fleet over the same state starts on version 2, no download.
    again = EmulatedFleet.from_credentials(
        rig.creds, tmp_path / "state", rig.settings(), count=3, transport=transport
    )
    again.open()
    for runner in again.runners.values():
        assert (5, 1, 2) in runner.device.flash.installed_modules()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_download_resumes_after_the_server_drops_the_link(
    nursery: trio.Nursery,
    provisioned: tuple[Path, Path, list[str]],
    tmp_path: Path,
    transport: Transport,
) -> None:
    offer = Offer.of(BIG)
    handler = CloudHandler(
        lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2), window=8),
        stop_after_chunks=40,
    )
    rig = await start_rig(nursery, provisioned, handler)
    fleet = EmulatedFleet.from_credentials(
        rig.creds, tmp_path / "state", rig.settings(), count=1, transport=transport
    )
    async with trio.open_nursery() as inner:
        await inner.start(fleet.run)
        await fleet.wait_until(all_committed(1), timeout=30)
        inner.cancel_scope.cancel()
    assert fleet.crashed == {}
    (log,) = handler.logs.values()
    (device_id,) = handler.logs
    assert handler.sessions[device_id] >= 3  # dropped, resumed, and after the reset
    assert log.start_replies[1].resume_offset > 0
    total_chunks = -(-len(BIG) // 512)
    assert log.chunks_sent < total_chunks + 40  # resumed, not restarted
    runner = fleet.device(device_id)
    assert runner.device.flash.read_slot(5, 1, 1) == BIG


async def test_application_calls_reach_the_server(
    nursery: trio.Nursery, provisioned: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    seen: list[Hello] = []

    def policy(cloud: ScriptedCloud, hello: Hello) -> None:
        seen.append(hello)

    handler = CloudHandler(lambda t, log: ScriptedCloud(t, log, policy=policy))
    rig = await start_rig(nursery, provisioned, handler)
    fleet = EmulatedFleet.from_credentials(
        rig.creds,
        tmp_path / "state",
        rig.settings(heartbeat_interval=0.2),
        count=1,
    )
    async with trio.open_nursery() as inner:
        await inner.start(fleet.run)
        await fleet.wait_until(lambda f: f.summary().online == 1, timeout=30)
        (runner,) = fleet.runners.values()
        runner.disable_updates()
        runner.publish("app/temperature", "21.5")
        log = handler.logs[runner.device.config.device_id]
        with trio.fail_after(30):
            while len(log.named("ota/device/heartbeat")) < 2 or not log.named("app/temperature"):
                await trio.sleep(0.05)
        runner.reset()
        await fleet.wait_until(lambda f: f.statuses()[0].boots == 2, timeout=30)
        await fleet.wait_until(lambda f: f.summary().online == 1, timeout=30)
        inner.cancel_scope.cancel()
    assert log.named("particle/device/updates/enabled")[0] == "false"
    assert log.named("app/temperature") == ["21.5"]
    assert len(seen) == 2 and not seen[1].updates_enabled  # the app disables them again
    assert log.goodbyes and log.goodbyes[0].reason == "reset"


async def test_emulate_command(
    nursery: trio.Nursery,
    provisioned: tuple[Path, Path, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    offer = Offer.of(V2)
    handler = CloudHandler(lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)))
    rig = await start_rig(nursery, provisioned, handler)
    (tmp_path / "system.bin").write_bytes(SYSTEM)
    (tmp_path / "app.bin").write_bytes(V1)
    host, port = address(rig, "tcp")

    def run_cli() -> None:
        emulate(
            creds=rig.creds,
            transport="tcp",
            count=2,
            state=tmp_path / "state",
            firmware=[tmp_path / "system.bin", tmp_path / "app.bin"],
            server=[f"{host}:{port}"],
            trust_key=[KEY.public_key.hex()],
            product_id=PRODUCT,
            no_fsync=True,
            duration=60.0,  # a limit only: the run ends once both devices run version 2
            until_version=2,
            json_output=True,
        )

    await trio.to_thread.run_sync(run_cli)
    out = capsys.readouterr().out
    assert "2 devices: online 2; committed 2" in out
    assert '"status": "committed"' in out and "downloading" in out


def test_cli_argument_parsing(tmp_path: Path) -> None:
    assert parse_server("example.com:5685") == ("example.com", 5685)
    assert parse_server("[::1]:5684") == ("::1", 5684)
    assert parse_server("localhost") == ("localhost", 5684)
    with pytest.raises(ValueError, match="port"):
        parse_server("host:99999")
    assert trust_store_of([], None) is None
    with pytest.raises(ValueError, match="product-id"):
        trust_store_of([KEY.public_key.hex()], None)
    with pytest.raises(ValueError, match="64 hex"):
        trust_store_of(["abcd"], PRODUCT)
    assert trust_store_of([KEY.public_key.hex()], PRODUCT) == STORE


def test_the_trust_file_names_its_product_and_old_ones_still_work(tmp_path: Path) -> None:
    from server.cli.emulate_cmd import _product_of_trust_file
    from server.devices.keys import (
        TRUST_FILE,
        read_trust_file,
        read_trust_product,
        read_trust_sequence,
        write_trust_file,
    )

    path = write_trust_file(tmp_path, [KEY], sequence=3, product_id=PRODUCT)
    assert path.name == TRUST_FILE
    assert read_trust_file(path) == [KEY.public_key]
    assert (read_trust_sequence(path), read_trust_product(path)) == (3, PRODUCT)
    assert _product_of_trust_file(path, None) == PRODUCT
    assert _product_of_trust_file(path, PRODUCT) == PRODUCT
    with pytest.raises(ValueError, match=f"keys of product {PRODUCT}, not of --product-id 9"):
        _product_of_trust_file(path, 9)
    # A file written before the product was recorded: --product-id says it.
    old = tmp_path / "old"
    old.mkdir()
    (old / TRUST_FILE).write_text(f"# sequence 0\n{KEY.public_key.hex()}\n")
    assert read_trust_product(old / TRUST_FILE) is None
    assert _product_of_trust_file(old / TRUST_FILE, PRODUCT) == PRODUCT
    with pytest.raises(ValueError, match="pass --product-id"):
        _product_of_trust_file(old / TRUST_FILE, None)


def test_credentials_discovery(provisioned: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    _, creds, ids = provisioned
    assert [d for d, _ in find_credentials(creds, 2)] == ids[:2]
    assert len(find_credentials(creds)) == 4
    with pytest.raises(NotFoundError, match="4 provisioned devices, 9 requested"):
        find_credentials(creds, 9)
    with pytest.raises(NotFoundError, match=r"ca\.pem"):
        find_credentials(tmp_path)
    assert transports_for("both", 3) == ["tcp", "udp", "tcp"]
    with pytest.raises(ValidationError):
        transports_for("sctp", 1)  # type: ignore[arg-type]
    fleet = EmulatedFleet.from_credentials(creds, tmp_path / "s", FleetSettings(), count=1)
    with pytest.raises(ValidationError, match="firmware"):
        fleet.open()


async def test_bad_image_rolls_back_through_the_shell(
    nursery: trio.Nursery, provisioned: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    bad = user_part(2, marker=make_test_marker(selftest_fail_after=0.3))
    offer = Offer.of(bad)
    handler = CloudHandler(lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)))
    rig = await start_rig(nursery, provisioned, handler)
    fleet = EmulatedFleet.from_credentials(
        rig.creds, tmp_path / "state", rig.settings(), count=1, transport="udp"
    )
    async with trio.open_nursery() as inner:
        await inner.start(fleet.run)
        await fleet.wait_until(lambda f: f.summary().results["rolled_back"] == 1, timeout=30)
        (runner,) = fleet.runners.values()
        log = handler.logs[runner.device.config.device_id]
        with trio.fail_after(30):
            while not log.named(UPDATE_RESULT_EVENT):
                await trio.sleep(0.02)
        inner.cancel_scope.cancel()
    status = runner.device.status()
    assert status.boots == 3 and status.product_version == 1  # new image, failed, rolled back
    assert parse_update_result(log.named(UPDATE_RESULT_EVENT)[0]).status == "rolled_back"
    assert all(hello.product_version == 1 for hello in log.hellos)  # v2 never reached it


async def test_unreachable_server_backs_off(
    provisioned: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, creds, _ = provisioned
    settings = FleetSettings(
        server=("127.0.0.1", port), firmware=(SYSTEM, V1), trust_store=STORE, fsync=False, **FAST
    )
    fleet = EmulatedFleet.from_credentials(creds, tmp_path / "state", settings, count=1)
    async with trio.open_nursery() as inner:
        started = trio.current_time()
        await inner.start(fleet.run)
        (runner,) = fleet.runners.values()
        with trio.fail_after(30):  # each refused attempt is quick; the back-off is ~1 s
            while runner.connect_failures < 6:
                await trio.sleep(0.01)
        elapsed = trio.current_time() - started
        inner.cancel_scope.cancel()
    # Five back-offs at least half of 0.05, 0.1, 0.2, 0.4 and 0.5 s (the cap) each: the
    # device waited between attempts instead of hammering the address. (A lower bound holds
    # on any machine: timers never fire early. The schedule itself is checked exactly in
    # test_backoff_doubles_with_jitter_up_to_the_cap.)
    assert elapsed >= 0.5 * (0.05 + 0.1 + 0.2 + 0.4 + 0.5)
    assert "attempts to connect" in runner.last_connect_error
    assert runner.device.phase is DevicePhase.CONNECTING and runner.device.sessions == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_backoff_doubles_with_jitter_up_to_the_cap(
    provisioned: tuple[Path, Path, list[str]], tmp_path: Path, seed: int
) -> None:
    _, creds, _ = provisioned
    settings = FleetSettings(firmware=(SYSTEM, V1), trust_store=STORE, fsync=False, **FAST)
    fleet = EmulatedFleet(
        [
            FleetMember(device_id, credentials, tmp_path / device_id, "tcp")
            for device_id, credentials in find_credentials(creds, 1)
        ],
        settings,
        seed=seed,
    )
    fleet.open()
    (runner,) = fleet.runners.values()
    delays = []
    for failures in range(1, 9):
        runner.connect_failures = failures
        delays.append(runner._backoff())
    # 0.05 s doubling per failure up to backoff_max (0.5 s), each 0.5-1x of that (jitter).
    for failures, delay in enumerate(delays, start=1):
        base = min(0.5, 0.05 * 2 ** (failures - 1))
        assert 0.5 * base <= delay <= base, (seed, failures, delay)
    assert len(set(delays)) == len(delays)  # jittered: no two alike


async def test_fleet_and_cli_against_the_real_server(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole server (store, REST API, device plane, OTA engine) updates emulated devices."""
    from server.devices.keys import TRUST_FILE, read_trust_file
    from tests.device_server import start_device_server

    kit = await start_device_server(nursery, tmp_path, count=3)
    async with kit.api() as api:
        for version, image in ((1, V1), (2, V2)):
            files = {"binary": ("firmware.bin", image, "application/octet-stream")}
            data = {"version": str(version), "title": f"v{version}"}
            response = await api.post(
                f"/v1/products/{kit.product_id}/firmware", data=data, files=files
            )
            assert response.status_code == 201, response.text
        response = await api.put(
            f"/v1/products/{kit.product_id}/firmware/release",
            json={"version": 2, "product_default": True, "force": True},
        )
        assert response.status_code == 200, response.text
    store = TrustStore.initial(kit.product_id, read_trust_file(kit.creds_dir / TRUST_FILE))
    settings = FleetSettings(
        server=kit.tcp,
        udp_server=kit.udp,
        firmware=(SYSTEM, V1),
        trust_store=store,
        fsync=False,
        **FAST,
    )
    fleet = EmulatedFleet.from_credentials(
        kit.creds_dir, tmp_path / "fleet-state", settings, count=2, transport="both"
    )
    async with trio.open_nursery() as inner:
        await inner.start(fleet.run)
        await fleet.wait_until(all_committed(2), timeout=30)
        inner.cancel_scope.cancel()
    assert fleet.crashed == {}
    async with kit.api() as api:
        for runner in fleet.runners.values():
            device_id = runner.device.config.device_id
            view = (await api.get(f"/v1/products/{kit.product_id}/devices/{device_id}")).json()
            assert view["firmware_version"] == 2 and view["system_version"] == 5000
    # The CLI finds the product's key and id in the credentials directory (signing-keys.txt).
    (tmp_path / "system.bin").write_bytes(SYSTEM)
    (tmp_path / "app.bin").write_bytes(V1)
    host, port = kit.tcp

    def run_cli() -> None:
        emulate(
            creds=kit.creds_dir,
            count=3,
            state=tmp_path / "cli-state",
            firmware=[tmp_path / "system.bin", tmp_path / "app.bin"],
            server=[f"{host}:{port}"],
            no_fsync=True,
            duration=60.0,  # a limit only: the run ends once every device runs version 2
            until_version=2,
        )

    await trio.to_thread.run_sync(run_cli)
    assert "3 devices: online 3; committed 3" in capsys.readouterr().out
