"""Text that is not Unicode, and event names that only look like the cloud's, are refused at
the edge with a 400 (issue 13, review of finding 8: G and I).

G: a JSON ``"\\ud800"`` escape decodes to a lone UTF-16 surrogate, which no UTF-8 encoder
takes: SQLite's binding raised UnicodeEncodeError (a 500) for product names, device notes,
team user names, API users' friendly names, and ``publish_event`` for event data. Urlencoded
bodies and URLs whose percent-encoded bytes are not UTF-8 were silently turned into U+FFFD.
I: REST publish took ``ѕpark/status`` (a Cyrillic s), fullwidth letters or a leading space:
look-alikes of reserved names that devices may not even send.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import Api

DEVICE = "0123456789abcdef01234567"


@pytest.fixture
async def product(api: Api) -> dict[str, Any]:
    created = await api.create_product("Sensors")
    slug = created["slug"]
    assert (await api.client.post(f"/v1/products/{slug}/devices", json={"id": DEVICE})
            ).status_code == 200
    return created


async def _raw_json(client: httpx.AsyncClient, method: str, url: str,
                    body: bytes) -> httpx.Response:
    return await client.request(method, url, content=body,
                                headers={"content-type": "application/json"})


def _refused(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["ok"] is False
    return str(body.get("error_description") or body["error"])


async def test_lone_surrogates_in_json_bodies_get_400_and_change_nothing(
    api: Api, product: dict[str, Any]
) -> None:
    """The review's f8_inputs.py: each of these was a 500."""
    p = f"/v1/products/{product['slug']}"
    cases = [
        ("PUT", p, rb'{"name": "\ud800"}', "field 'name'"),
        ("PUT", p, rb'{"description": "ok \udfff"}', "field 'description'"),
        ("POST", "/v1/products", rb'{"name": "\ud800", "platform_id": 13}', "field 'name'"),
        ("PUT", f"{p}/devices/{DEVICE}", rb'{"notes": "\ud800"}', "field 'notes'"),
        ("PUT", f"{p}/devices/{DEVICE}", rb'{"groups": ["beta", "\udc00"]}',
         "field 'groups'[1]"),
        ("POST", f"{p}/team", rb'{"username": "\ud800"}', "field 'username'"),
        ("POST", f"{p}/team", rb'{"friendly_name": "\ud800", "scopes": ["devices:list"]}',
         "field 'friendly_name'"),
        ("POST", f"{p}/events", rb'{"name": "x", "data": "\ud800"}', "field 'data'"),
        ("POST", f"{p}/events", rb'{"name": "x", "data": {"\ud800": 1}}',
         "a field name in field 'data'"),
        ("POST", "/oauth/token",
         rb'{"grant_type": "password", "username": "\ud800", "password": "x"}',
         "field 'username'"),
    ]
    before = await api.snapshot()
    for method, url, body, where in cases:
        message = _refused(await _raw_json(api.client, method, url, body))
        assert where in message and "not valid Unicode text" in message, (url, body, message)
    assert await api.snapshot() == before
    # A proper pair (an emoji) is fine.
    named = await _raw_json(api.client, "PUT", p, rb'{"description": "\ud83d\ude00"}')
    assert named.status_code == 200 and named.json()["product"]["description"] == "\U0001f600"


async def test_urlencoded_text_and_urls_must_be_utf8(api: Api, product: dict[str, Any]) -> None:
    p = f"/v1/products/{product['slug']}"
    before = await api.snapshot()
    for form in (b"name=%ED%A0%80", b"name=%ff"):  # a surrogate's UTF-8-like bytes; latin-1
        response = await api.client.put(p, content=form, headers={
            "content-type": "application/x-www-form-urlencoded"})
        assert "not valid urlencoded UTF-8" in _refused(response)
    path = await api.client.get(f"{p}/groups/%ED%A0%80")
    assert "URL path is not UTF-8" in _refused(path)
    query = await api.client.get(f"{p}/devices?deviceName=%ff")
    assert "query string is not UTF-8" in _refused(query)
    assert await api.snapshot() == before
    fine = await api.client.get(f"{p}/devices", params={"deviceName": "caf\u00e9"})
    assert fine.status_code == 200


@pytest.mark.parametrize("name", [
    "\u0455park/status",  # Cyrillic small dze, the look-alike of "s"
    "\uff53park/status",  # fullwidth s
    "\uff50article/product/firmware/released",  # fullwidth p
    " spark/status",
    "spark/status ",
    "ota /device",
    "caf\u00e9",
    "x" * 65,
])
async def test_rest_publish_follows_the_devices_event_name_rule(
    api: Api, product: dict[str, Any], name: str
) -> None:
    response = await api.client.post(f"/v1/products/{product['slug']}/events",
                                     content=json.dumps({"name": name, "data": "d"}),
                                     headers={"content-type": "application/json"})
    message = _refused(response)
    assert "1-64 printable ASCII characters without spaces" in message


async def test_rest_publish_takes_plain_names_and_refuses_reserved_ones(
    api: Api, product: dict[str, Any]
) -> None:
    url = f"/v1/products/{product['slug']}/events"
    assert (await api.client.post(url, json={"name": "temp/room-1", "data": "21"})
            ).status_code == 200
    assert (await api.client.post(url, json={"name": "x" * 64})).status_code == 200
    assert "reserved" in _refused(await api.client.post(url, json={"name": "Spark/status"}))
