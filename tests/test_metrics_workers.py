"""``/metrics`` of ``ota server --workers 2`` (a real subprocess): the main process's
endpoint shows the sum over both processes (sessions each holds, the bytes and updates of a
release served by both), a SIGKILLed worker's sessions leave the gauge while its counters
stay, and the run's metrics directory is private and removed at the end."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import trio

from otacore.signing import TrustStore
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from server.metrics.aggregate import WORKER_DIR_PREFIX
from server.store import Store
from tests.test_metrics_release import Samples, key, scrape, scrape_until
from tests.test_multiprocess_server import (
    DEVICES,
    ServerProcess,
    children,
    session_owners,
    setup_store,
    spread_over_both_processes,
)
from tests.test_ota_e2e_kit import APP_V1, FAST, SYSTEM_5003, app, updated_to

V2 = app(2)


def run_dirs(pid: int) -> list[Path]:
    """The metrics directories a server process created (named in its workers'
    environment)."""
    found = []
    for child in children(pid):
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for item in environ:
            if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                found.append(Path(item.split(b"=", 1)[1].decode()))
    return found


def total(found: Samples, name: str, label: str, values: tuple[str, ...]) -> float:
    return sum(found.get((name, ((label, value),)), 0.0) for value in values)


async def test_workers_are_summed_into_one_exposition(tmp_path: Path) -> None:
    data, creds, log_path = tmp_path / "data", tmp_path / "creds", tmp_path / "server.log"
    product, ids, token = await trio.to_thread.run_sync(setup_store, data, creds)
    server = await ServerProcess.start(data, log_path)
    store = Store.open_dir(data, pool_size=1)
    try:
        await server.read_banner()
        (metrics_dir,) = run_dirs(server.process.pid)
        assert metrics_dir.name.startswith(WORKER_DIR_PREFIX)
        assert metrics_dir.stat().st_mode & 0o777 == 0o700
        trust = TrustStore.initial(product, read_trust_file(creds / TRUST_FILE))
        found = dict(find_credentials(creds))
        members = [
            FleetMember(device_id, found[device_id], tmp_path / "state" / device_id,
                        "tcp" if n % 2 == 0 else "udp")
            for n, device_id in enumerate(ids)
        ]
        settings = FleetSettings(
            server=server.address("TLS"), udp_server=server.address("DTLS"),
            firmware=(SYSTEM_5003, APP_V1), trust_store=trust, **FAST,
            keepalive_interval=1.0, keepalive_timeout=2.0)  # fmt: skip
        fleet = EmulatedFleet(members, settings)
        headers = {"Authorization": f"Bearer {token}"}
        async with (httpx.AsyncClient(base_url=server.api_url, headers=headers,
                                      timeout=30) as api,
                    trio.open_nursery() as nursery):
            before = await scrape(api)
            await nursery.start(fleet.run)
            await fleet.wait_until(lambda f: f.summary().online == len(ids), timeout=60)
            await spread_over_both_processes(fleet, store, ids[0])
            owners = session_owners(store)
            print("sessions per process:", {o: list(owners.values()).count(o)
                                            for o in set(owners.values())})
            # Every device's session is in the sum, whichever process holds it.
            await scrape_until(api, before, {key("ota_sessions", transport="tcp"): DEVICES / 2,
                                             key("ota_sessions", transport="udp"): DEVICES / 2})

            response = await api.post(f"/v1/products/{product}/firmware", data={
                "version": "2", "title": "v2"}, files={"binary": ("app.bin", V2)})
            assert response.status_code == 201, response.text
            response = await api.put(f"/v1/products/{product}/firmware/release", json={
                "version": 2, "product_default": True, "intelligent": True, "force": True})
            assert response.status_code == 200, response.text
            await fleet.wait_until(lambda f: all(updated_to(d, 2)(f) for d in ids), timeout=60)
            # Both processes updated devices: the sum holds every byte and update.
            released = await scrape_until(api, before, {
                key("ota_bytes_sent_total", kind="full"): DEVICES * len(V2),
                key("ota_updates_total", result="succeeded"): DEVICES,
                key("ota_transfers_active"): 0,
            }, timeout=60)

            # SIGKILL the worker: its sessions leave the sum at once (the supervisor marks it
            # dead), its counters stay (a counter never goes back); it is restarted.
            worker = server.worker_pid
            os.kill(worker, signal.SIGKILL)
            await scrape_until(api, before, {key("ota_worker_exits_total"): 1})
            after_kill = await scrape(api)
            for name, label, values in (("ota_bytes_sent_total", "kind", ("full",)),
                                        ("ota_updates_total", "result", ("succeeded",))):
                assert total(after_kill, name, label, values) >= total(
                    released, name, label, values)
            await fleet.wait_until(lambda f: f.summary().online == len(ids), timeout=60)
            await scrape_until(api, before, {key("ota_sessions", transport="tcp"): DEVICES / 2,
                                             key("ota_sessions", transport="udp"): DEVICES / 2},
                               timeout=60)
            nursery.cancel_scope.cancel()
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await server.process.wait() == 0, log_path.read_text()[-3000:]
        assert not metrics_dir.exists()  # removed with the run
    finally:
        store.close()
        if server.process.returncode is None:
            for pid in children(server.process.pid):
                os.kill(pid, signal.SIGKILL)
            server.process.kill()
            await server.process.wait()
