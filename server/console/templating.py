"""Rendering console pages: Jinja2 (autoescaped) templates from ``templates/``.

Every page gets ``request``, ``base`` (the console's URL prefix, e.g. ``/console``), the
signed-in ``user`` (a :class:`~server.console.session.ConsoleUser`, or None), its
``csrf_token``, and the ``product`` the page is about (or None), besides its own context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.templating import Jinja2Templates

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"

#: Autoescaped: every value a page shows (device names, notes, event data) is text.
templates = Jinja2Templates(env=jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True, undefined=jinja2.Undefined,
))


def console_base(request: Request) -> str:
    """The console's URL prefix as the client sees it (``/console`` unless mounted under a
    proxy's root path)."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def query_string(params: dict[str, Any]) -> str:
    """``?a=1&b=2`` of the non-empty values (for paging and filter links); '' when none."""
    kept = {name: value for name, value in params.items() if value not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


templates.env.globals["query_string"] = query_string


def render(
    request: Request,
    template_name: str,
    context: dict[str, Any] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """The page ``template_name`` rendered with ``context`` and the console's common names."""
    user = getattr(request.state, "console_user", None)
    common: dict[str, Any] = {
        "base": console_base(request),
        "user": user,
        "csrf_token": user.csrf_token if user is not None else "",
        "product": getattr(request.state, "console_product", None),
    }
    common.update(context or {})
    response = templates.TemplateResponse(
        request, template_name, common, status_code=status_code
    )
    # Pages show fleet state as it is now and carry CSRF tokens: never cached or framed.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    return response
