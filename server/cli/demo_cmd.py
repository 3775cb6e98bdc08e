"""``ota demo``: the README's main job.

One process runs the server on its embedded store (REST API, TLS and DTLS device listeners,
OTA engine) and an emulated fleet of about 20 devices, half over TCP/TLS 1.3 and half over
UDP/DTLS 1.2. It uploads two firmware versions, walks the safe release flow (v1 runs
everywhere; v2 goes to one canary device first, then to the whole product as an immediate
release) and shows each device's progress. Then the server keeps running for you to explore.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import trio
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from otacore.module import ModuleDependency, build_module
from otacore.platforms import ModuleFunction
from otacore.signing import TrustStore
from server.app import ServerConfig, ServerHandle, serve
from server.cli.device_store_cmd import create_provisioned_product
from server.devices.keys import product_signing_key
from server.emulator.fleet import EmulatedFleet, FleetSettings
from server.transport import SessionLimits

BORON = 13
SYSTEM_VERSION = 5003


def _images() -> dict[str, bytes]:
    """A Device OS system part and two application versions that depend on it."""
    seed = bytes(range(256))
    system_part = build_module(seed * 1600, platform_id=BORON,
                               function=ModuleFunction.SYSTEM_PART, index=1,
                               version=SYSTEM_VERSION)
    needs_os = [ModuleDependency(ModuleFunction.SYSTEM_PART, 1, SYSTEM_VERSION)]

    def app(version: int) -> bytes:
        body = (f"demo application v{version} ".encode() * 4000)[: 96 * 1024]
        return build_module(body + os.urandom(16), platform_id=BORON,
                            function=ModuleFunction.USER_PART, version=version,
                            product_id=BORON, product_version=version, dependencies=needs_os)

    return {"system-part1.bin": system_part, "app-v1.bin": app(1), "app-v2.bin": app(2)}


def _prepare(data: Path, creds: Path, devices: int) -> tuple[int, str, bytes]:
    from server.events import EventBus
    from server.fleet import Fleet
    from server.store import Store

    product_id, _ = create_provisioned_product(data, creds, "Demo Sensors", BORON, devices)
    store = Store.open_dir(data, pool_size=1)
    try:
        token = Fleet(store, EventBus()).create_api_token_sync("owner").access_token
        public_key = product_signing_key(store, data, product_id).public_key
    finally:
        store.close()
    return product_id, token, public_key


def _progress_table(fleet: EmulatedFleet, stage: str) -> Table:
    table = Table(title=stage, caption="Ctrl-C stops the demo")
    for column in ("device", "link", "phase", "app", "Device OS", "download"):
        table.add_column(column)
    for status in sorted(fleet.statuses(), key=lambda s: s.device_id):
        download = ""
        if status.bytes_total:
            share = status.bytes_received / status.bytes_total
            download = f"{'#' * int(share * 20):<20} {share:4.0%}"
        table.add_row(status.device_id[:12] + "…", status.transport or "-", status.phase.value,
                      f"v{status.product_version}", str(status.system_version), download)
    return table


async def _wait(fleet: EmulatedFleet, live: Live, stage: str,
                condition: Callable[[], bool], timeout: float) -> None:
    with trio.fail_after(timeout):
        while not condition():
            live.update(_progress_table(fleet, stage))
            await trio.sleep(0.25)
    live.update(_progress_table(fleet, stage))


def _on_app(fleet: EmulatedFleet, version: int) -> int:
    return sum(1 for s in fleet.statuses() if s.product_version == version and s.phase.value
               in ("online", "downloading"))


async def _run_demo(data: Path, devices: int, api_port: int, device_port: int,
                    exit_when_done: bool, console: Console) -> None:
    creds, state, store_dir = data / "creds", data / "flash", data / "store"
    product_id, token, public_key = await trio.to_thread.run_sync(
        _prepare, store_dir, creds, devices)
    images = _images()
    for name, image in images.items():
        (data / name).write_bytes(image)
    # Every emulated device connects from 127.0.0.1: lift the per-address admission bounds.
    limits = SessionLimits(max_pending_per_address=SessionLimits().max_sessions,
                           max_handshakes_per_address=SessionLimits().max_handshakes)
    config = ServerConfig(data_dir=store_dir, api_port=api_port, device_port=device_port,
                          device_limits=limits)
    async with trio.open_nursery() as nursery:
        handle: ServerHandle = await nursery.start(serve, config)
        listeners = handle.device_server
        assert listeners is not None and listeners.tcp_address and listeners.udp_address
        device_address, udp_address = listeners.tcp_address, listeners.udp_address
        console.print(f"server: API {handle.api_url}, devices on TLS port {device_address[1]} "
                      f"and DTLS port {udp_address[1]}")
        api = httpx.AsyncClient(base_url=handle.api_url, timeout=30,
                                headers={"Authorization": f"Bearer {token}"})
        product = f"/v1/products/{product_id}"
        for version in (1, 2):
            response = await api.post(
                f"{product}/firmware", data={"version": str(version), "title": f"v{version}"},
                files={"binary": (f"app-v{version}.bin", images[f"app-v{version}.bin"])})
            response.raise_for_status()
        console.print("uploaded application firmware v1 and v2")
        settings = FleetSettings(
            server=device_address, udp_server=udp_address,
            firmware=(images["system-part1.bin"], images["app-v1.bin"]),
            trust_store=TrustStore.initial(product_id, [public_key]), fsync=False,
        )
        fleet = EmulatedFleet.from_credentials(creds, state, settings, transport="both")
        await nursery.start(fleet.run)
        with Live(console=console, refresh_per_second=4) as live:
            await _wait(fleet, live, "devices connecting (v1 everywhere)",
                        lambda: _on_app(fleet, 1) == devices, 120)
            (await api.put(f"{product}/firmware/release",
                           json={"version": 1, "product_default": True})).raise_for_status()
            canary = sorted(s.device_id for s in fleet.statuses())[0]
            (await api.put(f"{product}/devices/{canary}",
                           json={"desired_firmware_version": 2, "flash": True})
             ).raise_for_status()
            await _wait(fleet, live, f"canary {canary[:12]}… locked to v2 (flash now)",
                        lambda: _on_app(fleet, 2) >= 1, 120)
            (await api.put(f"{product}/firmware/release",
                           json={"version": 2, "product_default": True, "intelligent": True})
             ).raise_for_status()
            await _wait(fleet, live, "v2 released to the product (immediate)",
                        lambda: _on_app(fleet, 2) == devices, 300)
        with trio.move_on_after(30):  # the last devices' results are still on their way
            while True:
                stats = (await api.get(f"{product}/firmware/2")).json().get("release_stats")
                if stats["updating"] == 0:
                    break
                await trio.sleep(0.25)
        console.print()
        console.print(f"[green]all {devices} devices run v2[/green]; release of v2: {stats}",
                      soft_wrap=True)
        # soft_wrap: one line however narrow the terminal (or none), so it can be pasted.
        console.print(f"explore: export OTA_API_URL={handle.api_url} OTA_TOKEN={token} "
                      f"OTA_PRODUCT={product_id}", soft_wrap=True)
        console.print("  .venv/bin/ota device list    .venv/bin/ota firmware list    "
                      ".venv/bin/ota events", soft_wrap=True)
        await api.aclose()
        if exit_when_done:
            nursery.cancel_scope.cancel()
            return
        console.print("the server keeps running; Ctrl-C stops it")
        await trio.sleep_forever()


def demo(
    data: Path = typer.Option(Path("demo-data"), "--data", help="Demo data directory "
                              "(recreated at each run)."),
    devices: int = typer.Option(20, "--devices", min=2, max=2000, help="Emulated devices."),
    api_port: int = typer.Option(8080, "--api-port", help="REST API port (0: any free one)."),
    device_port: int = typer.Option(5684, "--device-port",
                                    help="TLS and DTLS port (0: any free one)."),
    exit_when_done: bool = typer.Option(False, "--exit-when-done",
                                        help="Stop once every device runs v2."),
) -> None:
    """Run the server with an emulated fleet and roll out a release to it."""
    console = Console()
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    try:
        trio.run(_run_demo, data, devices, api_port, device_port, exit_when_done, console)
    except KeyboardInterrupt:
        console.print("demo stopped")
