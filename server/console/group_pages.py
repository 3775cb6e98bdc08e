"""``/console/products/{product}/groups``: a product's device groups with their device
counts and releases; create, edit (name, description, colour), delete.

Each action calls the ``Fleet`` method ``/v1/products/:p/groups[/:name]`` calls, with the
user's actor and the REST scopes (groups:create, groups:update, groups:remove); a refused
one shows the page again with the reason and the form's values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from otacore.errors import OtaError, ValidationError
from server.api.common import fleet_of, status_for
from server.console.session import ConsoleUser, check_csrf, product_page, read_form
from server.console.templating import console_base, render
from server.store import ProductRecord

NOTICES = {
    "created": "The group was created.",
    "updated": "The group was changed.",
    "deleted": "The group was deleted: its devices left it and its release was withdrawn.",
}


def groups_url(request: Request, product: ProductRecord) -> str:
    """The groups page's path."""
    return f"{console_base(request)}/products/{product.slug}/groups"


def _fields(form: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    """The named text fields of a form, each given once."""
    fields = {}
    for name in names:
        value = form.get(name, "")
        if not isinstance(value, str):
            raise ValidationError(f"give {name} once")
        fields[name] = value.strip()
    return fields


async def _page(request: Request, user: ConsoleUser, product: ProductRecord, *,
                error: str = "", status_code: int = 200, editing: str | None = None,
                values: Mapping[str, str] | None = None) -> Response:
    groups = await fleet_of(request).list_groups(product.id)
    scopes = user.actor.scopes_on(product.id)
    return render(request, "groups/list.html", {
        "nav": "groups", "groups": groups, "error": error, "editing": editing,
        "values": values or {}, "notice": NOTICES.get(request.query_params.get("done", ""), ""),
        "can_create": "groups:create" in scopes, "can_update": "groups:update" in scopes,
        "can_remove": "groups:remove" in scopes,
        "groups_url": groups_url(request, product),
    }, status_code=status_code)


async def group_list(request: Request) -> Response:
    """The groups page."""
    user, product = await product_page(request, "groups:list", "list groups")
    return await _page(request, user, product)


def _refused(exc: OtaError) -> int:
    status = status_for(exc)
    if status >= 500:
        raise exc
    return status


async def create_group(request: Request) -> Response:
    """Create a group from the form (name, description, colour)."""
    user, product = await product_page(request, "groups:create", "create groups")
    form = await read_form(request)
    check_csrf(request, form)
    values: dict[str, str] = {}
    try:
        values = _fields(form, ("name", "description", "color"))
        fields = {"name": values["name"], "description": values["description"],
                  "color": values["color"] or None}
        await fleet_of(request).create_group(user.actor, product.id, fields)
    except OtaError as exc:
        return await _page(request, user, product, error=str(exc), status_code=_refused(exc),
                           values=values)
    return RedirectResponse(f"{groups_url(request, product)}?done=created", status_code=303)


async def update_group(request: Request) -> Response:
    """Change a group's name, description or colour."""
    user, product = await product_page(request, "groups:update", "edit groups")
    form = await read_form(request)
    check_csrf(request, form)
    name = request.path_params["name"]
    values: dict[str, str] = {}
    try:
        values = _fields(form, ("name", "description", "color"))
        changes: dict[str, Any] = {"description": values["description"],
                                   "color": values["color"] or None}
        if values["name"] and values["name"] != name:
            changes["name"] = values["name"]
        await fleet_of(request).update_group(user.actor, product.id, name, changes)
    except OtaError as exc:
        return await _page(request, user, product, error=str(exc), status_code=_refused(exc),
                           editing=name, values=values)
    anchor = quote(values["name"] or name)
    return RedirectResponse(f"{groups_url(request, product)}?done=updated#group-{anchor}",
                            status_code=303)


async def delete_group(request: Request) -> Response:
    """Delete a group (its devices leave it; its release is withdrawn)."""
    user, product = await product_page(request, "groups:remove", "delete groups")
    form = await read_form(request)
    check_csrf(request, form)
    try:
        await fleet_of(request).delete_group(user.actor, product.id,
                                             request.path_params["name"])
    except OtaError as exc:
        return await _page(request, user, product, error=str(exc), status_code=_refused(exc))
    return RedirectResponse(f"{groups_url(request, product)}?done=deleted", status_code=303)


_G = "/products/{product}/groups"

ROUTES: list[BaseRoute] = [
    Route(_G, group_list, methods=["GET"], name="groups"),
    Route(_G, create_group, methods=["POST"], name="group_create"),
    Route(f"{_G}/{{name}}/edit", update_group, methods=["POST"], name="group_update"),
    Route(f"{_G}/{{name}}/delete", delete_group, methods=["POST"], name="group_delete"),
]
