"""The console's error pages: HTML with the reason, the status of the error's class.

The statuses are the REST API's (``server.api.common.status_for``): an unknown product or
device is 404, a missing scope or a bad CSRF token 403, bad input 400, a conflict 409. A
page without a session redirects to the sign-in page instead.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from otacore.errors import OtaError
from server.api.common import body_unread, status_for
from server.console.session import SignInRequiredError, sign_in_redirect
from server.console.templating import render

log = logging.getLogger("ota.console")

_TITLES = {
    400: "Bad request",
    401: "Sign-in needed",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    413: "Too large",
    429: "Too many attempts",
    503: "Busy",
}


def error_page(request: Request, status: int, reason: str) -> Response:
    """An error page with ``status`` and the reason shown in an alert."""
    title = _TITLES.get(status, "Error")
    response = render(request, "error.html", {"status": status, "title": title,
                                              "reason": reason}, status_code=status)
    if status == 503:
        response.headers["Retry-After"] = "2"
    if body_unread(request):
        # Refused before its body was read (e.g. a 403 on an upload): the server drops the
        # connection, so say so (RFC 9112 section 9.6) or a browser reusing the connection
        # waits for an answer that never comes.
        response.headers["Connection"] = "close"
    return response


async def sign_in_required(request: Request, exc: Exception) -> Response:
    """No (valid) session: to the sign-in page, coming back here afterwards."""
    assert isinstance(exc, SignInRequiredError)
    return sign_in_redirect(request, exc)


async def ota_error_page(request: Request, exc: Exception) -> Response:
    """An ``OtaError``: its message, with the status the REST API gives it."""
    assert isinstance(exc, OtaError)
    status = status_for(exc)
    if status == 500:
        log.error("internal error on a console page: %s", exc, exc_info=exc)
        return error_page(request, 500, "internal error; see the server log")
    return error_page(request, status, str(exc))


async def http_error_page(request: Request, exc: Exception) -> Response:
    """Starlette's errors (unknown page, wrong method) as pages."""
    assert isinstance(exc, HTTPException)
    reason = str(exc.detail)
    if exc.status_code == 404:
        reason = f"there is no console page at {request.url.path}"
    return error_page(request, exc.status_code, reason)


async def internal_error_page(request: Request, exc: Exception) -> Response:
    """Anything unexpected: a generic page; the details go to the log."""
    log.error("unhandled error on a console page", exc_info=exc)
    return error_page(request, 500, "internal error; see the server log")
