"""Who may do what, on which product: the route table walked route by route (issue 13,
finding 11).

* Statically: every route carries an access rule, every route with a ``{product}`` (or a
  ``{device_id}`` without one) is checked against that product, and the few product-less
  routes are listed here by name, so a new route without a product check fails the suite.
* Live: a product team administrator of product A gets 404 for every route of product B
  (as for a product that does not exist; 403 for installation-wide routes), and B is left
  unchanged. An API user of A holding one scope passes exactly the routes that need that
  scope, for every scope.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import trio

from server.api import ROUTES
from server.api.openapi import EVENT_STREAMS, route_operations
from tests.conftest import Api

DEVICE_A = "aaaaaaaaaaaaaaaaaaaaaaaa"
DEVICE_B = "bbbbbbbbbbbbbbbbbbbbbbbb"
UNKNOWN_DEVICE = "ffffffffffffffffffffffff"
PASSWORD = "correct horse battery"

#: Routes that act on no product, by name, with the kind of check they get.
PRODUCTLESS = {
    "openapi": "public",
    "token": "public",
    "current_token": "token",
    "revoke_current_token": "token",
    "list_device_os": "listing",
    "upload_device_os": "installation",
    "list_products": "listing",
    "create_product": "installation",
    # The running server's sign-in limits are the whole installation's.
    "list_sign_in_limits": "installation",
    "clear_sign_in_limit": "installation",
}


def test_every_route_checks_who_and_on_which_product() -> None:
    from server.api.access import rule_of
    from server.fleet.roles import PRODUCT_SCOPES

    for route in ROUTES:
        rule = rule_of(route)
        assert rule is not None, f"route {route.name} was built without an access rule"
        params = set(re.findall(r"{(\w+)", route.path))
        if "product" in params:
            assert rule.kind == "product", route.name
        elif "device_id" in params:
            assert rule.kind == "device", route.name
        else:
            assert PRODUCTLESS.get(route.name) == rule.kind, (
                f"route {route.name} acts on no product: decide who may call it and list it "
                "in PRODUCTLESS"
            )
        if rule.kind in ("product", "device", "listing"):
            assert rule.scope in PRODUCT_SCOPES


def _fill(path: str, product: str, device: str, version: str = "1", group: str = "beta",
          username: str = "nobody@example.com") -> str:
    return (path.replace("{product}", product).replace("{device_id}", device)
            .replace("{version}", version).replace("{name}", group)
            .replace("{username}", username).replace("{prefix:path}", "x"))


async def _call(client: httpx.AsyncClient, method: str, url: str, name: str,
                body: dict[str, Any] | None = None) -> tuple[int, str]:
    """(status, error message or "") of one request; event streams are closed at once."""
    method = method.upper()
    if name in EVENT_STREAMS:
        async with client.stream(method, url) as response:
            if response.status_code == 200:
                return 200, ""
            await response.aread()
    else:
        response = await client.request(method, url, json=body if method in ("PUT", "POST")
                                        else None)
    try:
        body = response.json()
    except ValueError:
        return response.status_code, ""
    return response.status_code, str(body.get("error", "")) if isinstance(body, dict) else ""


def _denied(status: int, error: str) -> bool:
    """Refused by the access check: 401/403, or the 404 of a product or device the caller
    does not belong to (worded as for one that does not exist)."""
    return status in (401, 403) or (status == 404 and (
        "(give its id or slug)" in error or "is not in any product" in error))


@pytest.fixture
async def two_products(api: Api, make_firmware) -> dict[str, dict[str, Any]]:
    """Products A and B, each with firmware v1, a device and a group "beta"."""
    found = {}
    for key, device in (("A", DEVICE_A), ("B", DEVICE_B)):
        product = await api.create_product(f"Product {key}")
        slug = product["slug"]
        assert (await api.upload(slug, 1)).status_code == 201
        assert (await api.client.post(f"/v1/products/{slug}/devices", json={"id": device})
                ).status_code == 200
        assert (await api.client.post(f"/v1/products/{slug}/groups", json={"name": "beta"})
                ).status_code == 201
        found[key] = product
    return found


async def _signed_in(api: Api, username: str) -> httpx.AsyncClient:
    response = await api.client.post("/oauth/token", data={
        "grant_type": "password", "username": username, "password": PASSWORD})
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    return httpx.AsyncClient(base_url=api.handle.api_url, timeout=20,
                             headers={"Authorization": f"Bearer {token}"})


async def test_a_team_administrator_of_a_reaches_nothing_of_b(
    api: Api, two_products: dict[str, dict[str, Any]]
) -> None:
    a, b = two_products["A"], two_products["B"]
    await trio.to_thread.run_sync(
        lambda: api.handle.fleet.create_user_sync("alice@example.com", PASSWORD, "none"))
    invited = await api.client.post(f"/v1/products/{a['slug']}/team",
                                    json={"username": "alice@example.com",
                                          "role": "administrator"})
    assert invited.status_code == 200, invited.text
    before = await api.snapshot()
    async with await _signed_in(api, "alice@example.com") as alice:
        for method, _, route in route_operations(ROUTES):
            kind = PRODUCTLESS.get(route.name)
            if kind is not None:
                continue
            for ref in (b["slug"], str(b["id"])):
                url = _fill(route.path, ref, DEVICE_B)
                status, error = await _call(alice, method, url, route.name, {})
                assert status == 404 and _denied(status, error), (method, url, status, error)
        for method, path in (("POST", "/v1/products"), ("POST", "/v1/device-os")):
            status, _ = await _call(alice, method, path, "", {"name": "x", "platform_id": 13})
            assert status == 403, (method, path)
        listed = (await alice.get("/v1/products")).json()["products"]
        assert [p["slug"] for p in listed] == [a["slug"]]
        assert (await alice.get(f"/v1/products/{a['slug']}/devices")).status_code == 200
    assert await api.snapshot() == before


async def test_an_api_user_can_do_exactly_what_its_scope_allows(
    api: Api, two_products: dict[str, dict[str, Any]]
) -> None:
    from server.fleet.roles import PRODUCT_SCOPES

    a = two_products["A"]
    clients: dict[str, httpx.AsyncClient] = {}
    for scope in sorted(PRODUCT_SCOPES):
        created = await api.client.post(f"/v1/products/{a['slug']}/team",
                                        json={"friendly_name": f"only {scope}",
                                              "scopes": [scope]})
        assert created.status_code == 201, created.text
        token = created.json()["created"]["tokens"][0]["token"]
        clients[scope] = httpx.AsyncClient(base_url=api.handle.api_url, timeout=20,
                                           headers={"Authorization": f"Bearer {token}"})
    from server.api.access import rule_of

    # Revoking the caller's own token goes last: it ends the token.
    operations = sorted(route_operations(ROUTES),
                        key=lambda op: op[2].name == "revoke_current_token")
    try:
        for method, _, route in operations:
            rule = rule_of(route)
            assert rule is not None
            # Targets that exist only where a read needs them: nothing gets changed.
            read = method == "get"
            url = _fill(route.path, a["slug"], DEVICE_A if read else UNKNOWN_DEVICE,
                        version="1" if read else "999", group="beta" if read else "nope")
            for scope, client in clients.items():
                status, error = await _call(client, method, url, route.name, {})
                if rule.kind == "public" or rule.kind == "token":
                    expected = True
                elif rule.kind == "installation":
                    expected = False
                else:
                    expected = scope == rule.scope
                assert _denied(status, error) != expected, (
                    method, url, scope, status, error)
    finally:
        for client in clients.values():
            await client.aclose()
    # The one that may list products sees its own product only.
    listed = (await clients_get(api, a["slug"], "products:list")).json()["products"]
    assert [p["slug"] for p in listed] == [a["slug"]]


async def clients_get(api: Api, slug: str, scope: str) -> httpx.Response:
    """GET /v1/products as a fresh API user of ``slug`` holding only ``scope``."""
    created = await api.client.post(f"/v1/products/{slug}/team",
                                    json={"friendly_name": "lister", "scopes": [scope]})
    token = created.json()["created"]["tokens"][0]["token"]
    async with httpx.AsyncClient(base_url=api.handle.api_url,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        return await client.get("/v1/products")
