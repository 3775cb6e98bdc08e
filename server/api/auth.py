"""Token endpoints: ``POST /oauth/token`` (RFC 6749) and access-token introspection/revocation."""

from __future__ import annotations

import base64
import binascii

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import AuthError, ValidationError
from server.api.common import body_fields, fleet_of, ok, require
from server.fleet import Permission, TokenGrant
from server.fleet.auth import DEFAULT_TOKEN_SECONDS


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


def _oauth_error(status: int, code: str, description: str) -> JSONResponse:
    # RFC 6749 section 5.2 error fields, plus this API's ok/error pair.
    return JSONResponse(
        {"ok": False, "error": code, "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


async def token(request: Request) -> Response:
    """Issue a token: grant_type password, client_credentials or refresh_token."""
    try:
        fields = await body_fields(request)
    except ValidationError as exc:
        return _oauth_error(400, "invalid_request", str(exc))
    grant_type = fields.get("grant_type")
    expires_in = fields.get("expires_in", DEFAULT_TOKEN_SECONDS)
    fleet = fleet_of(request)
    try:
        if grant_type == "password":
            grant = await fleet.password_grant(
                fields.get("username"), fields.get("password"), expires_in=expires_in
            )
        elif grant_type == "client_credentials":
            basic = _basic_credentials(request)
            client_id, secret = basic or (fields.get("client_id"), fields.get("client_secret"))
            grant = await fleet.client_credentials_grant(client_id, secret, expires_in=expires_in)
        elif grant_type == "refresh_token":
            grant = await fleet.refresh_grant(fields.get("refresh_token"), expires_in=expires_in)
        else:
            return _oauth_error(
                400,
                "unsupported_grant_type",
                "grant_type must be password, client_credentials or refresh_token",
            )
    except AuthError as exc:
        status = 401 if grant_type == "client_credentials" else 400
        code = "invalid_client" if grant_type == "client_credentials" else "invalid_grant"
        return _oauth_error(status, code, str(exc))
    except ValidationError as exc:
        return _oauth_error(400, "invalid_request", str(exc))
    return JSONResponse(_grant_json(grant), headers={"Cache-Control": "no-store"})


async def current_token(request: Request) -> Response:
    """Describe the token this request authenticated with."""
    actor = await require(request, Permission.READ, "read its token")
    return JSONResponse({"ok": True, "subject": actor.subject, "role": actor.role.value})


async def revoke_current_token(request: Request) -> Response:
    """Revoke the token this request authenticated with (and its refresh token)."""
    actor = await require(request, Permission.READ, "revoke its token")
    await fleet_of(request).revoke_token(actor)
    return ok()
