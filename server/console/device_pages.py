"""``/console/products/{product}/devices/{device_id}``: one device, and what an operator does
to it.

The page shows the device's identity and state, the firmware the precedence rules give it
and why, the update in flight with its progress, its groups, its history (audit entries
and flashes), its events live and its stored "Recent events" (``?events_before=<id>``
pages on; shown to readers with ``events:get``, as the live stream). The status part is a
fragment (``?fragment=status``) the page re-fetches on each of the device's events, every
2 s while a transfer is in flight (progress is stored, not announced) and every 5 s while
an update is pending.

Each action is a POST form (CSRF-checked) calling ``Fleet.update_device`` as ``PUT
/v1/products/:p/devices/:id`` does, with the user's actor and the same ``devices:update``
scope: lock (with "flash now"), unlock, development on/off, forced updates on/off, add to
or remove from a group. A refused action shows the page again with the reason in an alert
and the status the REST API would answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from otacore.errors import OtaError, ValidationError
from server.api.common import fleet_of, status_for
from server.console.device_list_pages import REASON_LABELS, STATUS_LABELS
from server.console.session import ConsoleUser, check_csrf, product_page, read_form
from server.console.templating import console_base, render
from server.fleet import DeviceView
from server.store import ProductRecord

#: Audit entries per history page, and stored events per "Recent events" page.
HISTORY_PAGE = 25
EVENTS_PAGE = 25

#: What the page says after each action (by code: no text travels in the URL).
NOTICES = {
    "locked": "The device is locked to the version.",
    "flashing": "The device is locked, and flashing it was requested.",
    "unlocked": "The device is unlocked: releases decide its firmware again.",
    "development_on": "The device is a development device now.",
    "development_off": "The device is no longer a development device.",
    "forced_on": "Updates are forced for this device.",
    "forced_off": "Updates are no longer forced for this device.",
    "group_added": "The device joined the group.",
    "group_removed": "The device left the group.",
}

Changes = Callable[[Mapping[str, Any], DeviceView], tuple[dict[str, Any], str]]


#: What decided an update, as the update results name it (server.fleet.update_reports).
UPDATE_KINDS = {
    "release": "a release",
    "lock": "a lock",
    "flash": "a flash request",
    "other": "other (e.g. a rollout's image or a Device OS part)",
}


def device_url(request: Request, product: ProductRecord, device_id: str) -> str:
    """The device page's path."""
    return f"{console_base(request)}/products/{product.slug}/devices/{device_id}"


def _history_before(request: Request) -> int | None:
    raw = request.query_params.get("before")
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < 1:
        raise ValidationError("before must be a positive whole number (an audit entry id)")
    return int(raw)


