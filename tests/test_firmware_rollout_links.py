"""Firmware objects link to their rollouts (issue 15, visibility): the firmware list and
a version's object name each rollout of that version with its state and URL."""

from __future__ import annotations

from tests.conftest import Api

DEVICES = [f"{i:024x}" for i in range(1, 6)]


async def test_firmware_lists_its_rollouts(api: Api) -> None:
    slug = (await api.create_product("Links"))["slug"]
    for version in (1, 2):
        assert (await api.upload(slug, version)).status_code == 201
    for device in DEVICES:
        added = await api.client.post(f"/v1/products/{slug}/devices", json={"id": device})
        assert added.status_code == 200, added.text
    url = f"/v1/products/{slug}/rollouts"
    first = await api.client.post(url, json={"version": 2, "phases": "#1,all", "force": True})
    assert first.status_code == 201, first.text
    first_id = first.json()["rollout"]["id"]
    aborted = await api.client.post(f"{url}/{first_id}/abort", json={"reason": "test"})
    assert aborted.status_code == 200, aborted.text
    second = await api.client.post(url, json={"version": 2, "phases": "100", "force": True})
    assert second.status_code == 201, second.text
    second_id = second.json()["rollout"]["id"]

    v2 = (await api.client.get(f"/v1/products/{slug}/firmware/2")).json()
    product_id = v2["product_id"]
    assert v2["rollouts"] == [
        {"id": first_id, "state": "aborted",
         "url": f"/v1/products/{product_id}/rollouts/{first_id}"},
        {"id": second_id, "state": "running",
         "url": f"/v1/products/{product_id}/rollouts/{second_id}"},
    ]
    # Each link leads to its rollout.
    for link in v2["rollouts"]:
        shown = await api.client.get(link["url"])
        assert shown.status_code == 200, shown.text
        assert shown.json()["rollout"]["state"] == link["state"]
    listing = (await api.client.get(f"/v1/products/{slug}/firmware")).json()
    by_version = {fw["version"]: fw["rollouts"] for fw in listing}
    assert by_version[1] == [] and by_version[2] == v2["rollouts"]
