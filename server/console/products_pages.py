"""``/console/``: the products the signed-in user may see, each with links to its pages."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.api.common import fleet_of
from server.console.session import console_user
from server.console.templating import render


async def products_index(request: Request) -> Response:
    """The products this user holds ``products:list`` on (as ``GET /v1/products``)."""
    user = await console_user(request)
    products = await fleet_of(request).list_products()
    visible = [p for p in products if "products:list" in user.actor.scopes_on(p.id)]
    return render(request, "products.html", {"products": visible, "nav": "products"})


ROUTES: list[BaseRoute] = [
    Route("/", products_index, methods=["GET"], name="products"),
]
