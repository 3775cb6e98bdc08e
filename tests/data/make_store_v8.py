"""Build ``tests/data/store-v8.tar.gz``: a data directory written by the last pre-Alembic server.

Run this file (from any newer checkout) with the Python of an install of commit 7d47bd3
(``main`` before Alembic; ``meta.schema_version`` 8), never with newer code, since the point
is a store *that* code wrote. The script's own directory, not the checkout, is first on
``sys.path``, so ``import server`` finds the old install (it prints which)::

    git worktree add /tmp/ota-7d47bd3 7d47bd3
    (cd /tmp/ota-7d47bd3 && bash scripts/bootstrap.sh)
    /tmp/ota-7d47bd3/.venv/bin/python tests/data/make_store_v8.py tests/data/store-v8.tar.gz

(the archive checked in was made so, with an editable install of that commit).
The script starts that code's server in-process (API only, no device
listeners) on a temporary directory and fills every table the way the server does: through
the REST API where it has a route, through the fleet service (what device sessions call)
for what devices report, and through the store's own queries for the rest (certificates,
relayed events, OTA memory). It then writes ``manifest.json`` beside the data directory:
the secrets the upgrade test signs in with and what it expects to find.

Archive layout: ``store-v8/data/`` (the data directory) and ``store-v8/manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import tarfile
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import trio

from otacore.module import build_module
from otacore.platforms import ModuleFunction
from server.api import ApiSettings
from server.app import ServerConfig, ServerHandle, serve
from server.events import Event, EventSource
from server.store import Store, UpdateStateRecord, schema
from server.store.tx_events import append_events
from server.store.tx_ota import OtaMemoryRecord

BORON = 13
DEVICES = [f"e00fce68{i:016x}" for i in range(1, 7)]
PASSWORD = "correct horse battery staple"


def firmware_image(version: int) -> bytes:
    """A valid Boron application of ``version`` (deterministic bytes)."""
    payload = hashlib.shake_256(f"store-v8/{version}".encode()).digest(3000 + 500 * version)
    return build_module(payload, platform_id=BORON, function=ModuleFunction.USER_PART,
                        version=6, product_id=BORON, product_version=version)


def check(response: httpx.Response, *codes: int) -> Any:
    """The response's JSON, after checking its status."""
    if response.status_code not in (codes or (200, 201)):
        raise SystemExit(f"{response.request.method} {response.request.url}: "
                         f"{response.status_code} {response.text}")
    return response.json()


