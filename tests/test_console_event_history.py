"""The console shows stored events after a reload: the device page's "Recent events" table
(newest first, Newest/Older paging) and the events page's last stored events under the
live list, with the page's prefix and device filters; tables with ``<th scope>``, no inline
script."""

from __future__ import annotations

import re

from server.console.device_pages import EVENTS_PAGE
from server.events import Event, EventSource
from tests.conftest import Api
from tests.console_helpers import add_user, join_team, page, signed_in

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"


async def _product(api: Api) -> tuple[str, int]:
    product = await api.create_product("Widget")
    for device in (D1, D2):
        assert (await api.client.post(f"/v1/products/{product['slug']}/devices",
                                      json={"id": device})).status_code == 200
    return product["slug"], int(product["id"])


def _device_event(api: Api, product_id: int, device: str, name: str, data: str) -> None:
    """What a device session publishes for a device's ``Particle.publish``."""
    api.handle.bus.publish(Event(name, data, product_id=product_id, device_id=device,
                                 coreid=device, source=EventSource.DEVICE))


def _rows(html: str, testid: str) -> list[str]:
    """The text of each body row of the table with ``data-testid``."""
    table = html.split(f'data-testid="{testid}"', 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    return [" ".join(re.sub(r"<[^>]+>", " ", row).split())
            for row in body.split("<tr>")[1:]]


async def test_the_device_page_shows_its_stored_events_paged(api: Api) -> None:
    slug, product_id = await _product(api)
    # More of D1's own events than one page holds.
    total = EVENTS_PAGE + 5
    for n in range(total):
        _device_event(api, product_id, D1, "temp", str(n))
    _device_event(api, product_id, D2, "temp", "D2's")
    assert api.handle.recorder is not None
    await api.handle.recorder.drain()
    every = (await api.client.get(f"/v1/products/{slug}/devices/{D1}/events/history",
                                  params={"limit": "200"})).json()["events"]
    assert [e["data"] for e in every] == [str(n) for n in reversed(range(total))]
    async with signed_in(api, token=api.token) as client:
        url = f"/console/products/{slug}/devices/{D1}"
        answer = await client.get(url)
        assert answer.status_code == 200, answer.text[:300]
        shown = page(answer)
        rows = _rows(answer.text, "device-events")
        assert len(rows) == EVENTS_PAGE and all(" temp " in row for row in rows)
        assert [row.split()[4] for row in rows] == [e["data"] for e in every[:EVENTS_PAGE]]
        assert '<th scope="col">Published</th>' in answer.text
        assert "<script>" not in answer.text  # CSP script-src 'self': no inline script
        assert not [href for href, text in shown.links if text == "Newest"]  # the newest
        older = [href for href, text in shown.links if text == "Older"
                 and "events_before" in href]
        assert older == [f"{url}?events_before={every[EVENTS_PAGE - 1]['id']}#recent-events"]
        second = await client.get(older[0].split("#")[0])
        assert second.status_code == 200
        rows_2 = _rows(second.text, "device-events")
        assert [row.split()[4] for row in rows_2] == [e["data"] for e in every[EVENTS_PAGE:]]
        newest = [href for href, text in page(second).links if text == "Newest"]
        assert newest == [f"{url}#recent-events"]
        assert (await client.get(url, params={"events_before": "nope"})).status_code == 400
        # D2's page shows D2's event only.
        other = _rows((await client.get(f"/console/products/{slug}/devices/{D2}")).text,
                      "device-events")
        assert len(other) == 1


async def test_the_events_page_shows_stored_events_with_its_filters(api: Api) -> None:
    slug, _ = await _product(api)
    fleet = api.handle.fleet
    await fleet.record_device_hello(D1, platform_id=13, product_version=1, system_version=5000)
    for name, private in (("note/private", True), ("note/public", False)):
        assert (await api.client.post(f"/v1/products/{slug}/events",
                                      json={"name": name, "data": f"{name} data",
                                            "private": private})).status_code == 200
    assert api.handle.recorder is not None
    await api.handle.recorder.drain()
    # A viewer of the product (events:get) sees every stored event, private ones too.
    await add_user(api, "vic@example.com")
    await join_team(api, slug, "vic@example.com", "viewer")
    async with signed_in(api, username="vic@example.com") as client:
        url = f"/console/products/{slug}/events"
        answer = await client.get(url)  # a reload: nothing is live yet
        assert answer.status_code == 200
        rows = _rows(answer.text, "stored-events")
        assert "note/public" in rows[0] and "public" in rows[0]
        assert "note/private" in rows[1] and rows[1].endswith("private")
        assert any("spark/status" in row and D1 in row for row in rows)
        assert page(answer).unlabelled() == []
        filtered = _rows((await client.get(url, params={"prefix": "note/"})).text,
                         "stored-events")
        assert [row.split()[3] for row in filtered] == ["note/public", "note/private"]
        by_device = _rows((await client.get(url, params={"device": D1})).text,
                          "stored-events")
        assert by_device and all(D1 in row for row in by_device)
        none = _rows((await client.get(url, params={"device": D2})).text, "stored-events")
        assert none == ["No stored event matches."]
