"""Server-Sent Events in Particle's format, and event publishing.

A stream opens with ``:ok`` and then carries blocks of ``event: NAME`` and
``data: {"data", "ttl", "published_at", "coreid"}`` (HTML Living Standard, "Server-sent
events"; the field layout is Particle's). Comments (``:``) keep idle connections alive. The
stream ends when the client disconnects, when a send stalls longer than the send timeout, or
when the bus drops the subscriber for reading too slowly (its buffer is bounded).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from otacore.errors import AuthError, ValidationError
from server.api.common import (
    actor_of,
    as_bool,
    body_fields,
    fleet_of,
    int_field,
    product_of,
    settings_of,
    token_from,
)
from server.events import DEFAULT_TTL, Event, EventBus

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # ask reverse proxies not to buffer the stream
]


def encode_event(event: Event) -> bytes:
    """One SSE block for ``event``."""
    name = event.name.replace("\r", " ").replace("\n", " ")
    payload = json.dumps(event.sse_payload(), separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


class EventStream:
    """ASGI response streaming the events of one bus subscription until disconnect."""

    def __init__(
        self,
        bus: EventBus,
        *,
        product_id: int | None,
        device_id: str | None,
        prefix: str,
        keepalive: float,
        send_timeout: float,
        buffer: int,
        still_allowed: Callable[[], Awaitable[bool]] | None = None,
        encode: Callable[[Event], bytes] = encode_event,
    ) -> None:
        self.bus = bus
        #: One event's SSE block (Particle's named events here; the console's live pages
        #: take unnamed ``message`` events, which EventSource's onmessage receives).
        self.encode = encode
        #: Asked again every ``keepalive`` seconds: a stream whose token was revoked, whose
        #: account was disabled or removed from the team ends (the check ran at the start).
        self.still_allowed = still_allowed
        self.product_id = product_id
        self.device_id = device_id
        self.prefix = prefix
        self.keepalive = keepalive
        self.send_timeout = send_timeout
        self.buffer = buffer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.bus.subscribe(
            product_id=self.product_id,
            device_id=self.device_id,
            name_prefix=self.prefix,
            buffer=self.buffer,
        ) as sub:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
                await self._pump(sub.receive, send)
                nursery.cancel_scope.cancel()
        with trio.move_on_after(self.send_timeout):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, events: trio.MemoryReceiveChannel[Event], send: Send) -> None:
        if not await self._send(send, b":ok\n\n"):
            return
        next_check = trio.current_time() + self.keepalive
        while True:
            if self.still_allowed is not None and trio.current_time() >= next_check:
                if not await self.still_allowed():
                    await self._send(send, b": access revoked: sign in again\n\n")
                    return
                next_check = trio.current_time() + self.keepalive
            block = b": keep-alive\n\n"
            with trio.move_on_after(self.keepalive):
                try:
                    block = self.encode(await events.receive())
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    # Dropped by the bus for reading too slowly: tell the client, then end.
                    await self._send(send, b": dropped: client too slow\n\n")
                    return
            if not await self._send(send, block):
                return

    async def _send(self, send: Send, chunk: bytes) -> bool:
        """Send a chunk; False when it stalled past the send timeout."""
        with trio.move_on_after(self.send_timeout):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            return True
        return False

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return


def _stream(request: Request, product_id: int, device_id: str | None) -> EventStream:
    settings = settings_of(request)
    token = token_from(request)

    async def still_allowed() -> bool:
        try:
            actor = await fleet_of(request).authenticate(token or "")
        except AuthError:
            return False
        return "events:get" in actor.scopes_on(product_id)

    return EventStream(
        fleet_of(request).bus,
        product_id=product_id,
        device_id=device_id,
        prefix=request.path_params.get("prefix", ""),
        keepalive=settings.sse_keepalive_seconds,
        send_timeout=settings.sse_send_timeout_seconds,
        buffer=settings.sse_buffer,
        still_allowed=still_allowed,
    )


async def product_events(request: Request) -> Response | EventStream:
    """Stream a product's events, optionally those whose name starts with a prefix."""
    return _stream(request, product_of(request).id, None)


async def product_device_events(request: Request) -> Response | EventStream:
    """Stream one product device's events."""
    view = await fleet_of(request).get_device(
        product_of(request).id, request.path_params["device_id"]
    )
    return _stream(request, view.record.product_id, view.record.id)


async def device_events(request: Request) -> Response | EventStream:
    """Stream one device's events (``/v1/devices/:id/events``; the access check resolved the
    device's product)."""
    view = await fleet_of(request).get_device(
        product_of(request).id, request.path_params["device_id"]
    )
    return _stream(request, view.record.product_id, view.record.id)


async def publish_event(request: Request) -> Response:
    """Publish an event into the product stream: {name, data, private, ttl}."""
    fields = await body_fields(request)
    unknown = sorted(set(fields) - {"name", "data", "private", "ttl"})
    if unknown:
        raise ValidationError(
            f"unknown field(s) {', '.join(unknown)}; give name, data, private, ttl"
        )
    ttl = int_field(fields.get("ttl", DEFAULT_TTL), "ttl")
    await fleet_of(request).publish_event(
        actor_of(request),
        product_of(request).id,
        fields.get("name"),
        fields.get("data"),
        ttl=ttl,
        private=as_bool(fields, "private", default=True),
    )
    return JSONResponse({"ok": True})
