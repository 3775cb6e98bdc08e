"""``GET /v1/products/:p/events/history`` and ``.../devices/:id/events/history`` over the
real server: what was published is there after the fact (private events too, for the
product's readers), paged by id and filtered by prefix; a member of another product gets
404, an API user without ``events:get`` 403; the live stream of events named "history..."
still answers SSE clients; bad query values get 4xx, never a 5xx."""

from __future__ import annotations

import random
import string
import time
from typing import Any

import httpx
import trio

from server.event_history import HistorySettings, prune_event_history
from server.leases import EVENT_HISTORY_PRUNING
from tests.conftest import Api
from tests.console_helpers import PASSWORD, add_user, join_team

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"


async def _product_with_events(api: Api) -> str:
    """A product with devices D1 and D2, their online events, and two API events (one
    private, one public); all stored."""
    product = await api.create_product("Widget")
    slug = product["slug"]
    for device in (D1, D2):
        assert (await api.client.post(f"/v1/products/{slug}/devices",
                                      json={"id": device})).status_code == 200
        await api.handle.fleet.record_device_hello(device, platform_id=13, product_version=1,
                                                   system_version=5000)
    for name, private in (("note/private", True), ("note/public", False)):
        answer = await api.client.post(f"/v1/products/{slug}/events",
                                       json={"name": name, "data": name, "private": private})
        assert answer.status_code == 200, answer.text
    assert api.handle.recorder is not None
    await api.handle.recorder.drain()
    return slug


