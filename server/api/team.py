"""Product team endpoints: ``/v1/products/:product/team[/:username]`` (Particle's paths).

* ``GET`` lists people (``{"username", "role": {"id", "name"}}``) and API users
  (``{"username", "friendly_name", "scopes", "is_programmatic": true, "product_id"}``) as
  ``{"ok": true, "team": [...]}`` (particle-api-js ``listTeamMembers``).
* ``POST {username[, role]}`` invites an existing account (``inviteTeamMember``); ``POST
  {friendly_name, scopes}`` creates an API user and answers ``{"ok": true, "created":
  {"username", "is_programmatic": true, "tokens": [{"token"}] ...}}`` (Particle docs, "API
  users").
* ``PUT /:username`` changes a person's ``role``, or an API user's ``friendly_name`` and
  ``scopes`` (with a new token in ``updated.tokens``: the old one stops working).
* ``DELETE /:username`` takes a person off the team or deletes an API user
  (``removeTeamMember``): 204.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import ValidationError
from server.api.common import actor_of, body_fields, fleet_of, product_of
from server.api.serialize import iso
from server.fleet import ApiUserGrant, TeamMember
from server.fleet.roles import ROLE_TITLES, Role


def member_json(member: TeamMember) -> dict[str, Any]:
    """A team entry in Particle's shape."""
    if member.api_user is not None:
        return {
            "username": member.user.username,
            "friendly_name": member.api_user.friendly_name,
            "scopes": list(member.api_user.scopes),
            "is_programmatic": True,
            "product_id": member.api_user.product_id,
            "created_at": iso(member.api_user.created_at),
        }
    assert member.member is not None
    role = Role(member.member.role)
    return {
        "username": member.user.username,
        "role": {"id": role.value, "name": ROLE_TITLES[role]},
        "is_programmatic": False,
        "disabled": member.user.disabled,
        "invited_by": member.member.invited_by,
        "created_at": iso(member.member.created_at),
    }


def api_user_json(grant: ApiUserGrant) -> dict[str, Any]:
    """A created or updated API user with its token (shown once)."""
    return {
        "username": grant.username,
        "friendly_name": grant.api_user.friendly_name,
        "scopes": list(grant.api_user.scopes),
        "is_programmatic": True,
        "product_id": grant.api_user.product_id,
        "tokens": [{"token": grant.token}],
    }


async def list_team(request: Request) -> Response:
    """List the product's team: people and API users."""
    members = await fleet_of(request).list_team(actor_of(request), product_of(request).id)
    return JSONResponse({"ok": True, "team": [member_json(m) for m in members]})


async def add_to_team(request: Request) -> Response:
    """Invite an existing user ({username, role}) or create an API user ({friendly_name,
    scopes}, answered with its token)."""
    fields = await body_fields(request)
    fleet, actor, product = fleet_of(request), actor_of(request), product_of(request)
    if "username" in fields:
        unknown = sorted(set(fields) - {"username", "role"})
        if unknown:
            raise ValidationError(f"unknown field(s) {', '.join(unknown)}; give username, role")
        member = await fleet.invite_member(actor, product.id, fields["username"],
                                           fields.get("role"))
        return JSONResponse({"ok": True, "invited": member_json(member)})
    if "friendly_name" in fields or "scopes" in fields:
        unknown = sorted(set(fields) - {"friendly_name", "scopes"})
        if unknown:
            raise ValidationError(
                f"unknown field(s) {', '.join(unknown)}; give friendly_name, scopes"
            )
        grant = await fleet.create_api_user(actor, product.id, fields.get("friendly_name"),
                                            fields.get("scopes"))
        return JSONResponse({"ok": True, "created": api_user_json(grant)}, status_code=201)
    raise ValidationError(
        "give {username, role} to invite an existing user, or {friendly_name, scopes} to "
        "create an API user"
    )


async def update_team_member(request: Request) -> Response:
    """Change a person's role ({role}) or an API user's {friendly_name, scopes} (new token)."""
    fields = await body_fields(request)
    updated = await fleet_of(request).update_member(
        actor_of(request), product_of(request).id, request.path_params["username"], fields
    )
    if isinstance(updated, ApiUserGrant):
        return JSONResponse({"ok": True, "updated": api_user_json(updated)})
    return JSONResponse({"ok": True, "updated": member_json(updated)})


async def remove_team_member(request: Request) -> Response:
    """Take a user off the team, or delete an API user and its token."""
    await fleet_of(request).remove_member(
        actor_of(request), product_of(request).id, request.path_params["username"]
    )
    return Response(status_code=204)
