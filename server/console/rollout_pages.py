"""Console rollout pages (issue 15's safe rollouts): the list with a creation form, and one
rollout's page with its phases, counts, gates and latest events, live, and its pause /
resume / abort buttons.

* ``GET  /products/{product}/rollouts`` (``firmware:list``; ``?version=N`` filters).
* ``POST /products/{product}/rollouts`` (``firmware:release``): version, groups, phases as
  percents ("10,50,100"), minutes between phases, a failure threshold and what crossing it
  does, immediate; the same ``Fleet.create_rollout`` as ``POST /v1/.../rollouts``.
* ``GET  /products/{product}/rollouts/{rollout_id}`` (``firmware:get``) and its fragment
  ``.../phases`` (what the page re-fetches on rollout and device events).
* ``POST /products/{product}/rollouts/{rollout_id}/{pause|resume|abort}``
  (``firmware:release``), with an optional reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from otacore.errors import OtaError, ValidationError
from server.api.common import fleet_of, status_for
from server.console.release_view import when
from server.console.session import check_csrf, product_page, read_form
from server.console.templating import console_base, render
from server.fleet import RolloutView
from server.store import ProductRecord

#: The creation form's fields and the rollout fields they fill.
CREATE_FIELDS = ("version", "groups", "phases", "phase_wait", "max_failure_percent",
                 "min_sample", "on_failure")
#: What crossing the failure threshold does (otacore.rollout.criteria actions).
ON_FAILURE = ("pause", "abort")
#: The steering actions and their fleet methods.
ACTIONS = ("pause", "resume", "abort")


def _rollouts_url(request: Request, product: ProductRecord) -> str:
    return f"{console_base(request)}/products/{product.slug}/rollouts"


def _text(form: dict[str, Any], name: str) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise ValidationError(f"give {name} once")
    return value.strip()


async def _list_page(request: Request, product: ProductRecord, *, error: str = "",
                     form: dict[str, str] | None = None, status_code: int = 200) -> Response:
    fleet = fleet_of(request)
    version = request.query_params.get("version") or None
    views = await fleet.list_rollouts(product.id, version=version)
    firmware = await fleet.list_firmware(product.id)
    user = request.state.console_user
    values = {"version": version or "", "phases": "10,50,100", "phase_wait": "60",
              "on_failure": "pause"}
    values.update(form or {})
    return render(request, "rollouts/list.html", {
        "nav": "rollouts", "rollouts": [view.to_dict() for view in views],
        "firmware": firmware, "error": error, "values": values, "on_failure": ON_FAILURE,
        "may_create": "firmware:release" in user.actor.scopes_on(product.id),
        "rollouts_url": _rollouts_url(request, product), "when": when,
    }, status_code=status_code)


async def rollout_list(request: Request) -> Response:
    """The product's rollouts, newest first, and the form to start one."""
    _user, product = await product_page(request, "firmware:list", "list rollouts")
    return await _list_page(request, product)


async def create(request: Request) -> Response:
    """Create a rollout from the form (phases as percents)."""
    user, product = await product_page(request, "firmware:release", "create rollouts")
    form = await read_form(request)
    check_csrf(request, form)
    kept = {name: form[name] for name in CREATE_FIELDS if isinstance(form.get(name), str)}
    try:
        fields: dict[str, object] = {"version": _text(form, "version"),
                                     "phases": _text(form, "phases") or "100"}
        groups = [g.strip() for g in _text(form, "groups").split(",") if g.strip()]
        if groups:
            fields["groups"] = groups
        if _text(form, "phase_wait"):
            fields["phase_wait"] = _text(form, "phase_wait")
        if _text(form, "max_failure_percent"):
            fields["max_failure_percent"] = _text(form, "max_failure_percent")
            fields["on_failure"] = _text(form, "on_failure") or "pause"
            if _text(form, "min_sample"):
                fields["min_sample"] = _text(form, "min_sample")
        fields["immediate"] = form.get("immediate") is not None
        fields["force"] = form.get("force") is not None
        view = await fleet_of(request).create_rollout(user.actor, product.id, fields)
    except OtaError as exc:
        return await _list_page(request, product, error=str(exc), form=kept,
                                status_code=status_for(exc))
    return RedirectResponse(f"{_rollouts_url(request, product)}/{view.record.id}?created=1",
                            status_code=303)


