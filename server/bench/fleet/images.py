"""Benchmark firmware and the prepared installation (store, product, devices, API token).

The application images are real Particle modules of exactly ``app_size`` bytes (header,
payload, product data suffix and CRC included) for a Boron (platform 13); their payloads are
pseudo-random, so a full image costs its whole size on the wire (nothing compresses, so
compressed OTA does not apply either). For a delta release, v2 is v1's payload with a few
small edits (a patch release: a bug fix, a changed constant), so the server's delta from v1
is a few hundred bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from otacore.module import ModuleDependency, build_module
from otacore.platforms import ModuleFunction
from server.bench.fleet import BenchError
from server.cli.device_store_cmd import StoreRegistrar
from server.devices.keys import product_signing_key, write_trust_file
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.base import now_ms
from server.identity import ProvisionedDevice, pki_dir, provision_devices
from server.store import Store
from server.store.store import BLOB_DIRNAME

PLATFORM_BORON = 13
SYSTEM_VERSION = 5000
#: The system part only has to satisfy the application's dependency (it is never sent).
SYSTEM_PART_SIZE = 16 * 1024


@dataclass(frozen=True)
class Installation:
    """What the preparation step produced (paths live under the work directory)."""

    data_dir: Path
    #: The database every server uses (``ota server --db-url``); None: the embedded
    #: SQLite store in ``data_dir``.
    db_url: str | None
    creds_dir: Path
    product_id: int
    token: str
    device_ids: list[str]
    system_image: Path
    app_images: dict[int, Path]  # product version -> module file


def _pseudo_random(label: str, size: int) -> bytes:
    return hashlib.shake_256(label.encode()).digest(size)


def system_part() -> bytes:
    """Device OS system part 1 v5000 for the Boron (what every device starts with)."""
    payload = _pseudo_random("bench system part", SYSTEM_PART_SIZE - 64)
    return build_module(
        payload,
        platform_id=PLATFORM_BORON,
        function=ModuleFunction.SYSTEM_PART,
        index=1,
        version=SYSTEM_VERSION,
    )


#: Offsets (fractions of the payload) and bytes a patch release changes.
PATCH_EDITS = ((0.12, b"fix: debounce"), (0.5, b"\x2a\x00\x00\x00"), (0.83, b"v2 timeout 30s"))


def _patched(payload: bytes) -> bytes:
    out = bytearray(payload)
    for fraction, data in PATCH_EDITS:
        at = int(len(out) * fraction)
        if at + len(data) <= len(out):  # same length: the edit replaces bytes in place
            out[at : at + len(data)] = data
    return bytes(out)


def application(version: int, product_id: int, size: int, *, patch_of: int | None = None) -> bytes:
    """Application (user part 1) ``version`` of ``product_id``: exactly ``size`` bytes; with
    ``patch_of``, the payload of that version with :data:`PATCH_EDITS` applied."""

    def payload(payload_size: int) -> bytes:
        if patch_of is None:
            return _pseudo_random(f"bench application {version}", payload_size)
        return _patched(_pseudo_random(f"bench application {patch_of}", payload_size))

    def build(payload_size: int) -> bytes:
        return build_module(
            payload(payload_size),
            platform_id=PLATFORM_BORON,
            function=ModuleFunction.USER_PART,
            index=1,
            version=version,
            product_id=product_id,
            product_version=version,
            dependencies=[ModuleDependency(ModuleFunction.SYSTEM_PART, 1, SYSTEM_VERSION)],
        )

    overhead = len(build(0))
    if size <= overhead:
        raise BenchError(f"an application module needs more than {overhead} bytes")
    image = build(size - overhead)
    if len(image) != size:  # the format has no padding rules beyond this; check anyway
        raise BenchError(f"built a {len(image)}-byte application instead of {size} bytes")
    return image


def open_store(data_dir: Path, db_url: str | None) -> Store:
    """The store a server on ``data_dir`` with ``--db-url db_url`` opens (blobs in the
    data directory either way)."""
    if db_url is None:
        return Store.open_dir(data_dir, pool_size=1)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Store.open(db_url, data_dir / BLOB_DIRNAME, pool_size=1)


def _register(
    data_dir: Path, db_url: str, product_id: int, devices: list[ProvisionedDevice]
) -> None:
    """Add freshly provisioned devices to the product in the store at ``db_url`` (one
    transaction, as ``ota device provision`` does for the embedded store) and write the
    product's trust file next to their credentials."""
    store = open_store(data_dir, db_url)
    try:
        now = now_ms()
        with store.write() as tx:
            for device in devices:
                tx.insert_device(device.device_id, product_id, now)
                tx.record_issued_certificate(
                    sha256=device.cert_sha256,
                    serial=device.cert_serial,
                    device_id=device.device_id,
                    not_after=int(device.not_after.timestamp() * 1000),
                    now=now,
                )
        key = product_signing_key(store, data_dir, product_id)
    finally:
        store.close()
    write_trust_file(devices[0].ca_path.parent, [key], 0, product_id=product_id)


def prepare_installation(
    work_dir: Path,
    devices: int,
    app_size: int,
    *,
    patch_release: bool = False,
    db_url: str | None = None,
) -> Installation:
    """Create the store (in the data directory, or the database at ``db_url``), a product,
    an owner token, ``devices`` provisioned devices (one store transaction) and the
    firmware files (``patch_release``: v2 is a patch of v1). Blocking: run it in a worker
    thread."""
    data_dir, creds_dir, firmware_dir = work_dir / "data", work_dir / "creds", work_dir / "fw"
    for path in (data_dir, creds_dir):
        if path.exists():
            raise BenchError(f"{path} exists already: give an empty work directory")
    firmware_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(data_dir, db_url)
    try:
        fleet = Fleet(store, EventBus())
        product = fleet.create_product_sync(SYSTEM_ACTOR, "Fleet benchmark", PLATFORM_BORON)
        token = fleet.create_api_token_sync("owner", label="fleet benchmark").access_token
    finally:
        store.close()
    provisioned = provision_devices(pki_dir(data_dir), devices, creds_dir)
    if db_url is None:
        StoreRegistrar().register(data_dir, str(product.id), provisioned)
    else:
        _register(data_dir, db_url, product.id, provisioned)
    system_path = firmware_dir / "system-part1.bin"
    system_path.write_bytes(system_part())
    app_paths: dict[int, Path] = {}
    for version in (1, 2):
        path = firmware_dir / f"app-v{version}.bin"
        patch_of = 1 if patch_release and version == 2 else None
        path.write_bytes(application(version, product.id, app_size, patch_of=patch_of))
        app_paths[version] = path
    return Installation(
        data_dir=data_dir,
        db_url=db_url,
        creds_dir=creds_dir,
        product_id=product.id,
        token=token,
        device_ids=sorted(d.device_id for d in provisioned),
        system_image=system_path,
        app_images=app_paths,
    )
