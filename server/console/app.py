"""The console's ASGI app, mounted at ``/console`` by ``server.api.app``.

Its routes are the page modules' ``ROUTES`` lists (:data:`PAGE_ROUTES`); static assets
(htmx, the console's script and style sheet) are served from ``static/``. Errors become
HTML pages (:mod:`server.console.errors`), never the API's JSON: a page without a session
redirects to the sign-in page; ``OtaError`` subclasses show their message with the status
their class implies (404, 403, 400, ...); anything unexpected is logged and shown as a
generic 500 page.

The app is a router wrapped in Starlette's exception middleware, not a second Starlette
application, so ``request.app`` stays the API app: the fleet, its settings and the
sign-in throttle are the API's own.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import BaseRoute, Mount, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from otacore.errors import OtaError
from server.console import (
    device_list_pages,
    device_pages,
    errors,
    event_pages,
    firmware_pages,
    group_pages,
    live,
    products_pages,
    rollout_pages,
    session,
)
from server.console.templating import STATIC_DIR

#: One route list per page module (the firmware, rollout and event pages add theirs).
PAGE_ROUTES: list[list[BaseRoute]] = [
    session.ROUTES,
    products_pages.ROUTES,
    live.ROUTES,
    device_list_pages.ROUTES,
    device_pages.ROUTES,
    group_pages.ROUTES,
    firmware_pages.ROUTES,
    rollout_pages.ROUTES,
    event_pages.ROUTES,
]


def console_routes() -> list[BaseRoute]:
    """Every console route, static assets included."""
    routes: list[BaseRoute] = [
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    for page_routes in PAGE_ROUTES:
        routes.extend(page_routes)
    return routes


def create_console() -> ASGIApp:
    """The console app: its routes, with HTML error pages."""
    return ExceptionMiddleware(
        Router(routes=console_routes()),
        handlers={
            session.SignInRequiredError: errors.sign_in_required,
            OtaError: errors.ota_error_page,
            HTTPException: errors.http_error_page,
            Exception: errors.internal_error_page,
        },
    )
