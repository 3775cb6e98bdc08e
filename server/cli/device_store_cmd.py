"""``ota device provision`` registration in the store, ``ota device revoke`` and
``ota device reinstate``.

Provisioning records every certificate it issues (fingerprint, serial, device, notAfter)
in the store, so revoking a device revokes them all; provisioning a device id that is
already in the product issues it a new certificate (the way back after a revocation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer

from server.cli._output import print_json
from server.cli.device_identity_cmd import register_commands
from server.cli.fleet_cmd import ApiUrl, AsJson, Product, Token, _client
from server.devices.keys import product_key_state, write_trust_file
from server.fleet.base import FleetBase, now_ms
from server.fleet.errors import DuplicateError
from server.identity import ProvisionedDevice, init_pki, pki_dir, provision_devices
from server.store import Tx
from server.store.installation import Installation


class StoreRegistrar:
    """Registers provisioned devices with a product, in one transaction."""

    def check_product(self, where: Installation | Path, product: str) -> None:
        """Raise NotFoundError unless the product exists."""
        store = Installation.of(where).open_store()
        try:
            with store.read() as tx:
                FleetBase._product(tx, _ref(product))
        finally:
            store.close()

    def register(
        self, where: Installation | Path, product: str, devices: Sequence[ProvisionedDevice]
    ) -> None:
        """Add every device to the product and record its new certificate (all or none),
        then write the trusted signing key. A device already in the product is
        re-provisioned: its new certificate is accepted even if the device was revoked
        (its older certificates stay revoked). A device of another product is refused.
        A bare directory means the installation's embedded store."""
        installation = Installation.of(where)
        data_dir = installation.data_dir
        store = installation.open_store()
        try:
            now = now_ms()
            with store.write() as tx:
                record = FleetBase._product(tx, _ref(product))
                for device in devices:
                    _register_one(tx, record.id, record.slug, device, now)
            if devices:
                keys = product_key_state(store, data_dir, record.id)
                write_trust_file(devices[0].ca_path.parent, [keys.key], len(keys.statements),
                                 product_id=record.id)
        finally:
            store.close()


    def standing(
        self, where: Installation | Path, device_id: str, sha256: str
    ) -> dict[str, object]:
        """Registered / issued / seen / revoked, as the store records them."""
        store = Installation.of(where).open_store()
        try:
            with store.read() as tx:
                standing = tx.certificate_standing(device_id, sha256)
        finally:
            store.close()
        known = standing.certificate
        return {
            "device_registered": standing.registered,
            "issued_by_this_server": known is not None and known.issued_at is not None,
            "seen_at_handshake": known is not None and known.first_seen_at is not None,
            "certificate_revoked": known is not None and known.revoked,
            "device_under_revocation": standing.revocation is not None,
        }


def _register_one(
    tx: Tx, product_id: int, product_slug: str, device: ProvisionedDevice, now: int
) -> None:
    existing = tx.get_device(device.device_id)
    if existing is not None and existing.product_id != product_id:
        other = tx.get_product(existing.product_id)
        raise DuplicateError(
            f"device {device.device_id} belongs to product "
            f"{other.slug if other else existing.product_id}, not {product_slug}; "
            "remove it there first"
        )
    if existing is None:
        tx.insert_device(device.device_id, product_id, now)
    tx.record_issued_certificate(
        sha256=device.cert_sha256,
        serial=device.cert_serial,
        device_id=device.device_id,
        not_after=int(device.not_after.timestamp() * 1000),
        now=now,
    )
    # The device row's flag mirrors the certificates: it now has a valid one.
    tx.update_device(device.device_id, {"certs_revoked": False}, now)
    revocation = tx.get_revocation(device.device_id)
    tx.add_audit(
        actor="admin:provision",
        action="device.add" if existing is None else "device.reprovision",
        product_id=product_id,
        target=f"device:{device.device_id}",
        details={
            "cert_sha256": device.cert_sha256,
            "cert_serial": device.cert_serial,
            "after_revocation": revocation is not None,
        },
        now=now,
    )


def _ref(product: str) -> int | str:
    return int(product) if (product.isascii() and product.isdigit()) else product


def revoke(device_id: str, product: str = Product, api_url: str = ApiUrl,
           token: str | None = Token, as_json: bool = AsJson) -> None:
    """Revoke a device's certificates: its live session closes, new handshakes fail."""
    with _client(api_url, token) as client:
        result = client.revoke_device(product, device_id)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"revoked {device_id}")


def reinstate(device_id: str, product: str = Product, api_url: str = ApiUrl,
              token: str | None = Token, as_json: bool = AsJson) -> None:
    """Lift a device's revocation: its certificates are accepted again (audit-logged).
    To give a revoked device a fresh identity instead, provision it again with --id."""
    with _client(api_url, token) as client:
        result = client.reinstate_device(product, device_id)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"reinstated {device_id}")


def attach(device_app: typer.Typer) -> None:
    """Add provisioning, PKI and revocation commands to ``ota device``."""
    register_commands(device_app, registrar=StoreRegistrar())
    device_app.command("revoke")(revoke)
    device_app.command("reinstate")(reinstate)


def create_provisioned_product(
    data_dir: Path, creds_dir: Path, name: str, platform_id: int, count: int,
    *, db_url: str | None = None,
) -> tuple[int, list[ProvisionedDevice]]:
    """Create a product in the store of the installation at ``data_dir`` (and ``db_url``)
    with ``count`` provisioned devices (certificates in ``creds_dir``): what the demo,
    benchmarks and tests start from."""
    from server.events import EventBus
    from server.fleet import SYSTEM_ACTOR, Fleet

    installation = Installation(data_dir, db_url)
    store = installation.open_store()
    try:
        product = Fleet(store, EventBus()).create_product_sync(SYSTEM_ACTOR, name, platform_id)
    finally:
        store.close()
    init_pki(pki_dir(data_dir))
    devices = provision_devices(pki_dir(data_dir), count, creds_dir)
    StoreRegistrar().register(installation, str(product.id), devices)
    return product.id, devices
