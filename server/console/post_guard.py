"""Access checks of console POSTs that are refused before their body is read.

A POST refused by :func:`~server.console.session.product_page` (403: no scope; 404: not the
user's product) leaves its body unread; the server then drops the connection, so the
refusal must say ``Connection: close`` (RFC 9112 section 9.6) or a browser reusing the
connection waits for an answer that never comes. The REST API's error handler does this
(``server.api.common.ota_error_handler``); the console's error pages do not yet, so the page
modules of this slice check their POSTs here.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from otacore.errors import OtaError
from server.api.common import status_for
from server.console.errors import error_page
from server.console.session import ConsoleUser, SignInRequiredError, product_page
from server.store import ProductRecord


def _body_unread(request: Request) -> bool:
    has_body = request.headers.get("content-length", "0") not in ("", "0") or (
        "transfer-encoding" in request.headers)
    return has_body and not getattr(request, "_stream_consumed", False)


async def product_post(request: Request, scope: str, action: str
                       ) -> tuple[ConsoleUser, ProductRecord] | Response:
    """:func:`product_page` for a POST: the user and product, or the refusal page (with
    ``Connection: close`` when the body was not read)."""
    try:
        return await product_page(request, scope, action)
    except SignInRequiredError:
        raise
    except OtaError as exc:
        response = error_page(request, status_for(exc), str(exc))
        if _body_unread(request):
            response.headers["Connection"] = "close"
        return response
