"""Server-Sent Events over real HTTP, publishing, and the bounded event bus."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from server.events import (
    FIRMWARE_CREATED,
    FIRMWARE_RELEASED,
    Event,
    EventBus,
    TooManySubscribersError,
)

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@dataclass
class Stream:
    """Events and comments read from one SSE response."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    opened: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    async def wait_for(self, predicate: Any, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while not predicate(self):
                self.changed = trio.Event()
                await self.changed.wait()


async def _read(client: httpx.AsyncClient, url: str, stream: Stream) -> None:
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        async for line in response.aiter_lines():
            if line.startswith(":"):
                stream.comments.append(line)
                if line == ":ok":
                    stream.opened.set()
            elif line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name is not None:
                stream.events.append((name, json.loads(line[len("data: ") :])))
                name = None
            stream.changed.set()


async def _open(nursery: trio.Nursery, client: httpx.AsyncClient, url: str) -> Stream:
    stream = Stream()
    nursery.start_soon(_read, client, url, stream)
    with trio.fail_after(10):
        await stream.opened.wait()
    return stream


async def test_firmware_and_device_lifecycle_events(api) -> None:
    product = await api.create_product()
    slug, fleet = product["slug"], api.handle.fleet
    await api.client.post(f"/v1/products/{slug}/devices", json={"id": D1})
    async with trio.open_nursery() as nursery:
        stream = await _open(nursery, api.client, f"/v1/products/{slug}/events")
        await api.upload(slug, 1)
        await api.report_running(D1, 1)  # online
        await api.client.put(
            f"/v1/products/{slug}/firmware/release",
            json={"version": 1, "product_default": True, "intelligent": True},
        )
        await api.client.put(
            f"/v1/products/{slug}/devices/{D1}", json={"firmware_updates_forced": True}
        )
        await api.client.put(
            f"/v1/products/{slug}/devices/{D1}", json={"firmware_updates_forced": False}
        )
        await api.upload(slug, 2)
        await fleet.set_updates_enabled(D1, False)
        await api.client.put(
            f"/v1/products/{slug}/firmware/release",
            json={"version": 2, "product_default": True, "force": True},
        )
        for status in ("started", "failed", "started", "success"):
            await fleet.record_flash_status(D1, status)  # type: ignore[arg-type]
        await fleet.device_offline(D1)
        await stream.wait_for(lambda s: len(s.events) >= 14)
        nursery.cancel_scope.cancel()
    names = stream.names()
    assert names == [
        FIRMWARE_CREATED,
        "spark/status",
        "spark/device/describe",  # the Describe naming v1's image (it is seen running)
        FIRMWARE_RELEASED,
        "particle/device/updates/forced",
        "particle/device/updates/forced",
        FIRMWARE_CREATED,
        FIRMWARE_RELEASED,
        "particle/device/updates/pending",
        "spark/flash/status",
        "spark/flash/status",
        "spark/flash/status",
        "spark/flash/status",
        "spark/status",
    ]
    by_index = [payload for _, payload in stream.events]
    assert json.loads(by_index[0]["data"])["version"] == 1
    assert by_index[0]["coreid"] == "particle-internal" and ISO_RE.match(
        by_index[0]["published_at"]
    )
    assert json.loads(by_index[3]["data"]) == {
        "version": 1,
        "immediate": True,
        "product_default": True,
        "groups": [],
    }
    assert json.loads(by_index[7]["data"])["immediate"] is False
    assert by_index[1]["data"] == "online" and by_index[1]["coreid"] == D1
    assert [by_index[4]["data"], by_index[5]["data"]] == ["true", "false"]
    assert by_index[8]["data"] == "true"
    assert [p["data"] for p in by_index[9:13]] == ["started ", "failed ", "started ", "success "]
    assert by_index[13]["data"] == "offline"
    assert all(p["ttl"] == 60 for p in by_index)


