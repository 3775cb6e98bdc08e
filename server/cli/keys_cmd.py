"""``ota product rotate-key`` and ``ota product withdraw-key``: the product's firmware
signing keys, in the store (every node signs with the new key from its next offer on).
Devices learn of a rotation or withdrawal in the answer to their next Hello, and devices
online now before their next offer (``server.devices.key_sync``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from otacore.errors import OtaError
from server.cli._output import fail, print_json
from server.cli._store import DbUrl
from server.devices.keys import MAX_PRODUCT_KEYS, rotate_product_key, withdraw_product_key
from server.fleet.base import FleetBase, now_ms
from server.fleet.roles import SYSTEM_ACTOR
from server.store import Store
from server.store.installation import open_installation_store


def _product_id(store: Store, product: str) -> int:
    with store.read() as tx:
        return FleetBase._product(tx, product).id  # an id or a slug, as the API takes


def _audit(store: Store, product_id: int, action: str, key_id: str,
           details: dict[str, Any]) -> None:
    """Record a change of the product's signing keys in the audit log."""
    with store.write() as tx:
        tx.add_audit(actor=SYSTEM_ACTOR.subject, action=action, product_id=product_id,
                     target=f"key:{key_id}", details=details, now=now_ms())


def rotate_key(
    data: Path = typer.Option(..., "--data", help="The installation's data directory."),
    product: str = typer.Option(..., "--product", "-p", help="Product id or slug."),
    as_json: bool = typer.Option(False, "--json"),
    db_url: str | None = DbUrl,
) -> None:
    """Introduce a new signing key (signed by the current one) and sign with it from now on."""
    try:
        store = open_installation_store(data, db_url)
    except (OtaError, OSError) as exc:
        fail(str(exc))
    try:
        try:
            product_id = _product_id(store, product)
            rotation = rotate_product_key(store, data, product_id)
        except (OtaError, OSError) as exc:
            fail(str(exc))
        old, new, sequence = rotation.old, rotation.new, rotation.sequence
        try:
            _audit(store, product_id, "key.rotate", new.key_id,
                   {"old_key_id": old.key_id, "sequence": sequence,
                    "retired": list(rotation.retired)})
        except OtaError as exc:
            fail(f"the key was rotated (statement {sequence}) but the audit log failed: {exc}")
    finally:
        store.close()
    if as_json:
        print_json({"product_id": product_id, "old_key_id": old.key_id,
                    "new_key_id": new.key_id, "sequence": sequence,
                    "public_key": new.public_key.hex(), "retired": list(rotation.retired)})
    else:
        typer.echo(f"product {product_id}: signing key {old.key_id} -> {new.key_id} "
                   f"(statement {sequence}); devices learn it at their next Hello, online "
                   "ones before their next offer")
        for key_id in rotation.retired:
            typer.echo(f"withdrew key {key_id}: a product keeps its {MAX_PRODUCT_KEYS} newest "
                       "keys")


def withdraw_key_command(
    key_id: str = typer.Argument(..., help="Key id (16 hex digits) to stop trusting."),
    data: Path = typer.Option(..., "--data", help="The installation's data directory."),
    product: str = typer.Option(..., "--product", "-p", help="Product id or slug."),
    db_url: str | None = DbUrl,
) -> None:
    """Withdraw an old signing key: devices stop trusting it at their next Hello (online ones
    before their next offer)."""
    try:
        store = open_installation_store(data, db_url)
    except (OtaError, OSError) as exc:
        fail(str(exc))
    try:
        try:
            product_id = _product_id(store, product)
            sequence = withdraw_product_key(store, data, product_id, key_id)
        except (OtaError, OSError, ValueError) as exc:
            fail(str(exc))
        try:
            _audit(store, product_id, "key.withdraw", key_id, {"sequence": sequence})
        except OtaError as exc:
            fail(f"the key was withdrawn (statement {sequence}) but the audit log failed: "
                 f"{exc}")
    finally:
        store.close()
    typer.echo(f"product {product_id}: key {key_id} withdrawn (statement {sequence}); "
               "devices drop it at their next Hello, online ones before their next offer")


def attach(product_app: typer.Typer) -> None:
    """Add the key commands to ``ota product``."""
    product_app.command("rotate-key")(rotate_key)
    product_app.command("withdraw-key")(withdraw_key_command)
