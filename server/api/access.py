"""Who may call each route, and on which product: one rule per route, checked before the
endpoint runs.

Every route of the table (``server.api.app``) is built with :func:`route` and a
:class:`Rule`; the test suite walks the table and fails on a route without one
(``tests/test_api_access.py``). The guard authenticates the token (``Fleet.authenticate``:
its user, role, teams and scopes as they are now), then:

* ``public``: no token (``/oauth/token``, ``/openapi.json``);
* ``token``: any valid token (the token's own introspection and revocation);
* ``installation``: an installation-wide permission, for what no product owns (creating
  products; uploading Device OS modules, which every product of the platform receives);
* ``listing``: a token holding the rule's scope on at least one product (or
  installation-wide); the endpoint lists only what the caller may see with that scope
  (``GET /v1/products``, ``GET /v1/device-os``);
* ``product``: the ``{product}`` path parameter names a product the caller belongs to
  (else 404, exactly as for a product that does not exist), and the caller holds the scope
  there (else 403);
* ``device``: the same for the product of the ``{device_id}`` path parameter (an unknown
  device and a device of a product the caller does not belong to look alike: 404).

The endpoint then reads :func:`~server.api.common.actor_of` (the actor bound to the product,
which the fleet service's own checks answer for) and :func:`~server.api.common.product_of`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.routing import Route

from otacore.errors import AuthError, NotFoundError, PermissionDeniedError
from server.api.common import fleet_of, token_from
from server.fleet import Actor, Permission
from server.fleet.base import unknown_device
from server.fleet.errors import UnknownProductError
from server.fleet.roles import PRODUCT_SCOPES
from server.store import ProductRecord

Kind = Literal["public", "token", "installation", "listing", "product", "device"]
Endpoint = Callable[[Request], Awaitable[Any]]

#: The longest product slug, and the largest product id SQLite can hold (2**63 - 1).
MAX_SLUG = 64
MAX_PRODUCT_ID = 2**63 - 1


@dataclass(frozen=True)
class Rule:
    """What a route needs: its kind (see the module docstring), the scope, and the action
    named in refusals."""

    kind: Kind
    action: str = ""
    scope: str | None = None
    permission: Permission | None = None

    def __post_init__(self) -> None:
        if self.kind in ("product", "device", "listing") and self.scope not in PRODUCT_SCOPES:
            raise ValueError(f"a {self.kind} rule needs a product scope, not {self.scope!r}")
        if self.kind == "installation" and self.permission is None:
            raise ValueError("an installation rule needs a permission")


PUBLIC = Rule("public")
ANY_TOKEN = Rule("token", "use its token")


def installation(permission: Permission, action: str) -> Rule:
    """An installation-wide permission (owner or administrator for ADMINISTER)."""
    return Rule("installation", action, permission=permission)


def listing(scope: str, action: str) -> Rule:
    """Any token; the endpoint filters by ``scope``."""
    return Rule("listing", action, scope)


def product(scope: str, action: str) -> Rule:
    """``scope`` on the product named by the ``{product}`` path parameter."""
    return Rule("product", action, scope)


def device(scope: str, action: str) -> Rule:
    """``scope`` on the product of the device named by the ``{device_id}`` path parameter."""
    return Rule("device", action, scope)


def route(path: str, endpoint: Endpoint, method: str, name: str, rule: Rule) -> Route:
    """A route whose endpoint runs only after ``rule`` allowed the request."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Any:
        await check(request, rule)
        return await endpoint(request)

    guarded.access_rule = rule  # type: ignore[attr-defined]
    return Route(path, guarded, methods=[method], name=name)


def rule_of(route_: Route) -> Rule | None:
    """The access rule a route was built with (None: built without :func:`route`)."""
    rule: Rule | None = getattr(route_.endpoint, "access_rule", None)
    return rule


async def authenticate(request: Request) -> Actor:
    """The actor behind the request's token (401 without a valid one)."""
    token = token_from(request)
    if token is None:
        raise AuthError(
            "an access token is required: send 'Authorization: Bearer TOKEN' or ?access_token=TOKEN"
        )
    return await fleet_of(request).authenticate(token)


async def check(request: Request, rule: Rule) -> None:
    """Enforce ``rule``; on success ``request.state`` holds ``actor`` (and ``product``)."""
    if rule.kind == "public":
        return
    actor = await authenticate(request)
    request.state.actor = actor
    if rule.kind == "token":
        return
    if rule.kind == "listing":
        refuse_unless_somewhere(actor, rule)
        return
    if rule.kind == "installation":
        assert rule.permission is not None
        actor.require(rule.permission, rule.action)
        return
    assert rule.scope is not None
    if rule.kind == "product":
        found = await product_for(request, actor, request.path_params["product"])
    else:
        found = await device_product_for(request, actor, request.path_params["device_id"])
    actor.require_scope(rule.scope, found.id, rule.action, found.slug)
    request.state.actor = actor.for_product(found.id)
    request.state.product = found


def product_ref(raw: str) -> int | str:
    """A ``{product}`` path value as a product id or slug; 404 for what can name neither (a
    number past SQLite's integers, a slug longer than slugs are)."""
    if raw.isascii() and raw.isdigit():
        if len(raw) > 19 or int(raw) > MAX_PRODUCT_ID:
            raise not_found(raw)
        return raw  # the store matches it as an id or as a slug
    if len(raw) > MAX_SLUG:
        raise not_found(raw)
    return raw


def not_found(ref: str) -> UnknownProductError:
    """One answer for "no such product" and "not your product" (nothing leaks)."""
    shown = ref if len(ref) <= 80 else ref[:77] + "..."
    return UnknownProductError(f"product {shown!r} not found (give its id or slug)")


async def product_for(request: Request, actor: Actor, raw: str) -> ProductRecord:
    """The product the path names, if the actor belongs to it (else 404)."""
    ref = product_ref(raw)
    try:
        found = await fleet_of(request).get_product_record(ref)
    except NotFoundError:
        raise not_found(raw) from None
    if not actor.belongs_to(found.id):
        raise not_found(raw)
    return found


async def device_product_for(request: Request, actor: Actor, device_id: str) -> ProductRecord:
    """The product of the device the path names, if the actor belongs to it (else 404)."""
    fleet = fleet_of(request)
    try:
        view = await fleet.target_for_device(device_id)
    except NotFoundError:
        raise unknown_device(device_id) from None
    if not actor.belongs_to(view.product.id):
        raise unknown_device(device_id)
    return view.product


def refuse_unless_somewhere(actor: Actor, rule: Rule) -> None:
    """For listings that need the scope on at least one product (403 otherwise)."""
    assert rule.scope is not None
    if not actor.holds_somewhere(rule.scope):
        raise PermissionDeniedError(
            f"this token may not {rule.action}: it holds scope {rule.scope!r} nowhere"
        )