def _view_context(request: Request, product: ProductRecord, view: RolloutView
                  ) -> dict[str, Any]:
    return {"rollout": view.to_dict(), "when": when,
            "rollout_url": f"{_rollouts_url(request, product)}/{view.record.id}"}


async def _rollout_page(request: Request, product: ProductRecord, rollout_id: object, *,
                        error: str = "", notice: str = "", status_code: int = 200) -> Response:
    view = await fleet_of(request).get_rollout(product.id, rollout_id)
    user = request.state.console_user
    return render(request, "rollouts/page.html", {
        "nav": "rollouts", "error": error, "notice": notice,
        "may_steer": "firmware:release" in user.actor.scopes_on(product.id),
        "rollouts_url": _rollouts_url(request, product),
        **_view_context(request, product, view),
    }, status_code=status_code)


async def rollout_page(request: Request) -> Response:
    """One rollout: phases, counts, gates, events, and its steering buttons."""
    _user, product = await product_page(request, "firmware:get", "read rollouts")
    notice = "The rollout was created." if request.query_params.get("created") else ""
    done = request.query_params.get("done")
    if done in ("pause", "resume", "abort"):
        notice = {"pause": "The rollout is paused.", "resume": "The rollout resumed.",
                  "abort": "The rollout was aborted."}[done]
    return await _rollout_page(request, product, request.path_params["rollout_id"],
                               notice=notice)


async def rollout_fragment(request: Request) -> Response:
    """The live part of a rollout's page (state, phases, counts, events)."""
    _user, product = await product_page(request, "firmware:get", "read rollouts")
    view = await fleet_of(request).get_rollout(product.id, request.path_params["rollout_id"])
    return render(request, "rollouts/_phases.html", _view_context(request, product, view))


async def steer(request: Request, action: str) -> Response:
    """Pause, resume or abort a rollout."""
    user, product = await product_page(request, "firmware:release", f"{action} rollouts")
    rollout_id = request.path_params["rollout_id"]
    form = await read_form(request)
    check_csrf(request, form)
    fleet = fleet_of(request)
    try:
        reason = _text(form, "reason") or None
        if action == "pause":
            await fleet.pause_rollout(user.actor, product.id, rollout_id, reason)
        elif action == "resume":
            await fleet.resume_rollout(user.actor, product.id, rollout_id)
        else:
            await fleet.abort_rollout(user.actor, product.id, rollout_id, reason)
    except OtaError as exc:
        return await _rollout_page(request, product, rollout_id, error=str(exc),
                                   status_code=status_for(exc))
    return RedirectResponse(f"{_rollouts_url(request, product)}/{rollout_id}?done={action}",
                            status_code=303)


def _steering(action: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await steer(request, action)

    endpoint.__name__ = endpoint.__qualname__ = f"{action}_rollout"
    return endpoint


_R = "/products/{product}/rollouts"

ROUTES: list[BaseRoute] = [
    Route(_R, rollout_list, methods=["GET"], name="rollout_list"),
    Route(_R, create, methods=["POST"], name="rollout_create"),
    Route(f"{_R}/{{rollout_id}}", rollout_page, methods=["GET"], name="rollout_page"),
    Route(f"{_R}/{{rollout_id}}/phases", rollout_fragment, methods=["GET"],
          name="rollout_phases"),
    *(Route(f"{_R}/{{rollout_id}}/{action}", _steering(action), methods=["POST"],
            name=f"rollout_{action}") for action in ACTIONS),
]
