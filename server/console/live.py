"""``GET /console/products/{product}/stream``: the product's events as Server-Sent Events,
for the console's live pages; ``?device=ID`` keeps one device's.

The REST stream's semantics (``server.api.events.EventStream``): the same ``events:get``
scope, asked again every keep-alive interval while streaming (a revoked session, a
disabled account or a lost team role ends the stream), the same bounded buffer. The
session cookie authenticates it (EventSource sends cookies, not headers). Pages use it
through ``static/console.js``: each event makes the fragments that listen refresh.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from otacore.errors import AuthError
from server.api.common import fleet_of, settings_of
from server.api.events import EventStream
from server.console.session import product_page, session_token
from server.events import Event


def encode_console_event(event: Event) -> bytes:
    """One unnamed SSE block (EventSource ``message``) carrying the event's name, data,
    device id (``coreid``) and publication time as JSON."""
    payload = {"name": event.name, **event.sse_payload()}
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def product_stream(request: Request) -> EventStream:
    """The product's events (optionally one device's) while the session may read them."""
    _user, product = await product_page(request, "events:get", "read events")
    device_id = request.query_params.get("device") or None
    fleet = fleet_of(request)
    if device_id is not None:  # 400 for a malformed id, 404 for another product's device
        device_id = (await fleet.get_device(product.id, device_id)).record.id
    session = session_token(request)
    token = session[0] if session is not None else ""
    product_id = product.id

    async def still_allowed() -> bool:
        try:
            actor = await fleet.authenticate(token)
        except AuthError:
            return False
        return "events:get" in actor.scopes_on(product_id)

    settings = settings_of(request)
    return EventStream(
        fleet.bus,
        product_id=product_id,
        device_id=device_id,
        prefix="",
        keepalive=settings.sse_keepalive_seconds,
        send_timeout=settings.sse_send_timeout_seconds,
        buffer=settings.sse_buffer,
        still_allowed=still_allowed,
        encode=encode_console_event,
    )


ROUTES: list[BaseRoute] = [
    Route("/products/{product}/stream", product_stream, methods=["GET"], name="stream"),
]
