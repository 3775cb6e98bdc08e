"""End to end on PostgreSQL: a real ``ota server --db-url postgresql+psycopg://...``
subprocess (blobs, keys and CA in its data directory; every row in a database of the
throwaway cluster) serves emulated devices over TLS 1.3 and DTLS 1.2 that take an immediate
release, and a second one with worker processes relays commands and events between them
through the shared database. Nothing of the store goes to a SQLite file."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from otacore.signing import TrustStore
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from server.events import EventBus
from server.fleet import Fleet
from server.store import Store
from tests.provisioning import provision_product
from tests.test_multiprocess_server import session_owners, spread_over_both_processes
from tests.test_ota_e2e_kit import APP_V1, FAST, STEP, SYSTEM_5003, app, running, updated_to

REPO = Path(__file__).resolve().parent.parent
#: Devices per transport.
PER_TRANSPORT = 2


@dataclass
class PgServer:
    """A running ``ota server`` subprocess on PostgreSQL."""

    process: subprocess.Popen[bytes]
    api_url: str
    tcp: tuple[str, int]
    udp: tuple[str, int]


def _provision(db_url: str, data: Path, creds: Path, count: int) -> tuple[int, list[str]]:
    """A product with ``count`` provisioned devices in the PostgreSQL store."""
    store = Store.open(db_url, data / "blobs", pool_size=1)
    try:
        product_id, devices = provision_product(store, data, creds, count)
    finally:
        store.close()
    return product_id, sorted(device.device_id for device in devices)


def _owner_token(db_url: str, data: Path) -> str:
    store = Store.open(db_url, data / "blobs", pool_size=1)
    try:
        return Fleet(store, EventBus()).create_api_token_sync("owner").access_token
    finally:
        store.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


@contextmanager
def pg_server(data: Path, db_url: str, log: Path, *extra: str) -> Iterator[PgServer]:
    """Start ``ota server --data DATA --db-url DB_URL`` on ephemeral ports; stop it (SIGTERM,
    graceful) at the end and check it exited cleanly."""
    command = [sys.executable, "-m", "server.cli.server_cmd", "server", "--data", str(data),
               "--db-url", db_url, "--api-port", "0", "--device-port", "0", *extra]
    with log.open("ab") as err:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=err)
    assert process.stdout is not None
    lines: dict[str, str] = {}
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, buffered = time.monotonic() + 60, b""
    try:
        while not {"API", "TLS", "DTLS"} <= lines.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"the server did not start; log: {log.read_text()[-3000:]}")
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"the server exited; log: {log.read_text()[-3000:]}")
            buffered += chunk
            *complete, buffered = buffered.split(b"\n")
            for line in (raw.decode() for raw in complete):
                if "API listening on " in line:
                    lines["API"] = line.split("listening on ", 1)[1].split()[0]
                elif "devices on " in line:
                    kind, address = line.split("devices on ", 1)[1].split()[:2]
                    lines[kind] = address
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        selector.close()
    try:
        yield PgServer(process, lines["API"], _address(lines["TLS"]), _address(lines["DTLS"]))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError("the server did not stop on SIGTERM") from None
        assert process.returncode == 0, f"exit {process.returncode}; log: {log.read_text()[-3000:]}"
        process.stdout.close()


def _fleet(server: PgServer, creds: Path, state: Path, product_id: int,
           ids: list[str]) -> EmulatedFleet:
    """Half the devices on TLS 1.3 (TCP), half on DTLS 1.2 (UDP)."""
    known = dict(find_credentials(creds))
    trust = TrustStore.initial(product_id, read_trust_file(creds / TRUST_FILE))
    members = [FleetMember(device_id, known[device_id], state / device_id,
                           "tcp" if index % 2 == 0 else "udp")
               for index, device_id in enumerate(ids)]
    settings = FleetSettings(server=server.tcp, udp_server=server.udp,
                             firmware=(SYSTEM_5003, APP_V1), trust_store=trust, **FAST)
    return EmulatedFleet(members, settings)


async def _upload_and_release(api: httpx.AsyncClient, product_id: int, version: int) -> None:
    files = {"binary": ("system-part1.bin", SYSTEM_5003, "application/octet-stream")}
    response = await api.post("/v1/device-os", files=files)
    assert response.status_code in (201, 409), response.text  # 409: uploaded before
    files = {"binary": ("firmware.bin", app(version), "application/octet-stream")}
    response = await api.post(f"/v1/products/{product_id}/firmware",
                              data={"version": str(version), "title": f"v{version}"},
                              files=files)
    assert response.status_code == 201, response.text
    response = await api.put(f"/v1/products/{product_id}/firmware/release", json={
        "version": version, "force": True, "product_default": True, "intelligent": True})
    assert response.status_code == 200, response.text


def _stored_versions(db_url: str, data: Path, ids: list[str]) -> dict[str, int | None]:
    store = Store.open(db_url, data / "blobs", pool_size=1)
    try:
        with store.read() as tx:
            return {device_id: tx.get_device(device_id).firmware_version  # type: ignore[union-attr]
                    for device_id in ids}
    finally:
        store.close()


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "two-workers"])
async def test_an_immediate_release_reaches_devices_on_both_transports_via_postgresql(
    pg_database: str, tmp_path: Path, workers: int
) -> None:
    """With worker processes the devices' sessions are spread over the processes and the
    release made through the main process's API reaches them through the event relay's
    table on PostgreSQL (server/relay.py)."""
    data, creds = tmp_path / "data", tmp_path / "creds"
    count = 2 * PER_TRANSPORT if workers == 0 else 4 * PER_TRANSPORT
    product_id, ids = await trio.to_thread.run_sync(_provision, pg_database, data, creds, count)
    token = await trio.to_thread.run_sync(_owner_token, pg_database, data)
    extra = ("--workers", str(workers)) if workers else ()
    with pg_server(data, pg_database, tmp_path / "server.log", *extra) as server:
        fleet = _fleet(server, creds, tmp_path / "state", product_id, ids)
        headers = {"Authorization": f"Bearer {token}"}
        watcher = await trio.to_thread.run_sync(
            partial(Store.open, pg_database, data / "blobs", pool_size=1))
        held_by_worker: list[str] = []
        try:
            async with (httpx.AsyncClient(base_url=server.api_url, timeout=30,
                                          headers=headers) as api,
                        running(fleet)):
                for device_id in ids:
                    await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
                if workers:
                    # The kernel spreads sessions at random (SO_REUSEPORT): make sure a
                    # worker holds some before the release, so the relay must carry it.
                    await spread_over_both_processes(fleet, watcher, ids[0])
                    held_by_worker = sorted(
                        device for device, owner in session_owners(watcher).items()
                        if owner.startswith("worker"))
                await _release_and_wait(api, fleet, pg_database, data, product_id, ids)
        finally:
            watcher.close()
    assert not (data / "ota.db").exists()  # the store was PostgreSQL only
    if workers:  # the relay carried the release made through the main API to the worker
        log = (tmp_path / "server.log").read_text()
        # A worker's lines are prefixed "worker N [pid]" in the main process's log.
        started = set(re.findall(r"^\S+ \S+ worker \d+ \[\d+\] INFO ota\.engine: update of "
                                 r"([0-9a-f]{24}) started", log, re.MULTILINE))
        assert held_by_worker, "no device on a worker"
        assert set(held_by_worker) <= started, (
            f"devices a worker held at the release: {held_by_worker}; updates the workers "
            f"started: {sorted(started)}; log: {log[-3000:]}")


async def _release_and_wait(api: httpx.AsyncClient, fleet: EmulatedFleet, pg_database: str,
                            data: Path, product_id: int, ids: list[str]) -> None:
    """Release version 2 through the API; wait until every device runs it and reported so."""
    await _upload_and_release(api, product_id, 2)
    for device_id in ids:
        await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
    with trio.fail_after(STEP):  # the devices' reports reach the database
        while set((await trio.to_thread.run_sync(
                _stored_versions, pg_database, data, ids)).values()) != {2}:
            await trio.sleep(0.05)
    response = await api.get(f"/v1/products/{product_id}/firmware/2")
    assert response.status_code == 200, response.text
