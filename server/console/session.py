"""Signing in to the console, the session cookie, CSRF, and the product access rules.

* ``GET/POST /console/login``: a ``username`` and ``password`` (the same fleet grant, sign-in
  throttle and sign-in log as ``POST /oauth/token``: ``server.api.auth.throttled_sign_in``),
  or an existing API ``token``. The console keeps the access token in an HttpOnly,
  SameSite=Strict cookie (Secure over https) and authenticates it again on every request
  (``Fleet.authenticate``), so revocation, a disabled account and role changes act at once.
* ``POST /console/logout``: revokes a token the console was issued at a password sign-in
  (a pasted API token is only forgotten: other clients may use it) and clears the cookie.
* CSRF: every POST form carries ``csrf_token``. Signed in, it is an HMAC of the session
  token (OWASP CSRF Prevention Cheat Sheet, "Synchronizer token"; the token is secret, so
  another site cannot compute it); on the sign-in form, a random value also set in a
  SameSite=Strict cookie ("double submit"), which stops login CSRF.
* :func:`product_page` applies the REST access rules (``server.api.access``) to the
  ``{product}`` of a page: not a member is 404 exactly like an unknown product; a member
  without the scope is 403.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from otacore.errors import AuthError, OtaError, PermissionDeniedError, ValidationError
from server.api.access import product_for
from server.api.auth import throttle_of, throttled_sign_in
from server.api.common import fleet_of, has_lone_surrogate, read_body, settings_of
from server.api.throttle import TooManyAttemptsError
from server.console.templating import console_base, render
from server.fleet import Actor
from server.fleet.auth import CredentialCheckBusyError, InvalidCredentialsError
from server.store import ProductRecord

#: The cookie holding the console's access token: ``p:TOKEN`` after a password sign-in (the
#: console's own token, revoked at sign-out), ``t:TOKEN`` for a pasted API token.
SESSION_COOKIE = "ota_console"
#: The sign-in form's double-submit CSRF cookie.
LOGIN_CSRF_COOKIE = "ota_console_login"
#: Lifetime of the token a password sign-in issues (a working day; sign in again after).
CONSOLE_TOKEN_SECONDS = 12 * 3600
#: Console forms are small; anything larger is refused (uploads use their own limit).
MAX_FORM_BYTES = 64 * 1024

_CSRF_CONTEXT = b"otacloud console csrf v1"


class SignInRequiredError(AuthError):
    """A console page was asked for without a (valid) session: the handler redirects to the
    sign-in page."""

    def __init__(self, message: str, next_path: str) -> None:
        super().__init__(message)
        self.next_path = next_path


class CsrfError(PermissionDeniedError):
    """A POST without the form's CSRF token (or with a stale one)."""


@dataclass(frozen=True)
class ConsoleUser:
    """The signed-in identity of one request: its actor (as ``Fleet.authenticate`` found it
    now; bound to the page's product by :func:`product_page`) and its CSRF token."""

    actor: Actor
    csrf_token: str
    #: True when the console issued the token at a password sign-in (revoked at sign-out).
    console_issued: bool

    @property
    def name(self) -> str:
        """What the page shows as the signed-in user."""
        return self.actor.subject


