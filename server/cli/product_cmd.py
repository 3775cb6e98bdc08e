"""``ota product create``: create a product straight in the store in ``--data``, or through a
running server with ``--api-url`` and ``--token``.

Attach to the main CLI with ``app.add_typer(product_cmd.product_app, name="product")``; the
other ``ota product`` commands attach to ``product_app`` (keys_cmd, team_cmd, rollout_cmd's
windows: server/cli/main.py). ``--db-url`` also reads ``OTA_DB_URL``.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import typer

from otacore.errors import OtaError
from server.cli._direct_store import DATA_HELP, fail, open_fleet
from server.cli._store import DbUrl
from server.client import ApiError, tls_verify, unreachable_message
from server.fleet import SYSTEM_ACTOR

product_app = typer.Typer(help="Manage products.", no_args_is_help=True)


@product_app.command("create")
def product_create(
    name: str = typer.Argument(..., help="Product name (the slug is derived from it)."),
    platform_id: int = typer.Option(..., "--platform-id", help="Device OS platform id."),
    description: str = typer.Option("", "--description"),
    data: Path | None = typer.Option(None, "--data", help=DATA_HELP),
    db_url: str | None = DbUrl,
    api_url: str | None = typer.Option(None, "--api-url", help="URL of a running server."),
    token: str | None = typer.Option(
        None, "--token", envvar="OTA_TOKEN", help="API token (with --api-url)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Create a product and print its id and slug."""
    if (data is None) == (api_url is None):
        raise fail("give either --data DIR (direct) or --api-url URL with --token")
    if api_url is not None:
        if not token:
            raise fail("--api-url needs --token (or OTA_TOKEN)")
        product = _create_via_api(api_url, token, name, platform_id, description)
    else:
        assert data is not None
        try:
            fleet = open_fleet(data, db_url)
            record = fleet.create_product_sync(
                SYSTEM_ACTOR, name, platform_id, description=description
            )
        except OtaError as exc:
            raise fail(str(exc)) from exc
        product = {
            "id": record.id,
            "slug": record.slug,
            "name": record.name,
            "platform_id": record.platform_id,
        }
    if as_json:
        typer.echo(json.dumps(product))
    else:
        typer.echo(f"created product {product['id']} (slug {product['slug']})")


def _create_via_api(
    api_url: str, token: str, name: str, platform_id: int, description: str
) -> dict[str, object]:
    try:
        response = httpx.post(
            f"{api_url.rstrip('/')}/v1/products",
            json={"name": name, "platform_id": platform_id, "description": description},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            verify=tls_verify(),  # an https URL: the CA of ota --ca-file / OTA_CA_FILE
        )
    except ApiError as exc:
        raise fail(exc.message) from exc
    except httpx.HTTPError as exc:
        raise fail(unreachable_message(api_url, exc)) from exc
    body = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    if response.status_code != 201:
        raise fail(str(body.get("error") or f"HTTP {response.status_code}"))
    product = body["product"]
    return {k: product[k] for k in ("id", "slug", "name", "platform_id")}
