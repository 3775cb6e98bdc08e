"""``ota device provision`` registration in the store, and ``ota device revoke``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer

from server.cli._output import fail, print_json
from server.cli.device_identity_cmd import register_commands
from server.client import ApiClient, ApiError
from server.devices.keys import product_signing_key, product_statements, write_trust_file
from server.fleet.base import FleetBase, now_ms
from server.identity import ProvisionedDevice, init_pki, pki_dir, provision_devices
from server.store import Store


class StoreRegistrar:
    """Registers provisioned devices with a product, in one transaction."""

    def check_product(self, data_dir: Path, product: str) -> None:
        """Raise NotFoundError unless the product exists."""
        store = Store.open_dir(data_dir, pool_size=1)
        try:
            with store.read() as tx:
                FleetBase._product(tx, _ref(product))
        finally:
            store.close()

    def register(self, data_dir: Path, product: str, devices: Sequence[ProvisionedDevice]) -> None:
        """Add every device to the product (all or none) and write the trusted signing key."""
        store = Store.open_dir(data_dir, pool_size=1)
        try:
            now = now_ms()
            with store.write() as tx:
                record = FleetBase._product(tx, _ref(product))
                for device in devices:
                    tx.insert_device(device.device_id, record.id, now)
                    tx.add_audit(actor="admin:provision", action="device.add",
                                 product_id=record.id, target=f"device:{device.device_id}",
                                 details={"cert_sha256": device.cert_sha256}, now=now)
        finally:
            store.close()
        if devices:
            key = product_signing_key(data_dir, record.id)
            sequence = len(product_statements(data_dir, record.id))
            write_trust_file(devices[0].ca_path.parent, [key], sequence, product_id=record.id)


def _ref(product: str) -> int | str:
    return int(product) if (product.isascii() and product.isdigit()) else product


def revoke(
    device_id: str,
    product: str = typer.Option(..., "--product", "-p", envvar="OTA_PRODUCT"),
    api_url: str = typer.Option("http://127.0.0.1:8080", "--api-url", envvar="OTA_API_URL"),
    token: str | None = typer.Option(None, "--token", envvar="OTA_TOKEN"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Revoke a device's certificates: its live session closes, new handshakes fail."""
    with ApiClient(api_url, token) as client:
        try:
            result = client.revoke_device(product, device_id)
        except ApiError as exc:
            fail(exc.message if exc.status else str(exc))
    if as_json:
        print_json(result)
    else:
        typer.echo(f"revoked {device_id}")


def attach(device_app: typer.Typer) -> None:
    """Add provisioning, PKI and revocation commands to ``ota device``."""
    register_commands(device_app, registrar=StoreRegistrar())
    device_app.command("revoke")(revoke)


def create_provisioned_product(
    data_dir: Path, creds_dir: Path, name: str, platform_id: int, count: int
) -> tuple[int, list[ProvisionedDevice]]:
    """Create a product in the store at ``data_dir`` with ``count`` provisioned devices
    (certificates in ``creds_dir``): what the demo, benchmarks and tests start from."""
    from server.events import EventBus
    from server.fleet import SYSTEM_ACTOR, Fleet

    store = Store.open_dir(data_dir, pool_size=1)
    try:
        product = Fleet(store, EventBus()).create_product_sync(SYSTEM_ACTOR, name, platform_id)
    finally:
        store.close()
    init_pki(pki_dir(data_dir))
    devices = provision_devices(pki_dir(data_dir), count, creds_dir)
    StoreRegistrar().register(data_dir, str(product.id), devices)
    return product.id, devices