async def _api_client(api: Api, username: str) -> httpx.AsyncClient:
    """A REST client with a token of ``username`` (password grant)."""
    answer = await api.client.post("/oauth/token", data={
        "grant_type": "password", "username": username, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    return httpx.AsyncClient(base_url=api.handle.api_url, timeout=20, headers={
        "Authorization": f"Bearer {answer.json()['access_token']}"})


async def test_stored_events_are_read_back_paged_and_filtered(api: Api) -> None:
    slug = await _product_with_events(api)
    answer = await api.client.get(f"/v1/products/{slug}/events/history")
    assert answer.status_code == 200, answer.text
    events = answer.json()["events"]
    names = [(e["name"], e["device_id"]) for e in events]
    assert names[:2] == [("note/public", None), ("note/private", None)]  # newest first
    assert ("spark/status", D1) in names and ("spark/status", D2) in names
    private = next(e for e in events if e["name"] == "note/private")
    assert private["public"] is False and private["coreid"] == "api"
    assert private["published_at"].endswith("Z") and private["data_truncated"] is False
    # Paging by id: one at a time reaches every event, newest first, then stops.
    seen: list[int] = []
    before: int | None = None
    while True:
        params: dict[str, Any] = {"limit": "1"}
        if before is not None:
            params["before"] = str(before)
        page = (await api.client.get(f"/v1/products/{slug}/events/history",
                                     params=params)).json()
        seen += [e["id"] for e in page["events"]]
        before = page["next_before"]
        if before is None:
            break
    assert seen == [e["id"] for e in events] and seen == sorted(seen, reverse=True)
    # The device's own, and a prefix.
    device = (await api.client.get(f"/v1/products/{slug}/devices/{D1}/events/history")).json()
    assert {e["device_id"] for e in device["events"]} == {D1}
    assert "spark/status" in {e["name"] for e in device["events"]}
    notes = (await api.client.get(f"/v1/products/{slug}/events/history",
                                  params={"prefix": "note/"})).json()
    assert [e["name"] for e in notes["events"]] == ["note/public", "note/private"]
    # The device route's device ids are normalised as everywhere (upper case accepted).
    upper = await api.client.get(f"/v1/products/{slug}/devices/{D1.upper()}/events/history")
    assert upper.status_code == 200 and upper.json()["events"] == device["events"]


async def test_readers_need_the_product_and_events_get(api: Api) -> None:
    slug = await _product_with_events(api)
    other = (await api.create_product("Other"))["slug"]
    # A viewer of another product: this product looks absent.
    await add_user(api, "vera@example.com")
    await join_team(api, other, "vera@example.com", "viewer")
    # A viewer of this product reads everything, private events included.
    await add_user(api, "vic@example.com")
    await join_team(api, slug, "vic@example.com", "viewer")
    async with await _api_client(api, "vera@example.com") as vera:
        for path in (f"/v1/products/{slug}/events/history",
                     f"/v1/products/{slug}/devices/{D1}/events/history"):
            assert (await vera.get(path)).status_code == 404, path
        assert (await vera.get(f"/v1/products/{other}/events/history")).json()["events"] == []
    async with await _api_client(api, "vic@example.com") as vic:
        answer = await vic.get(f"/v1/products/{slug}/events/history",
                               params={"prefix": "note/private"})
        assert [e["data"] for e in answer.json()["events"]] == ["note/private"]
    # An API user of the product without events:get: 403 naming the scope.
    created = await api.client.post(f"/v1/products/{slug}/team",
                                    json={"friendly_name": "lister",
                                          "scopes": ["devices:list"]})
    assert created.status_code == 201, created.text
    token = created.json()["created"]["tokens"][0]["token"]
    async with httpx.AsyncClient(base_url=api.handle.api_url, timeout=20,
                                 headers={"Authorization": f"Bearer {token}"}) as lister:
        for path in (f"/v1/products/{slug}/events/history",
                     f"/v1/products/{slug}/devices/{D1}/events/history"):
            answer = await lister.get(path)
            assert answer.status_code == 403 and "events:get" in answer.json()["error"], path
    # A device of another product, or none: 404.
    assert (await api.client.get(f"/v1/products/{other}/devices/{D1}/events/history")
            ).status_code == 404
    assert (await api.client.get(f"/v1/products/{slug}/devices/{'f' * 24}/events/history")
            ).status_code == 404


async def test_an_sse_client_still_streams_events_named_history(api: Api) -> None:
    slug = (await api.create_product("Widget"))["slug"]
    with trio.fail_after(20):
        async with api.client.stream("GET", f"/v1/products/{slug}/events/history",
                                     headers={"Accept": "text/event-stream"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            async for line in lines:
                if line == ":ok":
                    break
            for name in ("other", "history/made"):
                assert (await api.client.post(f"/v1/products/{slug}/events",
                                              json={"name": name, "data": "x"})
                        ).status_code == 200
            async for line in lines:
                if line.startswith("event: "):
                    assert line == "event: history/made"  # "other" was filtered out
                    break


async def test_bad_query_values_get_a_4xx(api: Api) -> None:
    slug = await _product_with_events(api)
    paths = (f"/v1/products/{slug}/events/history",
             f"/v1/products/{slug}/devices/{D1}/events/history")
    fixed = [{"limit": "0"}, {"limit": "201"}, {"limit": "-1"}, {"limit": "1e3"},
             {"limit": "9" * 40}, {"before": "0"}, {"before": "abc"}, {"before": "9" * 30},
             {"before": "-5"}, {"prefix": "x" * 201}, {"prefix": "a\nb"}, {"prefix": "\x00"}]
    seed = random.randrange(2**32)
    print(f"fuzz seed {seed}")
    rng = random.Random(seed)
    alphabet = string.printable + "\x00\x7f\u00e9\u202e\ud7ff\U0001f600"
    fuzzed = [{rng.choice(["limit", "before", "prefix"]):
               "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))}
              for _ in range(40)]
    for params in fixed + fuzzed:
        for path in paths:
            answer = await api.client.get(path, params=params)
            assert answer.status_code < 500, (path, params, answer.text)
            if params in fixed:
                assert answer.status_code == 400, (path, params, answer.text)
                assert answer.json()["error"], params


async def test_the_pruning_runs_under_its_lease_once_per_installation(api: Api) -> None:
    lease = api.handle.job_leases[EVENT_HISTORY_PRUNING]
    assert lease.held  # the only node holds it
    slug = await _product_with_events(api)
    # The job itself (as the lease runs it), with a clock a week and a day ahead: every
    # stored event has expired; it deletes them in its first pass.
    settings = HistorySettings(history_prune_interval=3600.0)
    week_later = 8 * 86_400_000

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prune_event_history, api.store, settings,
                           lambda: time.time_ns() // 1_000_000 + week_later)
        with trio.fail_after(20):
            while (await api.client.get(f"/v1/products/{slug}/events/history")
                   ).json()["events"]:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
