"""Console event pages: the product's events, live, with a name-prefix filter; and the
product's audit log, paged and filtered.

* ``GET /products/{product}/events`` (``events:get``): ``?prefix=`` keeps events whose name
  starts with it, ``?device=`` one device's (the stream's own filter); rows arrive over
  ``live.py``'s event stream (``static/events_live.js`` adds them as text, never markup).
  Under the live list, the last :data:`STORED_EVENTS` stored events with the same filters
  (the stored history, ``server.event_history``): what happened before the page opened.
* ``GET /products/{product}/audit`` (``audit:list``: owners and administrators, see
  ``server.fleet.roles.AUDIT_SCOPE``): newest first, ``?before=<id>`` pages on, ``?action=``
  (a prefix such as ``firmware.``) and ``?actor=`` filter.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from otacore.errors import ValidationError
from server.api.common import fleet_of
from server.console.release_view import when
from server.console.session import product_page
from server.console.templating import render
from server.fleet.base import normalize_device_id
from server.fleet.release_progress import AUDIT_PAGE
from server.fleet.roles import AUDIT_SCOPE

#: The longest event-name prefix (event names are at most 64 characters in Particle's rules;
#: the store keeps 200).
MAX_PREFIX = 200
#: Stored events the page shows under the live list (server.event_history).
STORED_EVENTS = 50


def _prefix(request: Request) -> str:
    prefix = request.query_params.get("prefix", "")
    if len(prefix) > MAX_PREFIX or not prefix.isprintable():
        raise ValidationError(f"the event name prefix must be printable text of at most "
                              f"{MAX_PREFIX} characters")
    return prefix


async def events_page(request: Request) -> Response:
    """The product's events as they happen, filtered by name prefix (and device)."""
    user, product = await product_page(request, "events:get", "read events")
    prefix = _prefix(request)
    device = request.query_params.get("device", "")
    if device:
        device = (await fleet_of(request).get_device(product.id,
                                                     normalize_device_id(device))).record.id
    stored = await fleet_of(request).event_history(
        user.actor, product.id, device_id=device or None, prefix=prefix, limit=STORED_EVENTS)
    return render(request, "events/live.html", {
        "nav": "events", "prefix": prefix, "device": device, "stored": stored.events,
        "stored_limit": STORED_EVENTS,
    })


async def audit_page(request: Request) -> Response:
    """A page of the product's audit log."""
    user, product = await product_page(request, AUDIT_SCOPE, "read the audit log")
    query = request.query_params
    filters = {"action": query.get("action", ""), "actor": query.get("actor", "")}
    page = await fleet_of(request).list_audit(
        user.actor, product.id, before=query.get("before"), limit=AUDIT_PAGE,
        action=filters["action"], by=filters["actor"])
    entries = [
        {"id": e.id, "at": when(e.at), "actor": e.actor, "action": e.action,
         "target": e.target, "details": json.dumps(e.details, sort_keys=True,
                                                   ensure_ascii=False)}
        for e in page.entries
    ]
    return render(request, "events/audit.html", {
        "nav": "audit", "entries": entries, "filters": filters,
        "next_before": page.next_before, "paged": bool(query.get("before")),
    })


ROUTES: list[BaseRoute] = [
    Route("/products/{product}/events", events_page, methods=["GET"], name="events"),
    Route("/products/{product}/audit", audit_page, methods=["GET"], name="audit"),
]
