"""The console's events and audit pages over the real server: the live events page (its
filter, its stream, its script), and the audit log paged and filtered, readable by owners
and administrators only (``audit:list``), on the console and over REST."""

from __future__ import annotations

import trio

from tests.conftest import Api
from tests.console_helpers import add_user, join_team, page, signed_in

D1 = "0123456789abcdef01234567"


async def test_the_events_page_filters_and_follows_the_stream(api: Api) -> None:
    product = await api.create_product("Widget")
    slug = product["slug"]
    assert (await api.client.post(f"/v1/products/{slug}/devices",
                                  json={"id": D1})).status_code == 200
    async with signed_in(api, token=api.token) as client:
        answer = await client.get(f"/console/products/{slug}/events",
                                  params={"prefix": "spark/", "device": D1.upper()})
        assert answer.status_code == 200
        shown = page(answer)
        assert shown.control_labelled("Event name starts with").attrs["value"] == "spark/"
        assert shown.control_labelled("Device").attrs["value"] == D1
        assert shown.unlabelled() == []
        assert f'data-stream="/console/products/{slug}/stream?device={D1}"' in answer.text
        assert 'data-prefix="spark/"' in answer.text
        assert "/console/static/events_live.js" in answer.text
        script = await client.get("/console/static/events_live.js")
        assert script.status_code == 200 and b"textContent" in script.content
        assert (await client.get(f"/console/products/{slug}/events",
                                 params={"device": "f" * 24})).status_code == 404
        assert (await client.get(f"/console/products/{slug}/events",
                                 params={"device": "nope"})).status_code == 400
        assert (await client.get(f"/console/products/{slug}/events",
                                 params={"prefix": "x" * 201})).status_code == 400
        # The device's stream carries its events (what the page's script shows).
        with trio.fail_after(20):
            async with client.stream("GET", f"/console/products/{slug}/stream",
                                     params={"device": D1}) as stream:
                lines = stream.aiter_lines()
                async for line in lines:
                    if line == ":ok":
                        break
                await api.handle.fleet.record_device_hello(
                    D1, platform_id=13, product_version=1, system_version=5000)
                async for line in lines:
                    if line.startswith("data: "):
                        assert '"name":"spark/status"' in line and D1 in line
                        break


async def _audit_entries(api: Api, slug: str, count: int) -> None:
    for n in range(count):
        answer = await api.client.post(f"/v1/products/{slug}/groups",
                                       json={"name": f"group-{n:02d}"})
        assert answer.status_code == 201


async def test_the_audit_page_pages_and_filters(api: Api) -> None:
    product = await api.create_product("Widget")
    slug = product["slug"]
    await _audit_entries(api, slug, 55)
    assert (await api.upload(slug, 2)).status_code == 201
    async with signed_in(api, token=api.token) as client:
        first = page(await client.get(f"/console/products/{slug}/audit"))
        assert first.control_labelled("Action starts with").name == "action"
        assert first.control_labelled("Actor").name == "actor"
        assert first.unlabelled() == []
        assert "firmware.upload" in first.all_text
        older = [href for href, text in first.links if text == "Older"]
        assert len(older) == 1 and "before=" in older[0]
        second = page(await client.get(f"/console/products/{slug}/audit{older[0]}"))
        assert [text for _, text in second.links if text in ("Older", "Newest")] == ["Newest"]
        assert "group-00" in second.all_text and "firmware.upload" not in second.all_text
        only = page(await client.get(f"/console/products/{slug}/audit",
                                     params={"action": "firmware.", "actor": "test owner"}))
        assert "firmware.upload" in only.all_text and "group.create" not in only.all_text
        assert only.control_labelled("Action starts with").attrs["value"] == "firmware."
        none = page(await client.get(f"/console/products/{slug}/audit",
                                     params={"actor": "someone else"}))
        assert "No audit entries match the filter." in none.all_text
        bad = await client.get(f"/console/products/{slug}/audit", params={"before": "x"})
        assert bad.status_code == 400 and page(bad).alerts


async def test_only_owners_and_administrators_read_the_audit_log(api: Api) -> None:
    product = await api.create_product("Widget")
    slug = product["slug"]
    for name, role in (("ada@example.com", "administrator"), ("dev@example.com", "developer"),
                       ("vera@example.com", "viewer")):
        await add_user(api, name)
        await join_team(api, slug, name, role)
    for name, status in (("ada@example.com", 200), ("dev@example.com", 403),
                         ("vera@example.com", 403)):
        async with signed_in(api, username=name) as client:
            answer = await client.get(f"/console/products/{slug}/audit")
            assert answer.status_code == status, (name, answer.text[:200])
            if status == 403:
                assert "audit:list" in page(answer).alerts[0]
    developer = await api.client_for("developer")
    async with developer:
        answer = await developer.get(f"/v1/products/{slug}/audit")
        assert answer.status_code == 403 and "audit:list" in answer.json()["error"]
    answer = await api.client.get(f"/v1/products/{slug}/audit", params={"limit": "2"})
    assert answer.status_code == 200
    body = answer.json()
    assert len(body["entries"]) == 2 and body["next_before"] == body["entries"][-1]["id"]
    assert (await api.client.get(f"/v1/products/{slug}/audit",
                                 params={"limit": "999"})).status_code == 400
