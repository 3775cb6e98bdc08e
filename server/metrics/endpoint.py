"""``GET /metrics`` on the API port, who may scrape it, and the count of API requests.

Metrics tell fleet sizes and traffic, so by default a scrape needs either the token of an
installation owner or administrator (``Authorization: Bearer``, as every API call), or the
dedicated scrape token held in ``metrics.token_file`` (``--metrics-token-file``), which
Prometheus sends from its own copy (``authorization: credentials_file``). The file is read
again whenever it changes, so the token can be rotated without a restart. An operator can
open the endpoint to anyone who reaches the API port (``--metrics-public``), for a private
network.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otacore.errors import AuthError, ValidationError
from server.api.access import authenticate
from server.api.common import settings_of, token_from
from server.fleet import Permission
from server.metrics import HTTP_REQUESTS
from server.metrics.aggregate import exposition

log = logging.getLogger("ota.api")

#: The shortest scrape token accepted (a guessable one would expose the fleet's figures).
MIN_TOKEN_CHARS = 16
#: The route label of a request no route matched (a bounded value, never the raw path).
UNMATCHED = "unmatched"


class ScrapeTokenError(ValidationError):
    """The scrape token file cannot be used (missing, unreadable, empty or too short)."""


@dataclass
class ScrapeToken:
    """The token in ``path``, read again when the file's size or modification time
    changed (checked at each scrape that presents a token)."""

    path: Path
    _token: bytes = b""
    _stamp: tuple[int, int] | None = None
    #: The last problem logged (logged again only when it changes).
    _logged: str | None = None

    def current(self) -> bytes:
        """The token now (ScrapeTokenError when the file cannot be used)."""
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise ScrapeTokenError(f"cannot read the metrics token file {self.path}: "
                                   f"{exc.strerror}") from None
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            self._token = _read_token(self.path)
            self._stamp = stamp
        return self._token

    def usable(self) -> bytes | None:
        """The token now, or None when the file became unusable since the start (logged
        once per problem; owner and administrator tokens still scrape meanwhile)."""
        try:
            token = self.current()
        except ScrapeTokenError as exc:
            if str(exc) != self._logged:
                log.error("metrics scrapes with the token file are refused: %s", exc)
                self._logged = str(exc)
            return None
        self._logged = None
        return token


def _read_token(path: Path) -> bytes:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ScrapeTokenError(f"cannot read the metrics token file {path}: "
                               f"{exc.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        # A shared secret every user of the machine could read (or replace) is none.
        access = "readable" if mode & stat.S_IROTH else "writable"
        raise ScrapeTokenError(
            f"the metrics token file {path} is {access} by every user of this machine "
            f"(mode {mode:04o}): chmod 600 {path} (or 640 with a group of the server's user)")
    try:
        text = path.read_bytes().strip()
    except OSError as exc:
        raise ScrapeTokenError(f"cannot read the metrics token file {path}: "
                               f"{exc.strerror}") from None
    if b"\n" in text or len(text) < MIN_TOKEN_CHARS:
        raise ScrapeTokenError(
            f"the metrics token file {path} must hold one token of at least "
            f"{MIN_TOKEN_CHARS} characters on one line (e.g. (umask 077; openssl rand -hex 32 > "
            f"{path}))")
    return text


def scrape_token_of(token_file: str | None) -> ScrapeToken | None:
    """The scrape token a server start was given, checked now: a server must not start
    with a token file it cannot use (ScrapeTokenError)."""
    if token_file is None:
        return None
    token = ScrapeToken(Path(token_file))
    token.current()
    return token


async def check_scraper(request: Request) -> None:
    """Let the request scrape, or raise AuthError (401: no or an unknown token) or
    PermissionDeniedError (403: a valid token of a role that may not)."""
    settings = settings_of(request)
    if settings.metrics_public:
        return
    scrape: ScrapeToken | None = request.app.state.scrape_token
    presented = token_from(request)
    if presented is None:
        raise AuthError("/metrics needs a token: 'Authorization: Bearer TOKEN' with the "
                        "metrics token file's token or an owner's or administrator's token")
    expected = scrape.usable() if scrape is not None else None
    if expected is not None and hmac.compare_digest(presented.encode(), expected):
        return  # compared in constant time: the scrape token is a shared secret
    actor = await authenticate(request)
    actor.require(Permission.ADMINISTER, "read the metrics")


async def metrics(request: Request) -> Response:
    """The installation's metrics (Prometheus text format, or OpenMetrics if asked)."""
    await check_scraper(request)
    worker_dir: Path | None = request.app.state.worker_metrics_dir
    body, content_type = await trio.to_thread.run_sync(
        exposition, worker_dir, request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


#: The route (``create_app`` adds it beside the Particle API's table).
#: Prometheus' exposition format, not the REST API's JSON: out of the OpenAPI document.
METRICS_ROUTE = Route("/metrics", metrics, methods=["GET"], name="metrics",
                      include_in_schema=False)


class RequestCountMiddleware:
    """Counts every answered HTTP request in ``ota_http_requests_total`` by the name of its
    route (the path template when a route has no name; ``unmatched`` when none matched) and
    its status, when the response starts (an event stream counts as it opens). A request
    whose handler raised before answering counts as 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass one request on and count its answer."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = False

        async def counting_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                HTTP_REQUESTS.labels(route_label(scope), str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not answered:
                HTTP_REQUESTS.labels(route_label(scope), "500").inc()
            raise


def route_label(scope: Scope) -> str:
    """The bounded name of the route that served ``scope``: its name, else its path
    template; ``unmatched`` when no route took it (or only by path, with another method)."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED
    methods = getattr(route, "methods", None)
    if methods is not None and scope.get("method") not in methods:
        return UNMATCHED  # matched by path only: a 405
    name = getattr(route, "name", None)
    return str(name or getattr(route, "path", None) or UNMATCHED)
