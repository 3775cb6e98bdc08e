"""Console firmware pages: the list with the upload form, one version's page with its
release form and the live release view.

* ``GET  /products/{product}/firmware``: versions, newest first, and the upload form.
* ``POST /products/{product}/firmware``: upload (multipart, the REST upload's size limit,
  through ``Fleet.upload_firmware``: the module checks' refusal is shown on the same page in
  a ``role="alert"`` element, the form's values kept).
* ``GET  /products/{product}/firmware/{version}``: details, release form, live release view.
* ``GET  /products/{product}/firmware/{version}/release-view``: the live view's fragment
  (what the page re-fetches when the event stream says something changed).
* ``POST /products/{product}/firmware/{version}/release``: release to the product default or
  to groups, standard or immediate (``Fleet.release_firmware``, as ``PUT .../firmware/release``).
* ``POST /products/{product}/firmware/{version}/withdraw``: withdraw it from the product
  default and every group (the REST release with ``product_default=false, groups=[]``).
* ``POST /products/{product}/firmware/{version}/delete``: delete an unreleased version
  (``firmware:remove``, as ``DELETE /v1/.../firmware/:version``).

Every page applies the REST route's scope (``firmware:list``, ``firmware:create``,
``firmware:get``, ``firmware:release``) through :func:`product_page`; every POST checks the
CSRF token before acting, and acts as the signed-in user.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from otacore.errors import OtaError, ValidationError
from server.api.common import (
    fleet_of,
    form_text,
    is_multipart,
    multipart_form,
    settings_of,
    status_for,
    upload_of,
)
from server.console.release_view import human_bytes, view_context, when
from server.console.session import CsrfError, check_csrf, product_page, read_form
from server.console.templating import console_base, render
from server.fleet.base import check_version
from server.store import ProductRecord

#: Multipart field of the binary in the console's form (the REST API's names work too).
FILE_FIELDS = ("file", "binary")
#: The upload form's text fields, shown again after a refusal.
UPLOAD_FIELDS = ("version", "title", "description")
#: "Release to" choices.
RELEASE_TARGETS = ("product", "groups")


def _firmware_url(request: Request, product: ProductRecord, version: int | None = None) -> str:
    url = f"{console_base(request)}/products/{product.slug}/firmware"
    return url if version is None else f"{url}/{version}"


def _version_param(request: Request) -> int:
    """The ``{version}`` path value (400 for one that is no version)."""
    return check_version(request.path_params["version"])


async def _list_page(request: Request, product: ProductRecord, *, error: str = "",
                     notice: str = "", values: dict[str, str] | None = None,
                     status_code: int = 200) -> Response:
    views = await fleet_of(request).list_firmware(product.id)
    return render(request, "firmware/list.html", {
        "nav": "firmware", "firmware": views, "error": error, "notice": notice,
        "values": values or dict.fromkeys(UPLOAD_FIELDS, ""),
        "max_upload": human_bytes(settings_of(request).max_upload_bytes),
        "human_bytes": human_bytes, "when": when,
    }, status_code=status_code)


async def firmware_list(request: Request) -> Response:
    """The product's firmware and the upload form."""
    _user, product = await product_page(request, "firmware:list", "list firmware")
    deleted = request.query_params.get("deleted", "")
    notice = f"Version {deleted} was deleted." if deleted.isdigit() and len(deleted) <= 5 else ""
    return await _list_page(request, product, notice=notice)


async def upload(request: Request) -> Response:
    """Upload a version; a refusal is shown on the list page with the values kept."""
    user, product = await product_page(request, "firmware:create", "upload firmware")
    values = dict.fromkeys(UPLOAD_FIELDS, "")
    try:
        if not is_multipart(request):
            raise ValidationError("send the upload form as multipart/form-data")
        async with multipart_form(request, settings_of(request).max_upload_bytes) as form:
            check_csrf(request, form)
            found = await upload_of(form, FILE_FIELDS)
            fields = form_text(form)
        values.update({name: str(fields.get(name, ""))[:10_000] for name in UPLOAD_FIELDS})
        if found is None or not found[0]:
            raise ValidationError("choose the firmware file (.bin) to upload")
        if not values["version"].strip():
            raise ValidationError("give the version: the product version built into the binary")
        image, filename = found
        view = await fleet_of(request).upload_firmware(
            user.actor, product.id, image, version=values["version"], title=values["title"],
            description=values["description"], filename=filename)
    except CsrfError:
        raise
    except OtaError as exc:
        return await _list_page(request, product, error=str(exc), values=values,
                                status_code=status_for(exc))
    return RedirectResponse(_firmware_url(request, product, view.record.version) + "?uploaded=1",
                            status_code=303)


