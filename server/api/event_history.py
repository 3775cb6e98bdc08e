"""The stored event history over REST (``server.fleet.event_history``): a product's and a
product device's recent events, newest first, as JSON pages.

``GET /v1/products/:p/events/history`` and ``GET /v1/products/:p/devices/:id/events/history``
take ``?before=<id>`` (the previous page's ``next_before``), ``?limit=`` (1..200, default
50) and ``?prefix=`` (event name prefix). The first path is also the live stream of the
events named "history..." (``/events/:prefix``): a request that accepts
``text/event-stream`` gets that stream, as before.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api import events
from server.api.common import actor_of, fleet_of, product_of
from server.events import iso_ms
from server.fleet import EventHistoryPage


def history_json(page: EventHistoryPage) -> dict[str, Any]:
    """A page of stored events, newest first, with the cursor of the next page. Each event
    has the live stream's fields (``data``, ``ttl``, ``published_at``, ``coreid``) plus
    its ``id``, ``name``, ``device_id``, ``public`` and ``data_truncated`` (its data was
    cut to Particle's 1,024 bytes)."""
    return {
        "events": [
            {
                "id": stored.id,
                "name": stored.event.name,
                "data": stored.event.data,
                "ttl": stored.event.ttl,
                "published_at": iso_ms(stored.event.published_at),
                "coreid": stored.event.coreid,
                "device_id": stored.event.device_id,
                "public": stored.event.public,
                "data_truncated": stored.data_cut,
            }
            for stored in page.events
        ],
        "next_before": page.next_before,
    }


def _wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


async def product_event_history(request: Request) -> Any:
    """A page of the product's stored events (or, for an SSE client, the live stream of
    events whose name starts with "history")."""
    if _wants_stream(request):
        request.path_params["prefix"] = "history"
        return await events.product_events(request)
    query = request.query_params
    page = await fleet_of(request).event_history(
        actor_of(request), product_of(request).id, prefix=query.get("prefix"),
        before=query.get("before"), limit=query.get("limit", "50"))
    return JSONResponse(history_json(page))


async def device_event_history(request: Request) -> Response:
    """A page of one product device's stored events."""
    query = request.query_params
    page = await fleet_of(request).event_history(
        actor_of(request), product_of(request).id,
        device_id=request.path_params["device_id"], prefix=query.get("prefix"),
        before=query.get("before"), limit=query.get("limit", "50"))
    return JSONResponse(history_json(page))
