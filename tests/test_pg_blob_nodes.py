"""Two ``ota server`` nodes on one PostgreSQL database, each with its OWN copy of the data
directory and no blob directory at all (issue 16: "nodes share nothing but the database"):
firmware and a Device OS part uploaded through node A's API are served by node B, from the
database, to devices of both transports (TLS and DTLS) connected to node B only."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import trio

from otacore.signing import TrustStore
from server.cli.device_store_cmd import create_provisioned_product
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from server.events import EventBus
from server.fleet import Fleet
from server.store import DatabaseBlobStore
from server.store.installation import open_installation_store
from server.store.store import BLOB_DIRNAME, DB_FILENAME
from tests.server_nodes import release, running_node, upload
from tests.test_ota_e2e_kit import APP_V1, FAST, SYSTEM_5003, app, sha, updated_to

REPO = Path(__file__).resolve().parent.parent
DEVICES = 4  # alternating TLS / DTLS
#: A full-size application: several 64 KiB chunks in the database.
IMAGE_SIZE = 200_000


def setup_installation(data: Path, creds: Path, db_url: str) -> tuple[int, list[str], str]:
    """A product with DEVICES provisioned devices in the PostgreSQL store, and an owner's
    API token."""
    product_id, provisioned = create_provisioned_product(
        data, creds, "Sensors", 13, DEVICES, db_url=db_url
    )
    store = open_installation_store(data, db_url)
    try:
        assert isinstance(store.blobs, DatabaseBlobStore)
        token = Fleet(store, EventBus()).create_api_token_sync("owner").access_token
    finally:
        store.close()
    return product_id, sorted(d.device_id for d in provisioned), token


def copy_without_store(data: Path, copy: Path) -> Path:
    """A node's own copy of the data directory: keys, CA, certificates; no store, no blobs."""
    shutil.copytree(data, copy, ignore=lambda _, names: [
        n for n in names if n == BLOB_DIRNAME or n.startswith(DB_FILENAME) or n == "server.lock"
    ])
    return copy


async def test_a_device_on_node_b_takes_firmware_uploaded_through_node_a(
    tmp_path: Path, pg_database: str
) -> None:
    data, creds = tmp_path / "data", tmp_path / "creds"
    product, ids, token = await trio.to_thread.run_sync(
        setup_installation, data, creds, pg_database
    )
    assert not (data / BLOB_DIRNAME).exists()
    dir_a = copy_without_store(data, tmp_path / "node-a")
    dir_b = copy_without_store(data, tmp_path / "node-b")
    trust = TrustStore.initial(product, read_trust_file(creds / TRUST_FILE))
    found = dict(find_credentials(creds))
    kinds = {d: ("tcp" if n % 2 == 0 else "udp") for n, d in enumerate(ids)}
    image = app(2, size=IMAGE_SIZE)
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        running_node(dir_a, pg_database, tmp_path / "node-a.log", graceful_stop=True) as node_a,
        running_node(dir_b, pg_database, tmp_path / "node-b.log", graceful_stop=True) as node_b,
        httpx.AsyncClient(base_url=node_a.api_url, headers=headers, timeout=30) as api_a,
        httpx.AsyncClient(base_url=node_b.api_url, headers=headers, timeout=30) as api_b,
        trio.open_nursery() as nursery,
    ):
        response = await api_a.post(
            "/v1/device-os",
            files={"binary": ("system-part1.bin", SYSTEM_5003, "application/octet-stream")},
        )
        assert response.status_code == 201, response.text
        await upload(api_a, product, 2, image)
        await release(api_a, product, 2)
        # Node B serves the binary it never received (the API's download of it too).
        download = await api_b.get(f"/v1/products/{product}/firmware/2/binary")
        assert download.status_code == 200 and download.content == image
        members = [
            FleetMember(d, found[d], tmp_path / "state" / d, kinds[d])  # type: ignore[arg-type]
            for d in ids
        ]
        settings = FleetSettings(
            endpoints=(node_b.endpoint,), firmware=(SYSTEM_5003, APP_V1), trust_store=trust,
            **FAST,
        )
        fleet = EmulatedFleet(members, settings, seed=1)
        await nursery.start(fleet.run)
        await fleet.wait_until(lambda f: all(updated_to(d, 2)(f) for d in ids), timeout=120)
        assert fleet.online_by_endpoint() == {node_b.endpoint.name: DEVICES}
        transports = {fleet.device(d).device.status().transport for d in ids}
        assert transports == {"tcp", "udp"}, transports
        nursery.cancel_scope.cancel()
    # Neither node ever made a blob directory: the blobs are in the database alone.
    assert not (dir_a / BLOB_DIRNAME).exists() and not (dir_b / BLOB_DIRNAME).exists()
    store = open_installation_store(dir_b, pg_database)
    try:
        assert {sha(image), sha(SYSTEM_5003)} <= set(store.blobs.names())
        assert store.blobs.get(sha(image)) == image
    finally:
        store.close()