async def _firmware_page(request: Request, product: ProductRecord, version: int, *,
                         error: str = "", notice: str = "", form: dict[str, Any] | None = None,
                         status_code: int = 200) -> Response:
    fleet = fleet_of(request)
    view = await fleet.get_firmware(product.id, version)
    progress = await fleet.release_progress(product.id, version)
    groups = await fleet.list_groups(product.id)
    user = request.state.console_user
    context: dict[str, Any] = {
        "nav": "firmware", "view": view, "error": error, "notice": notice,
        "groups": groups, "form": form or {},
        "may_release": "firmware:release" in user.actor.scopes_on(product.id),
        "may_delete": "firmware:remove" in user.actor.scopes_on(product.id),
        "fragment_url": _firmware_url(request, product, version) + "/release-view",
        "firmware_url": _firmware_url(request, product, version),
        "rollouts_url": f"{console_base(request)}/products/{product.slug}/rollouts",
        **view_context(progress),
    }
    return render(request, "firmware/page.html", context, status_code=status_code)


async def firmware_page(request: Request) -> Response:
    """One version: details, the release form and the live release view."""
    _user, product = await product_page(request, "firmware:get", "read firmware")
    version = _version_param(request)
    notice = ""
    if request.query_params.get("uploaded"):
        notice = f"Version {version} was uploaded."
    elif request.query_params.get("released"):
        notice = f"Version {version} was released."
    elif request.query_params.get("withdrawn"):
        notice = f"Version {version} was withdrawn from its releases."
    return await _firmware_page(request, product, version, notice=notice)


async def release_view(request: Request) -> Response:
    """The live release view alone (the fragment the page re-fetches)."""
    _user, product = await product_page(request, "firmware:get", "read firmware")
    progress = await fleet_of(request).release_progress(product.id, _version_param(request))
    return render(request, "firmware/_release_view.html", view_context(progress))


def _checkbox(form: dict[str, Any], name: str) -> bool:
    """A checkbox: present ("on" or any value the form sets) means ticked."""
    value = form.get(name)
    if value is None:
        return False
    if not isinstance(value, str):
        raise ValidationError(f"give {name} once")
    return True


def _group_names(raw: object) -> list[str]:
    """Group names from the "Groups" field (comma-separated) or repeated fields."""
    parts = raw if isinstance(raw, list) else [raw]
    names: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValidationError("groups must be text")
        names += [name.strip() for name in part.split(",") if name.strip()]
    return list(dict.fromkeys(names))


async def release(request: Request) -> Response:
    """Release the version to the product default or to groups."""
    user, product = await product_page(request, "firmware:release", "release firmware")
    version = _version_param(request)
    form = await read_form(request)
    check_csrf(request, form)
    kept = {"release_to": form.get("release_to"), "groups": form.get("groups"),
            "intelligent": form.get("intelligent"), "force": form.get("force")}
    try:
        target = form.get("release_to", "product")
        if target not in RELEASE_TARGETS:
            raise ValidationError("Release to must be Product or Groups")
        groups = _group_names(form.get("groups", ""))
        if target == "groups" and not groups:
            raise ValidationError("name the groups to release to (comma-separated)")
        await fleet_of(request).release_firmware(
            user.actor, product.id, version,
            product_default=True if target == "product" else None,
            groups=groups if target == "groups" else None,
            intelligent=_checkbox(form, "intelligent"), force=_checkbox(form, "force"))
    except OtaError as exc:
        return await _firmware_page(request, product, version, error=str(exc),
                                    form={k: v for k, v in kept.items() if isinstance(v, str)},
                                    status_code=status_for(exc))
    return RedirectResponse(_firmware_url(request, product, version) + "?released=1#release-view",
                            status_code=303)


async def withdraw(request: Request) -> Response:
    """Withdraw the version from the product default and every group releasing it."""
    user, product = await product_page(request, "firmware:release", "release firmware")
    version = _version_param(request)
    check_csrf(request, await read_form(request))
    try:
        await fleet_of(request).release_firmware(user.actor, product.id, version,
                                                 product_default=False, groups=[])
    except OtaError as exc:
        return await _firmware_page(request, product, version, error=str(exc),
                                    status_code=status_for(exc))
    return RedirectResponse(_firmware_url(request, product, version) + "?withdrawn=1",
                            status_code=303)


async def delete(request: Request) -> Response:
    """Delete an unreleased version no device is locked to (``Fleet.delete_firmware``)."""
    user, product = await product_page(request, "firmware:remove", "delete firmware")
    version = _version_param(request)
    check_csrf(request, await read_form(request))
    try:
        await fleet_of(request).delete_firmware(user.actor, product.id, version)
    except OtaError as exc:
        return await _firmware_page(request, product, version, error=str(exc),
                                    status_code=status_for(exc))
    return RedirectResponse(f"{_firmware_url(request, product)}?deleted={version}",
                            status_code=303)


_V = "/products/{product}/firmware/{version}"

ROUTES: list[BaseRoute] = [
    Route("/products/{product}/firmware", firmware_list, methods=["GET"], name="firmware_list"),
    Route("/products/{product}/firmware", upload, methods=["POST"], name="firmware_upload"),
    Route(_V, firmware_page, methods=["GET"], name="firmware_page"),
    Route(f"{_V}/release-view", release_view, methods=["GET"], name="firmware_release_view"),
    Route(f"{_V}/release", release, methods=["POST"], name="firmware_release"),
    Route(f"{_V}/withdraw", withdraw, methods=["POST"], name="firmware_withdraw"),
    Route(f"{_V}/delete", delete, methods=["POST"], name="firmware_delete"),
]