async def fill(handle: ServerHandle, manifest: dict[str, Any]) -> None:
    """Fill the store through the running server ``handle``."""
    fleet, store = handle.fleet, handle.store
    owner = fleet.create_api_token_sync("owner", label="store-v8 owner")
    manifest["owner_token"] = owner.access_token
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30,
                                 headers={"Authorization": f"Bearer {owner.access_token}"}) as api:
        product = check(await api.post("/v1/products", json={
            "name": "Upgrade Widget", "platform_id": BORON, "description": "made by 7d47bd3"}))
        slug = product["product"]["slug"]
        manifest["product"] = slug
        p = f"/v1/products/{slug}"
        for version in (1, 2, 3):
            check(await api.post(f"{p}/firmware", data={
                "version": str(version), "title": f"v{version}", "description": f"build {version}",
            }, files={"binary": (f"fw{version}.bin", firmware_image(version))}))
        manifest["firmware"] = {
            str(v): hashlib.sha256(firmware_image(v)).hexdigest() for v in (1, 2, 3)}
        system = build_module(b"\x11" * 3000, platform_id=BORON,
                              function=ModuleFunction.SYSTEM_PART, index=1, version=5003)
        check(await api.post("/v1/device-os", files={"binary": ("system.bin", system)}))
        for name in ("beta", "field"):
            check(await api.post(f"{p}/groups", json={"name": name, "description": name}))
        for device in DEVICES:
            check(await api.post(f"{p}/devices", json={"id": device}))
        # Every device reports v1 (firmware seen running), then is shaped below.
        for device in DEVICES:
            await fleet.record_device_hello(device, platform_id=BORON, product_version=1,
                                            system_version=5003, ip="192.0.2.7",
                                            session=f"v8-origin/{device}")
            await fleet.record_describe(device, [{
                "function": ModuleFunction.USER_PART, "index": 1, "version": 6, "store": 0,
                "size": len(firmware_image(1)), "sha256": manifest["firmware"]["1"],
                "dependencies": []}])
        check(await api.put(f"{p}/firmware/release", json={"version": 1, "product_default": True}))
        check(await api.put(f"{p}/firmware/release", json={"version": 2, "groups": ["field"],
                                                          "force": True}))
        check(await api.put(f"{p}/devices/{DEVICES[0]}", json={
            "name": "kitchen", "notes": "locked and flashed", "desired_firmware_version": 2,
            "flash": True}))
        check(await api.put(f"{p}/devices/{DEVICES[1]}", json={"groups": ["beta"]}))
        check(await api.put(f"{p}/devices/{DEVICES[2]}", json={"groups": ["beta", "field"],
                                                               "firmware_updates_forced": True}))
        check(await api.put(f"{p}/devices/{DEVICES[3]}", json={"groups": ["field"]}))
        check(await api.put(f"{p}/devices/{DEVICES[4]}", json={"development": True}))
        rollout = check(await api.post(f"{p}/rollouts", json={
            "version": 3, "groups": ["beta"], "phases": "100", "phase_wait": 600,
            "max_failure_percent": 50, "min_sample": 1, "force": True}))["rollout"]
        manifest["rollout"] = rollout["id"]
        for device, outcome in ((DEVICES[1], "succeeded"), (DEVICES[2], "download_failed")):
            await fleet.record_rollout_outcome(slug, rollout["id"], device, outcome)
        # Windows after the rollout placed its devices (a closed window holds a phase).
        check(await api.put(f"{p}/window", json={"cron": "0 2 * * *", "duration": 120,
                                                  "timezone": "Europe/Berlin"}))
        check(await api.put(f"{p}/window", json={"cron": "30 3 * * 1-5", "duration": 60,
                                                  "group": "beta"}))
        check(await api.post(f"{p}/devices/{DEVICES[5]}/revoke", json={}))
        check(await api.post(f"{p}/events", data={"name": "store-v8/hello", "data": "hi"}))
        # People: an operator with a password, a product team member, an API user, a client.
        fleet.create_user_sync("operator@example.com", PASSWORD, "administrator")
        fleet.create_user_sync("member@example.com", PASSWORD, "none")
        check(await api.post(f"{p}/team", json={"username": "member@example.com",
                                                 "role": "developer"}))
        bot = check(await api.post(f"{p}/team", json={
            "friendly_name": "CI pipeline", "scopes": ["devices:list", "firmware:get"]}))
        manifest["api_user_token"] = bot["created"]["tokens"][0]["token"]
        client_id, secret = fleet.create_client_sync("provisioner", "administrator")
        manifest["client"] = {"id": client_id, "secret": secret}
        grant = check(await api.post("/oauth/token", data={
            "grant_type": "password", "username": "operator@example.com",
            "password": PASSWORD}))
        manifest["operator"] = {"username": "operator@example.com", "password": PASSWORD,
                                "access_token": grant["access_token"],
                                "refresh_token": grant["refresh_token"]}
    for device in DEVICES[:4]:
        await fleet.device_offline(device, session=f"v8-origin/{device}")
    now = fleet.clock()
    with store.write() as tx:
        tx.record_issued_certificate(sha256="ab" * 32, serial="01f3", device_id=DEVICES[0],
                                     not_after=now + 86_400_000, now=now)
        tx.record_seen_certificate(sha256="cd" * 32, serial="02a1", device_id=DEVICES[4],
                                   not_after=now + 86_400_000, now=now)
        append_events(tx.conn, "v8-origin", [
            Event("spark/status", "online", product_id=1, device_id=DEVICES[4],
                  coreid=DEVICES[4], source=EventSource.DEVICE),
            Event("spark/flash/status", "started", product_id=1, device_id=DEVICES[0],
                  coreid=DEVICES[0], source=EventSource.CLOUD)])
        # What the OTA engine remembers of DEVICES[0] (the flash in flight to it).
        tx.put_ota_memory(OtaMemoryRecord(DEVICES[0], updating_sha256=manifest["firmware"]["2"],
                                          refused=(manifest["firmware"]["3"],)), now=now)
        tx.put_update_state(UpdateStateRecord(
            DEVICES[0], manifest["firmware"]["2"], 2, "full", 1024, 4000, "downloading",
            now, now))
    delta = build_module(b"\x22" * 900, platform_id=BORON, function=ModuleFunction.USER_PART,
                         version=6, product_id=BORON, product_version=3)
    # 7d47bd3's signature (base, target, patch, target_size): this script runs only with that
    # commit's code (see the docstring), whose store had no format version per patch.
    await fleet.save_delta(manifest["firmware"]["2"], manifest["firmware"]["3"], delta, 5500)
    with store.write() as tx:
        fleet.transfer_bytes_work(1, 2, DEVICES[3], bytes_sent=900, bytes_full=4000,
                                  transfer="delta")(tx)
    manifest["devices"] = DEVICES


