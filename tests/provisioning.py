"""Provisioned devices registered in any store (SQLite or PostgreSQL): what
``ota device provision`` does for the SQLite store of ``--data``
(server.cli.device_store_cmd), for tests whose store is given by URL."""

from __future__ import annotations

from pathlib import Path

from server.cli.device_store_cmd import _register_one
from server.devices.keys import product_key_state, write_trust_file
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.base import now_ms
from server.identity import ProvisionedDevice, init_pki, pki_dir, provision_devices
from server.private_files import secure_data_dir
from server.store import Store


def provision_product(store: Store, data_dir: Path, creds_dir: Path, count: int, *,
                      name: str = "Sensors", platform_id: int = 13
                      ) -> tuple[int, list[ProvisionedDevice]]:
    """Create a product in ``store`` with ``count`` devices whose certificates come from the
    CA in ``data_dir`` (created when missing) and go to ``creds_dir`` with the product's
    trusted signing key."""
    secure_data_dir(data_dir)
    product = Fleet(store, EventBus()).create_product_sync(SYSTEM_ACTOR, name, platform_id)
    init_pki(pki_dir(data_dir))
    devices = provision_devices(pki_dir(data_dir), count, creds_dir)
    with store.write() as tx:
        for device in devices:
            _register_one(tx, product.id, product.slug, device, now_ms())
    keys = product_key_state(store, data_dir, product.id)
    write_trust_file(creds_dir, [keys.key], len(keys.statements), product_id=product.id)
    return product.id, devices
