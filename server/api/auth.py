"""Token endpoints: ``POST /oauth/token`` (RFC 6749) and access-token introspection/revocation.

Password and client-secret checks are throttled per client address group and per account
(``server.api.throttle``): past a limit, ``/oauth/token`` answers 429 with Retry-After
before any password is hashed. Failures, lockouts and refusals are logged (aggregated) and
lockouts audited (``server.api.sign_in_log``). The client address is the TCP peer's (behind
a reverse proxy that is the proxy: give each proxy its own limits or put the limit there).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import AuthError, ValidationError
from server.api.common import ApiSettings, actor_of, body_fields, fleet_of, ok, settings_of
from server.api.sign_in_log import SignInLog, audit_lockout
from server.api.throttle import Attempt, LoginThrottle, ThrottleLimits, TooManyAttemptsError
from server.fleet import Fleet, TokenGrant
from server.fleet.auth import (
    DEFAULT_TOKEN_SECONDS,
    CredentialCheckBusyError,
    InvalidCredentialsError,
)


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    """Client id and secret from HTTP Basic auth (RFC 6749 section 2.3.1)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise AuthError("the Basic authorization header is malformed") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise AuthError("the Basic authorization header needs client_id:client_secret")
    return client_id, secret


def _grant_json(grant: TokenGrant) -> dict[str, object]:
    body: dict[str, object] = {
        "token_type": grant.token_type,
        "access_token": grant.access_token,
        "expires_in": grant.expires_in,
        "role": grant.role.value,
    }
    if grant.refresh_token is not None:
        body["refresh_token"] = grant.refresh_token
    return body


