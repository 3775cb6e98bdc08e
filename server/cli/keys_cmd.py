"""``ota product rotate-key`` and ``ota product withdraw-key``: the product's firmware
signing keys. Devices learn of a rotation or withdrawal in the answer to their next Hello,
and devices online now before their next offer (``server.devices.key_sync``)."""

from __future__ import annotations

from pathlib import Path

import typer

from otacore.errors import OtaError
from server.cli._output import fail, print_json
from server.devices.keys import MAX_PRODUCT_KEYS, rotate_product_key, withdraw_product_key
from server.fleet.base import FleetBase
from server.store import Store


def _product_id(data: Path, product: str) -> int:
    store = Store.open_dir(data, pool_size=1)
    try:
        with store.read() as tx:
            return FleetBase._product(tx, product).id  # an id or a slug, as the API takes
    finally:
        store.close()


def rotate_key(
    data: Path = typer.Option(..., "--data", help="The installation's data directory."),
    product: str = typer.Option(..., "--product", "-p", help="Product id or slug."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Introduce a new signing key (signed by the current one) and sign with it from now on."""
    try:
        product_id = _product_id(data, product)
        rotation = rotate_product_key(data, product_id)
    except (OtaError, OSError) as exc:
        fail(str(exc))
    old, new, sequence = rotation.old, rotation.new, rotation.sequence
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
) -> None:
    """Withdraw an old signing key: devices stop trusting it at their next Hello (online ones
    before their next offer)."""
    try:
        product_id = _product_id(data, product)
        sequence = withdraw_product_key(data, product_id, key_id)
    except (OtaError, OSError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"product {product_id}: key {key_id} withdrawn (statement {sequence}); "
               "devices drop it at their next Hello, online ones before their next offer")


def attach(product_app: typer.Typer) -> None:
    """Add the key commands to ``ota product``."""
    product_app.command("rotate-key")(rotate_key)
    product_app.command("withdraw-key")(withdraw_key_command)