def csrf_for(token: str) -> str:
    """The CSRF token of a session: HMAC-SHA256 keyed by the session's access token."""
    return hmac.new(token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def session_token(request: Request) -> tuple[str, bool] | None:
    """(access token, issued by the console) from the session cookie, or None."""
    raw = request.cookies.get(SESSION_COOKIE, "")
    kind, _, token = raw.partition(":")
    if kind not in ("p", "t") or not token or len(token) > 200 or not token.isascii():
        return None
    return token, kind == "p"


def _here(request: Request) -> str:
    """The path and query of this request, for ``next``."""
    path = request.url.path
    return path + ("?" + request.url.query if request.url.query else "")


async def console_user(request: Request) -> ConsoleUser:
    """The signed-in user of this request; SignInRequiredError (a redirect to the sign-in
    page) without a valid session. Stored on ``request.state.console_user`` for the
    templates."""
    found = getattr(request.state, "console_user", None)
    if isinstance(found, ConsoleUser):
        return found
    session = session_token(request)
    if session is None:
        raise SignInRequiredError("sign in to use the console", _here(request))
    token, issued = session
    try:
        actor = await fleet_of(request).authenticate(token)
    except AuthError as exc:
        raise SignInRequiredError(f"your session ended: {exc}", _here(request)) from None
    user = ConsoleUser(actor, csrf_for(token), issued)
    request.state.console_user = user
    return user


async def product_page(
    request: Request, scope: str, action: str
) -> tuple[ConsoleUser, ProductRecord]:
    """The user and the product of a ``{product}`` page, by the REST rules: a product the
    user does not belong to is 404 like an unknown one; without ``scope`` there, 403
    (PermissionDeniedError naming ``action``). The returned user's actor is bound to the
    product (the fleet service's own checks then answer for it)."""
    user = await console_user(request)
    found = await product_for(request, user.actor, request.path_params["product"])
    request.state.console_product = found
    user.actor.require_scope(scope, found.id, action, found.slug)
    bound = ConsoleUser(user.actor.for_product(found.id), user.csrf_token, user.console_issued)
    request.state.console_user = bound
    return bound, found


async def read_form(request: Request) -> dict[str, Any]:
    """An urlencoded POST form as a dict (repeated names become lists), read under
    :data:`MAX_FORM_BYTES`; ValidationError for a body that is not UTF-8 urlencoded."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("application/x-www-form-urlencoded", ""):
        raise ValidationError(f"console forms are sent urlencoded, not as {media!r}")
    raw = await read_body(request, MAX_FORM_BYTES)
    try:
        pairs = parse_qsl(raw.decode(), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationError("the form is not valid urlencoded UTF-8") from exc
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            existing = fields[name]
            fields[name] = [*existing, value] if isinstance(existing, list) else [existing, value]
        else:
            fields[name] = value
    return fields


def check_csrf(request: Request, form: Mapping[str, Any] | FormData) -> None:
    """Refuse (CsrfError, 403) a POST whose ``csrf_token`` is not this session's."""
    user = getattr(request.state, "console_user", None)
    sent = form.get("csrf_token")
    if not isinstance(user, ConsoleUser) or not isinstance(sent, str) or not (
        hmac.compare_digest(sent.encode(), user.csrf_token.encode())
    ):
        raise CsrfError(
            "the form's security token is missing or stale; reload the page and try again"
        )


def safe_next(raw: object, base: str) -> str:
    """``raw`` if it is a local console path (no scheme, host, ``//`` or backslash: an open
    redirect otherwise), else the console's start page."""
    default = base + "/"
    if not isinstance(raw, str) or not raw or len(raw) > 2000 or has_lone_surrogate(raw):
        return default
    if not raw.startswith(base + "/") or raw.startswith("//") or "\\" in raw:
        return default
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        return default
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc:
        return default
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        return default  # would leave the console once the browser resolves it
    return raw


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _login_page(request: Request, *, error: str = "", username: str = "", next_path: str = "",
                status_code: int = 200) -> Response:
    login_csrf = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not (len(login_csrf) == 43 and login_csrf.replace("-", "").replace("_", "").isalnum()):
        login_csrf = secrets.token_urlsafe(32)
    response = render(request, "login.html", {
        "error": error, "username": username, "next": next_path, "login_csrf": login_csrf,
    }, status_code=status_code)
    response.set_cookie(LOGIN_CSRF_COOKIE, login_csrf, httponly=True, samesite="strict",
                        secure=_secure(request), path=console_base(request) + "/")
    return response


async def login_form(request: Request) -> Response:
    """The sign-in page (an already signed-in user goes on to ``next``)."""
    base = console_base(request)
    next_path = safe_next(request.query_params.get("next"), base)
    session = session_token(request)
    if session is not None:
        try:
            await fleet_of(request).authenticate(session[0])
        except AuthError:
            pass
        else:
            return RedirectResponse(next_path, status_code=303)
    return _login_page(request, next_path=next_path)


def _text_field(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise ValidationError(f"give {name} once")
    return value


async def login(request: Request) -> Response:
    """Sign in with a username and password, or with an access token."""
    base = console_base(request)
    form = await read_form(request)
    next_path = safe_next(form.get("next"), base)
    sent_csrf, cookie_csrf = form.get("login_csrf"), request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not (isinstance(sent_csrf, str) and cookie_csrf
            and hmac.compare_digest(sent_csrf.encode(), cookie_csrf.encode())):
        return _login_page(request, next_path=next_path, status_code=403, error=(
            "the sign-in form expired or came from another site; sign in again on this page"))
    username = _text_field(form, "username").strip()
    password = _text_field(form, "password")
    pasted = _text_field(form, "token").strip()
    fleet = fleet_of(request)
    try:
        if pasted and (username or password):
            raise ValidationError("give a username and password, or an access token, not both")
        if pasted:
            await fleet.authenticate(pasted)
            token, issued = pasted, False
        elif username and password:
            settings = settings_of(request)
            grant = await throttled_sign_in(
                request, throttle_of(request).account("user", username),
                lambda familiar: fleet.password_grant(
                    username, password, expires_in=CONSOLE_TOKEN_SECONDS,
                    refresh_seconds=settings.refresh_token_seconds, familiar=familiar),
            )
            token, issued = grant.access_token, True
        else:
            raise ValidationError("give your username and password, or an access token")
    except TooManyAttemptsError as exc:
        return _login_page(request, error=str(exc), username=username, next_path=next_path,
                           status_code=429)
    except CredentialCheckBusyError as exc:
        return _login_page(request, error=str(exc), username=username, next_path=next_path,
                           status_code=503)
    except InvalidCredentialsError:
        return _login_page(request, error="the username or password is wrong",
                           username=username, next_path=next_path, status_code=401)
    except OtaError as exc:  # a malformed field, a revoked token, a disabled account
        status = 401 if isinstance(exc, AuthError) else 400
        return _login_page(request, error=str(exc), username=username, next_path=next_path,
                           status_code=status)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, ("p:" if issued else "t:") + token, httponly=True,
                        samesite="strict", secure=_secure(request), path=base + "/")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=base + "/")
    return response