def _oauth_error(
    status: int, code: str, description: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    # RFC 6749 section 5.2 error fields, plus this API's ok/error pair.
    return JSONResponse(
        {"ok": False, "error": code, "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def throttle_of(request: Request) -> LoginThrottle:
    """The app's failed sign-in counters."""
    throttle: LoginThrottle = request.app.state.login_throttle
    return throttle


def sign_in_log_of(request: Request) -> SignInLog:
    """The app's sign-in log (aggregated lines about failures and lockouts)."""
    sign_in_log: SignInLog = request.app.state.sign_in_log
    return sign_in_log


def install(state: State, settings: ApiSettings) -> None:
    """Give an app (its ``state``) the sign-in throttle and log that ``settings`` describe."""
    state.login_throttle = LoginThrottle(ThrottleLimits(
        max_failures_per_address=settings.login_max_failures_per_address,
        max_failures_per_user=settings.login_max_failures_per_user,
        lockout_seconds=settings.login_lockout_seconds,
        first_account_lockout_seconds=settings.login_first_account_lockout_seconds,
        max_checks_per_address=settings.login_max_checks_per_address,
        familiar_addresses=settings.login_familiar_addresses,
        max_keys=settings.login_tracked_keys,
        ipv6_prefix_length=settings.ipv6_prefix_length,
    ))
    state.sign_in_log = SignInLog(settings.login_log_interval)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """While the app runs: the task that writes the sign-in log's summaries."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.state.sign_in_log.run)
        yield
        nursery.cancel_scope.cancel()


def _client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


async def throttled_sign_in(
    request: Request,
    account: tuple[str, str] | None,
    check: Callable[[bool], Awaitable[TokenGrant]],
) -> TokenGrant:
    """Run one credential check (``check(familiar)``) behind the sign-in throttle and log:
    refused before any hashing while the client's address group or ``account`` is locked
    (TooManyAttemptsError, logged), failures counted and lockouts logged and audited
    (InvalidCredentialsError re-raised), anything else leaves the attempt uncounted.
    ``/oauth/token`` and the console's sign-in both go through here, so neither is a way
    around the other's limits."""
    fleet, throttle, sign_in_log = fleet_of(request), throttle_of(request), sign_in_log_of(request)
    host = _client_address(request)
    try:
        attempt = throttle.begin(host, account, trio.current_time())
    except TooManyAttemptsError as exc:
        sign_in_log.refused(trio.current_time(), exc, throttle.group_of(host))
        raise
    try:
        grant = await check(attempt.familiar)
    except InvalidCredentialsError:
        await _failed(fleet, throttle, sign_in_log, attempt)
        raise
    except CredentialCheckBusyError:
        throttle.abandoned(attempt, trio.current_time())
        sign_in_log.busy(trio.current_time(), attempt.group)
        raise
    except BaseException:  # e.g. a disabled account, a malformed field, a cancellation
        throttle.abandoned(attempt, trio.current_time())
        raise
    throttle.succeeded(attempt, trio.current_time())
    return grant


async def token(request: Request) -> Response:
    """Issue a token: grant_type password, client_credentials or refresh_token."""
    try:
        fields = await body_fields(request)
    except ValidationError as exc:
        return _oauth_error(400, "invalid_request", str(exc))
    grant_type = fields.get("grant_type")
    expires_in = fields.get("expires_in", DEFAULT_TOKEN_SECONDS)
    fleet, settings, throttle = fleet_of(request), settings_of(request), throttle_of(request)
    try:
        if grant_type == "password":
            username = fields.get("username")
            grant = await throttled_sign_in(
                request, throttle.account("user", username),
                lambda familiar: fleet.password_grant(
                    username, fields.get("password"), expires_in=expires_in,
                    refresh_seconds=settings.refresh_token_seconds, familiar=familiar,
                ),
            )
        elif grant_type == "client_credentials":
            basic = _basic_credentials(request)
            client_id, secret = basic or (fields.get("client_id"), fields.get("client_secret"))
            grant = await throttled_sign_in(
                request, throttle.account("client", client_id),
                lambda familiar: fleet.client_credentials_grant(
                    client_id, secret, expires_in=expires_in, familiar=familiar),
            )
        elif grant_type == "refresh_token":
            grant = await fleet.refresh_grant(
                fields.get("refresh_token"), expires_in=expires_in,
                refresh_seconds=settings.refresh_token_seconds,
            )
        else:
            return _oauth_error(
                400,
                "unsupported_grant_type",
                "grant_type must be password, client_credentials or refresh_token",
            )
    except TooManyAttemptsError as exc:
        return _oauth_error(429, "too_many_requests", str(exc),
                            {"Retry-After": str(exc.retry_after)})
    except InvalidCredentialsError as exc:
        return _credentials_error(grant_type, str(exc))
    except CredentialCheckBusyError as exc:
        return _oauth_error(503, "temporarily_unavailable", str(exc), {"Retry-After": "2"})
    except ValidationError as exc:
        return _oauth_error(400, "invalid_request", str(exc))
    except AuthError as exc:  # e.g. a disabled account, an expired refresh token
        return _credentials_error(grant_type, str(exc))
    return JSONResponse(_grant_json(grant), headers={"Cache-Control": "no-store"})


async def _failed(fleet: Fleet, throttle: LoginThrottle, sign_in_log: SignInLog,
                  attempt: Attempt) -> None:
    """Count a failed attempt; log (aggregated) and audit the lockouts it causes."""
    now = trio.current_time()
    lockouts = throttle.failed(attempt, now)
    sign_in_log.failed(now, attempt)
    for lockout in lockouts:
        sign_in_log.locked(now, lockout)
        if lockout.first:
            await audit_lockout(fleet, lockout)


def _credentials_error(grant_type: object, message: str) -> Response:
    if grant_type == "client_credentials":
        return _oauth_error(401, "invalid_client", message)
    return _oauth_error(400, "invalid_grant", message)


async def current_token(request: Request) -> Response:
    """Describe the token this request authenticated with."""
    actor = actor_of(request)
    return JSONResponse({"ok": True, "subject": actor.subject, "role": actor.role.value})


async def revoke_current_token(request: Request) -> Response:
    """Revoke the token this request authenticated with (and its refresh partner)."""
    await fleet_of(request).revoke_token(actor_of(request))
    return ok()
