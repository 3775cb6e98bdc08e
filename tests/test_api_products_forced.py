"""Product-wide forced updates: PUT /v1/products/:p {firmware_updates_forced}."""

from __future__ import annotations

from typing import Any


async def test_product_forced_updates_flag(api: Any) -> None:
    product = await api.create_product()
    owner = await api.client_for("owner")
    viewer = await api.client_for("viewer")
    url = f"/v1/products/{product['id']}"
    assert (await viewer.put(url, json={"firmware_updates_forced": True})).status_code == 403
    refused = await owner.put(url, json={"firmware_updates_forced": "yes"})
    assert refused.status_code == 400 and "true or false" in refused.json()["error"]
    assert (await owner.put(url, json={"colour": "red"})).status_code == 400
    response = await owner.put(url, json={"firmware_updates_forced": True})
    assert response.status_code == 200, response.text
    assert response.json()["product"]["firmware_updates_forced"] is True
    got = await owner.get(url)
    assert got.json()["product"]["firmware_updates_forced"] is True