async def logout(request: Request) -> Response:
    """Sign out: revoke the console's own token, forget the cookie, back to sign-in."""
    base = console_base(request)
    user = await console_user(request)
    check_csrf(request, await read_form(request))
    if user.console_issued:
        await fleet_of(request).revoke_token(user.actor)
    response = RedirectResponse(base + "/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=base + "/", httponly=True, samesite="strict",
                           secure=_secure(request))
    return response


def sign_in_redirect(request: Request, exc: SignInRequiredError) -> Response:
    """Where an unauthenticated page request goes: the sign-in page with ``next``. An htmx
    fragment request gets ``HX-Redirect`` (a whole-page redirect) instead."""
    base = console_base(request)
    target = f"{base}/login?next={quote(safe_next(exc.next_path, base), safe='/')}"
    if request.headers.get("hx-request") == "true":
        response: Response = Response(status_code=401, headers={"HX-Redirect": target})
    else:
        response = RedirectResponse(target, status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        response.delete_cookie(SESSION_COOKIE, path=base + "/")
    return response


ROUTES: list[BaseRoute] = [
    Route("/login", login_form, methods=["GET"], name="login_form"),
    Route("/login", login, methods=["POST"], name="login"),
    Route("/logout", logout, methods=["POST"], name="logout"),
]
