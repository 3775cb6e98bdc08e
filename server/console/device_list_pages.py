"""``/console/products/{product}/devices``: the device list, filtered and paged in the store.

Filters are GET query parameters (bookmarkable): ``q`` (id or name contains), ``group``,
``version`` (the firmware version the device reports), ``online``, ``development``,
``locked`` (``yes``/``no``), ``status`` (the update status: ``server.store.device_status``),
``page`` and ``per_page`` (default 50). The page costs a fixed number of store statements
whatever the fleet's size: the count, the page, its devices' statuses, the groups. The rows
are a fragment (``?fragment=results``) the page re-fetches, at most every 2 s, while the
product's events come in.

The product's "force updates" switch (Particle's product ``firmware_updates_forced``) sits
here too: ``POST /console/products/{product}/forced``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from otacore.errors import OtaError, ValidationError
from server.api.common import fleet_of, has_lone_surrogate, status_for
from server.console.session import check_csrf, product_page, read_form
from server.console.templating import console_base, render
from server.fleet.devices import MAX_PAGE
from server.store.device_status import UPDATE_STATUSES

#: Devices per page unless ``per_page`` says otherwise, and the most it may say.
DEFAULT_PER_PAGE = 50
MAX_CONSOLE_PER_PAGE = 500

#: How the list names each update status.
STATUS_LABELS = {
    "up_to_date": "Up to date",
    "pending": "Pending",
    "updating": "Updating",
    "failed": "Failed",
    "no_target": "No target",
}
#: How the device pages name each target reason (``otacore.precedence.TargetReason``).
REASON_LABELS = {
    "none": "no release reaches it",
    "development": "development device (no automatic updates)",
    "locked": "locked to this version",
    "group_release": "released to its group",
    "product_default": "the product's default release",
}

_YES_NO = {"yes": True, "no": False, "": None}


@dataclass(frozen=True)
class DeviceFilters:
    """The list's filters as the query gave them (``values`` refill the form)."""

    q: str | None = None
    group: str | None = None
    version: int | None = None
    online: bool | None = None
    development: bool | None = None
    locked: bool | None = None
    status: str | None = None
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    def query(self, **changes: Any) -> dict[str, Any]:
        """The query parameters of these filters (with ``changes``), for links."""
        def yes_no(value: bool | None) -> str | None:
            return None if value is None else ("yes" if value else "no")

        params: dict[str, Any] = {
            "q": self.q, "group": self.group, "version": self.version,
            "online": yes_no(self.online), "development": yes_no(self.development),
            "locked": yes_no(self.locked), "status": self.status,
            "per_page": None if self.per_page == DEFAULT_PER_PAGE else self.per_page,
            "page": None if self.page == 1 else self.page,
        }
        params.update(changes)
        return params


def _text(raw: str | None, what: str, longest: int) -> str | None:
    if raw is None or raw.strip() == "":
        return None
    if len(raw) > longest or has_lone_surrogate(raw):
        raise ValidationError(f"{what} must be text of at most {longest} characters")
    return raw.strip()


def _number(raw: str | None, what: str, low: int, high: int) -> int | None:
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or not low <= int(text) <= high:
        raise ValidationError(f"{what} must be a whole number from {low} to {high}")
    return int(text)


def _yes_no(raw: str | None, what: str) -> bool | None:
    value = (raw or "").strip().lower()
    if value not in _YES_NO:
        raise ValidationError(f"{what} must be yes, no or empty (any), not {raw!r}")
    return _YES_NO[value]


def parse_filters(request: Request) -> DeviceFilters:
    """The filters of the request's query (ValidationError naming a bad one)."""
    query = request.query_params
    status = (query.get("status") or "").strip() or None
    if status is not None and status not in UPDATE_STATUSES:
        raise ValidationError(
            f"update status must be one of {', '.join(UPDATE_STATUSES)}, not {status!r}")
    return DeviceFilters(
        q=_text(query.get("q"), "the search", 100),
        group=_text(query.get("group"), "the group", 100),
        version=_number(query.get("version"), "version", 0, 65535),
        online=_yes_no(query.get("online"), "online"),
        development=_yes_no(query.get("development"), "development"),
        locked=_yes_no(query.get("locked"), "locked"),
        status=status,
        page=_number(query.get("page"), "page", 1, MAX_PAGE) or 1,
        per_page=_number(query.get("per_page"), "per_page", 1, MAX_CONSOLE_PER_PAGE)
        or DEFAULT_PER_PAGE,
    )


async def device_list(request: Request) -> Response:
    """The device list with its filter form; a bad filter shows the form and its reason."""
    user, product = await product_page(request, "devices:list", "list devices")
    fleet = fleet_of(request)
    groups = await fleet.list_groups(product.id)
    filters, listing, error, status_code = DeviceFilters(), None, "", 200
    try:
        filters = parse_filters(request)
        q = filters.q or ""
        by_id = q.isascii() and all(ch in "0123456789abcdefABCDEF" for ch in q)
        listing = await fleet.list_devices(
            product.id,
            device_id=q if q and by_id else None,
            name=q if q and not by_id else None,
            groups=(filters.group,) if filters.group else (),
            online=filters.online,
            firmware_version=filters.version,
            development=filters.development,
            locked=filters.locked,
            update_status=filters.status,
            page=filters.page,
            per_page=filters.per_page,
        )
    except OtaError as exc:
        if status_for(exc) >= 500:
            raise
        error, status_code = str(exc), status_for(exc)
    # ?fragment=results: the rows and paging alone, which the page re-fetches live.
    fragment = request.query_params.get("fragment") == "results"
    return render(request, "devices/results.html" if fragment else "devices/list.html", {
        "nav": "devices", "filters": filters, "listing": listing, "groups": groups,
        "error": error, "statuses": STATUS_LABELS, "reasons": REASON_LABELS,
        "can_force": "products:update" in user.actor.scopes_on(product.id),
    }, status_code=status_code)


async def set_product_forced(request: Request) -> Response:
    """Turn the product's "force updates" on or off (``PUT /v1/products/:p`` does the same)."""
    user, product = await product_page(request, "products:update", "change it")
    form = await read_form(request)
    check_csrf(request, form)
    raw = form.get("forced")
    if raw not in ("yes", "no"):
        raise ValidationError("forced must be yes or no")
    forced = raw == "yes"
    await fleet_of(request).update_product(user.actor, product.id,
                                           {"firmware_updates_forced": forced})
    return RedirectResponse(f"{console_base(request)}/products/{product.slug}/devices",
                            status_code=303)


ROUTES: list[BaseRoute] = [
    Route("/products/{product}/devices", device_list, methods=["GET"], name="devices"),
    Route("/products/{product}/forced", set_product_forced, methods=["POST"],
          name="product_forced"),
]
