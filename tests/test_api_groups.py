"""Device groups over real HTTP."""

from __future__ import annotations

import pytest

D1 = "0123456789abcdef01234567"


async def test_group_lifecycle(api) -> None:
    product = await api.create_product()
    slug = product["slug"]
    url = f"/v1/products/{slug}/groups"
    created = await api.client.post(
        url, json={"name": "beta", "description": "testers", "color": "#00ff00"}
    )
    assert created.status_code == 201, created.text
    assert created.json()["group"] == {
        "name": "beta",
        "description": "testers",
        "color": "#00ff00",
        "fw_version": None,
        "intelligent": False,
        "device_count": 0,
        "created_at": created.json()["group"]["created_at"],
    }
    await api.client.post(url, data={"name": "eu"})  # form encoding
    names = [g["name"] for g in (await api.client.get(url)).json()["groups"]]
    assert names == ["beta", "eu"]

    await api.client.post(f"/v1/products/{slug}/devices", json={"id": D1})
    await api.client.put(f"/v1/products/{slug}/devices/{D1}", json={"groups": ["beta"]})
    await api.upload(slug, 1)
    await api.client.put(
        f"/v1/products/{slug}/firmware/release",
        json={"version": 1, "groups": ["beta"], "intelligent": True, "force": True},
    )
    beta = (await api.client.get(f"{url}/beta")).json()["group"]
    assert beta["device_count"] == 1 and beta["fw_version"] == 1 and beta["intelligent"] is True

    renamed = await api.client.put(f"{url}/beta", json={"name": "pilot", "color": "#123456"})
    assert renamed.status_code == 200 and renamed.json()["group"]["name"] == "pilot"
    device = (await api.client.get(f"/v1/products/{slug}/devices/{D1}")).json()
    assert device["groups"] == ["pilot"] and device["targeted_firmware_release_version"] == 1
    assert (await api.client.get(f"{url}/beta")).status_code == 404

    assert (await api.client.delete(f"{url}/pilot")).status_code == 204
    device = (await api.client.get(f"/v1/products/{slug}/devices/{D1}")).json()
    assert device["groups"] == [] and device["targeted_firmware_release_version"] is None
    firmware = (await api.client.get(f"/v1/products/{slug}/firmware/1")).json()
    assert firmware["groups"] == []
    with api.store.read() as tx:
        actions = [a.action for a in tx.list_audit(product["id"])]
    assert {"group.create", "group.update", "group.delete"} <= set(actions)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("post", "", {"name": "beta"}, 409, "already has a group"),
        ("post", "", {"name": "bad name!"}, 400, "group name"),
        ("post", "", {}, 400, "group name"),
        ("post", "", {"name": "x", "color": "green"}, 400, "#rrggbb"),
        ("post", "", {"name": "x", "size": 1}, 400, "unknown group field"),
        ("put", "/beta", {"name": "eu"}, 409, "already has a group"),
        ("put", "/beta", {}, 400, "nothing to change"),
        ("put", "/nope", {"name": "x"}, 404, "no group"),
        ("delete", "/nope", None, 404, "no group"),
    ],
)
async def test_bad_group_requests_change_nothing(
    api, method: str, path: str, body: dict[str, object] | None, status: int, message: str
) -> None:
    slug = (await api.create_product())["slug"]
    url = f"/v1/products/{slug}/groups"
    await api.client.post(url, json={"name": "beta"})
    await api.client.post(url, json={"name": "eu"})
    before = await api.snapshot()
    if body is None:
        response = await api.client.request(method.upper(), url + path)
    else:
        response = await api.client.request(method.upper(), url + path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert await api.snapshot() == before


async def test_group_roles(api) -> None:
    slug = (await api.create_product())["slug"]
    async with await api.client_for("viewer") as viewer:
        assert (await viewer.get(f"/v1/products/{slug}/groups")).status_code == 200
        response = await viewer.post(f"/v1/products/{slug}/groups", json={"name": "beta"})
        assert response.status_code == 403