async def build(data_dir: Path, manifest: dict[str, Any]) -> None:
    """Run the server on ``data_dir``, fill it, stop it gracefully."""
    config = ServerConfig(data_dir=data_dir, api_port=0, store_threads=2, device_port=None,
                          api=ApiSettings(), graceful_timeout=1.0)
    async with trio.open_nursery() as nursery:
        handle: ServerHandle = await nursery.start(serve, config)
        await fill(handle, manifest)
        handle.shutdown.set()
    # A server that crashed leaves its devices online, owned by its sessions (the graceful
    # stop above marked every device offline): two devices are left so.
    store = Store.open_dir(data_dir, pool_size=1)
    try:
        with store.write() as tx:
            for device in DEVICES[4:]:
                tx.update_device(device, {"online": True, "session_owner": f"v8-origin/{device}",
                                          "last_ip_address": "192.0.2.7"}, 1796600000000)
        with store.read() as tx:
            manifest["rows"] = {name: len(rows) for name, rows in tx.dump_tables().items()}
            manifest["schema_version"] = tx.conn.execute(
                sa.select(schema.meta.c.value)).scalar_one()
    finally:
        store.close()


def main() -> None:
    """Write the archive named on the command line."""
    out = Path(sys.argv[1]).resolve()
    import server  # the code that writes the store: print where it came from

    print(f"writing with server code from {Path(server.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store-v8"
        root.mkdir()
        manifest: dict[str, Any] = {}
        trio.run(build, root / "data", manifest)
        if manifest["schema_version"] != "8":
            raise SystemExit(f"expected schema version 8, got {manifest['schema_version']}")
        # Fold the WAL into the database file, so the archive holds one self-contained file.
        with closing(sqlite3.connect(root / "data" / "ota.db")) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for leftover in ("ota.db-wal", "ota.db-shm"):
            wal = root / "data" / leftover
            if wal.exists() and wal.stat().st_size and leftover.endswith("wal"):
                raise SystemExit("the WAL was not checkpointed")
            wal.unlink(missing_ok=True)
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        with tarfile.open(out, "w:gz") as archive:
            archive.add(root, arcname="store-v8")
    print(f"wrote {out} ({out.stat().st_size} bytes): rows {manifest['rows']}")


if __name__ == "__main__":
    main()