def _progress(view: DeviceView) -> dict[str, Any] | None:
    update = view.update
    if update is None:
        return None
    total = max(update.bytes_total, 0)
    done = min(max(update.bytes_done, 0), total) if total else max(update.bytes_done, 0)
    return {"done": done, "total": total, "percent": (100 * done // total) if total else 0,
            "transfer": update.transfer, "version": update.version, "status": update.status,
            "started_at": update.started_at, "updated_at": update.updated_at}


async def _page(request: Request, user: ConsoleUser, product: ProductRecord, device_id: str,
                *, error: str = "", status_code: int = 200, fragment: bool = False) -> Response:
    fleet = fleet_of(request)
    view = await fleet.get_device(product.id, device_id)
    scopes = user.actor.scopes_on(product.id)
    context: dict[str, Any] = {
        "nav": "devices", "view": view, "device": view.record, "progress": _progress(view),
        "statuses": STATUS_LABELS, "reasons": REASON_LABELS,
        "device_url": device_url(request, product, view.record.id),
    }
    if fragment:
        return render(request, "devices/status.html", context)
    before = _history_before(request)
    firmware = await fleet.list_firmware(product.id)
    groups = await fleet.list_groups(product.id)
    history = await fleet.device_history(product.id, view.record.id, before_id=before,
                                         limit=HISTORY_PAGE)
    updates = await fleet.update_results(product.id, view.record.id, limit=HISTORY_PAGE)
    # The stored events need events:get, as the live stream does (private ones among them).
    events_before = request.query_params.get("events_before")
    recent = None
    if "events:get" in scopes:
        recent = await fleet.event_history(user.actor, product.id, device_id=view.record.id,
                                           before=events_before, limit=EVENTS_PAGE)
    context.update({
        "firmware_versions": sorted((fw.record.version for fw in firmware), reverse=True),
        "other_groups": [g.record.name for g in groups if g.record.name not in view.record.groups],
        "history": history, "history_before": before, "updates": updates,
        "update_kinds": UPDATE_KINDS,
        "recent_events": recent, "events_paged": bool(events_before),
        "can_update": "devices:update" in scopes,
        "error": error, "notice": NOTICES.get(request.query_params.get("done", ""), ""),
    })
    return render(request, "devices/device.html", context, status_code=status_code)


async def device_page(request: Request) -> Response:
    """The device page, or its status fragment (``?fragment=status``)."""
    user, product = await product_page(request, "devices:get", "read devices")
    fragment = request.query_params.get("fragment") == "status"
    return await _page(request, user, product, request.path_params["device_id"],
                       fragment=fragment)


def _one(form: Mapping[str, Any], name: str, what: str) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise ValidationError(f"give {what} once")
    return value.strip()


def _checkbox(form: Mapping[str, Any], name: str) -> bool:
    value = form.get(name)
    if value is None:
        return False
    if value in ("on", "true", "yes", "1"):
        return True
    raise ValidationError(f"{name} must be checked or not, not {value!r}")


def _yes_no(form: Mapping[str, Any], name: str) -> bool:
    value = _one(form, name, name)
    if value not in ("yes", "no"):
        raise ValidationError(f"{name} must be yes or no, not {value!r}")
    return value == "yes"


def _lock(form: Mapping[str, Any], _view: DeviceView) -> tuple[dict[str, Any], str]:
    raw = _one(form, "version", "one version")
    if not raw:
        raise ValidationError("choose the version to lock the device to")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 5:
        raise ValidationError(f"the version must be a number from 0 to 65535, not {raw!r}")
    flash = _checkbox(form, "flash")
    changes: dict[str, Any] = {"desired_firmware_version": int(raw)}
    if flash:
        changes["flash"] = True
    return changes, "flashing" if flash else "locked"


def _unlock(_form: Mapping[str, Any], _view: DeviceView) -> tuple[dict[str, Any], str]:
    return {"desired_firmware_version": None}, "unlocked"


def _development(form: Mapping[str, Any], _view: DeviceView) -> tuple[dict[str, Any], str]:
    on = _yes_no(form, "development")
    return {"development": on}, "development_on" if on else "development_off"


def _forced(form: Mapping[str, Any], _view: DeviceView) -> tuple[dict[str, Any], str]:
    on = _yes_no(form, "forced")
    return {"firmware_updates_forced": on}, "forced_on" if on else "forced_off"


def _add_group(form: Mapping[str, Any], view: DeviceView) -> tuple[dict[str, Any], str]:
    name = _one(form, "group", "one group")
    if not name:
        raise ValidationError("choose the group to add the device to")
    if name in view.record.groups:
        raise ValidationError(f"the device is in group {name!r} already")
    return {"groups": [*view.record.groups, name]}, "group_added"


def _remove_group(form: Mapping[str, Any], view: DeviceView) -> tuple[dict[str, Any], str]:
    name = _one(form, "group", "one group")
    if name not in view.record.groups:
        raise ValidationError(f"the device is not in group {name!r}")
    return {"groups": [g for g in view.record.groups if g != name]}, "group_removed"


def _action(changes_of: Changes) -> Callable[[Request], Awaitable[Response]]:
    """A POST endpoint applying ``changes_of(form, device)`` with ``Fleet.update_device``."""

    async def act(request: Request) -> Response:
        user, product = await product_page(request, "devices:update",
                                           "change or flash devices")
        form = await read_form(request)
        check_csrf(request, form)
        fleet = fleet_of(request)
        device_id = request.path_params["device_id"]
        view = await fleet.get_device(product.id, device_id)  # 404 for another's device
        try:
            changes, done = changes_of(form, view)
            await fleet.update_device(user.actor, product.id, view.record.id, changes)
        except OtaError as exc:
            status = status_for(exc)
            if status >= 500:
                raise
            # (a device removed meanwhile: the page's own read answers 404)
            return await _page(request, user, product, view.record.id, error=str(exc),
                               status_code=status)
        target = device_url(request, product, view.record.id)
        return RedirectResponse(f"{target}?done={quote(done)}", status_code=303)

    act.__doc__ = changes_of.__doc__ or act.__doc__
    return act


_D = "/products/{product}/devices/{device_id}"

ROUTES: list[BaseRoute] = [
    Route(_D, device_page, methods=["GET"], name="device"),
    Route(f"{_D}/lock", _action(_lock), methods=["POST"], name="device_lock"),
    Route(f"{_D}/unlock", _action(_unlock), methods=["POST"], name="device_unlock"),
    Route(f"{_D}/development", _action(_development), methods=["POST"],
          name="device_development"),
    Route(f"{_D}/forced", _action(_forced), methods=["POST"], name="device_forced"),
    Route(f"{_D}/groups/add", _action(_add_group), methods=["POST"], name="device_group_add"),
    Route(f"{_D}/groups/remove", _action(_remove_group), methods=["POST"],
          name="device_group_remove"),
]