async def test_prefix_device_streams_and_publishing(api) -> None:
    product = await api.create_product()
    slug = product["slug"]
    for device_id in (D1, D2):
        await api.client.post(f"/v1/products/{slug}/devices", json={"id": device_id})
    async with trio.open_nursery() as nursery:
        status = await _open(nursery, api.client, f"/v1/products/{slug}/events/spark/status")
        device = await _open(nursery, api.client, f"/v1/devices/{D2}/events")
        mine = await _open(nursery, api.client, f"/v1/products/{slug}/devices/{D1}/events")
        everything = await _open(nursery, api.client, f"/v1/products/{slug}/events")
        published = await api.client.post(
            f"/v1/products/{slug}/events",
            json={"name": "ops/notice", "data": "maintenance at 10", "ttl": 30, "private": True},
        )
        assert published.status_code == 200 and published.json() == {"ok": True}
        await api.report_running(D1, 1)
        await api.report_running(D2, 1)
        await everything.wait_for(lambda s: len(s.events) == 3)
        await status.wait_for(lambda s: len(s.events) == 2)
        await device.wait_for(lambda s: len(s.events) == 1)
        await mine.wait_for(lambda s: len(s.events) == 1)
        nursery.cancel_scope.cancel()
    assert everything.events[0] == (
        "ops/notice",
        {
            "data": "maintenance at 10",
            "ttl": 30,
            "published_at": everything.events[0][1]["published_at"],
            "coreid": "api",
        },
    )
    assert status.names() == ["spark/status", "spark/status"]
    assert device.events[0][1]["coreid"] == D2 and mine.events[0][1]["coreid"] == D1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "event name"),
        ({"name": "x" * 65}, "event name"),
        ({"name": "ok", "data": {"a": 1}}, "must be a string"),
        ({"name": "ok", "data": "x" * 1025}, "longer than 1024"),
        ({"name": "ok", "ttl": -1}, "ttl"),
        ({"name": "ok", "private": "perhaps"}, "true or false"),
        ({"name": "ok", "colour": 1}, "unknown field"),
    ],
)
async def test_bad_publish_requests(api, body: dict[str, object], message: str) -> None:
    slug = (await api.create_product())["slug"]
    response = await api.client.post(f"/v1/products/{slug}/events", json=body)
    assert response.status_code == 400 and message in response.json()["error"]


async def test_stream_auth_keepalive_and_unknowns(api) -> None:
    slug = (await api.create_product())["slug"]
    async with httpx.AsyncClient(base_url=api.handle.api_url) as anon:
        assert (await anon.get(f"/v1/products/{slug}/events")).status_code == 401
    assert (await api.client.get("/v1/products/nope/events")).status_code == 404
    assert (await api.client.get(f"/v1/devices/{D1}/events")).status_code == 404
    async with trio.open_nursery() as nursery:
        stream = await _open(
            nursery, api.client, f"/v1/products/{slug}/events?access_token={api.token}"
        )
        await stream.wait_for(lambda s: ": keep-alive" in s.comments, timeout=20)
        nursery.cancel_scope.cancel()
    # The subscription ends with the connection.
    with trio.fail_after(20):
        while api.handle.bus.subscriber_count:
            await trio.sleep(0.05)


async def test_slow_sse_client_is_dropped(api) -> None:
    """A client that never reads fills its socket, then its bounded buffer: it is dropped."""
    slug = (await api.create_product())["slug"]
    product_id = (await api.client.get(f"/v1/products/{slug}")).json()["product"]["id"]
    url = urlsplit(api.handle.api_url)
    bus = api.handle.bus
    stream = await trio.open_tcp_stream(url.hostname, url.port)
    request = (
        f"GET /v1/products/{slug}/events HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {api.token}\r\n\r\n"
    )
    await stream.send_all(request.encode())
    with trio.fail_after(20):
        while bus.subscriber_count == 0:
            await trio.sleep(0.02)
    big = "x" * 60_000
    with trio.fail_after(20):
        while bus.dropped_subscribers == 0:
            bus.publish(Event("flood", big, product_id=product_id))
            await trio.sleep(0)
    assert bus.subscriber_count == 0
    await stream.aclose()


async def test_event_bus_bounds_and_filters() -> None:
    bus = EventBus(buffer=2, max_subscribers=2)
    with bus.subscribe(product_id=1, name_prefix="spark/") as a, bus.subscribe(device_id=D1) as b:
        with pytest.raises(TooManySubscribersError), bus.subscribe():
            pass
        assert bus.publish(Event("spark/status", "online", product_id=1, device_id=D1)) == 2
        assert bus.publish(Event("other", "x", product_id=1, device_id=D2)) == 0
        assert bus.publish(Event("spark/x", "1", product_id=2)) == 0
        assert bus.publish(Event("spark/y", "2", product_id=1)) == 1
        assert bus.publish(Event("spark/z", "3", product_id=1)) == 0  # a's buffer is full
        assert a.dropped and not b.dropped and bus.subscriber_count == 1
        received = [a.receive.receive_nowait().name, a.receive.receive_nowait().name]
        assert received == ["spark/status", "spark/y"]
        with pytest.raises(trio.EndOfChannel):
            await a.receive.receive()
    assert bus.subscriber_count == 0
