"""Roles, API scopes and the acting identity behind every request.

Who may do what is decided per product:

* An installation role (``users.role``, or the role of an admin token / OAuth client) applies
  to every product. Owner and administrator hold everything, including what no product owns
  (creating products, Device OS modules, users). Developer, support and viewer installation
  roles are the installation-wide roles accounts had before product teams existed; they keep
  them. ``none`` grants nothing by itself: such a user reaches only the products whose team
  it belongs to.
* A product team membership gives a user a role (administrator, developer, support, viewer)
  on that one product.
* An API user (Particle's programmatic user) belongs to exactly one product and holds exactly
  the scopes it was created with there, whatever its role would be.

Scopes carry Particle's names (``devices:list``, ``firmware:release``, ``teams.users:invite``
...; Particle docs, "API users"); every route needs one (see ``server.api.access``). A role is a
set of scopes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from otacore.errors import PermissionDeniedError, ValidationError


class Role(StrEnum):
    """Team roles, as Particle names them, plus ``none`` (no installation-wide access)."""

    OWNER = "owner"
    ADMINISTRATOR = "administrator"
    DEVELOPER = "developer"
    SUPPORT = "support"
    VIEWER = "viewer"
    NONE = "none"


#: Roles a product team membership can carry (ownership is installation-wide only).
TEAM_ROLES = (Role.ADMINISTRATOR, Role.DEVELOPER, Role.SUPPORT, Role.VIEWER)

#: Particle's display names of the team roles.
ROLE_TITLES = {
    Role.OWNER: "Owner",
    Role.ADMINISTRATOR: "Administrator",
    Role.DEVELOPER: "Developer",
    Role.SUPPORT: "Support",
    Role.VIEWER: "View-only",
    Role.NONE: "None",
}


class Permission(StrEnum):
    """Coarse permissions the fleet service checks (the API checks the exact scope first)."""

    READ = "read"
    #: Upload, release, lock, flash, edit devices and groups, publish events
    #: ("sender verification": only roles that may manage devices).
    MANAGE_DEVICES = "manage devices and firmware"
    #: Create products, users, OAuth clients, API tokens, Device OS modules (installation-wide).
    ADMINISTER = "administer products and users"


# --- scopes (Particle's names; ``products:update`` is this server's own) ----------------------

READ_SCOPES = frozenset({
    "products:list", "products:get",
    "devices:list", "devices:get",
    "firmware:list", "firmware:get", "firmware.binary:get",
    "groups:list", "groups:get",
    "events:get",
    "teams.users:list",
})
WRITE_SCOPES = frozenset({
    "products:update",
    "devices:import", "devices:update", "devices:remove",
    "firmware:create", "firmware:update", "firmware:remove", "firmware:release",
    "groups:create", "groups:update", "groups:remove",
    "events:send",
})
TEAM_ADMIN_SCOPES = frozenset({"teams.users:invite", "teams.users:update", "teams.users:remove"})
#: Reading a product's audit log (this server's own scope; Particle has no audit API): who
#: did what, with user names and token subjects, so owners and administrators only (an API
#: user may be given it explicitly).
AUDIT_SCOPE = "audit:list"
ADMIN_READ_SCOPES = frozenset({AUDIT_SCOPE})
#: Every scope a product grants (what an API user may be given).
PRODUCT_SCOPES = READ_SCOPES | WRITE_SCOPES | TEAM_ADMIN_SCOPES | ADMIN_READ_SCOPES

ROLE_SCOPES: dict[Role, frozenset[str]] = {
    Role.OWNER: PRODUCT_SCOPES,
    Role.ADMINISTRATOR: PRODUCT_SCOPES,
    Role.DEVELOPER: READ_SCOPES | WRITE_SCOPES,
    Role.SUPPORT: READ_SCOPES,
    Role.VIEWER: READ_SCOPES,
    Role.NONE: frozenset(),
}

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.OWNER: frozenset(Permission),
    Role.ADMINISTRATOR: frozenset(Permission),
    Role.DEVELOPER: frozenset({Permission.READ, Permission.MANAGE_DEVICES}),
    Role.SUPPORT: frozenset({Permission.READ}),
    Role.VIEWER: frozenset({Permission.READ}),
    Role.NONE: frozenset(),
}


def parse_role(value: object) -> Role:
    """A Role from its name, or a ValidationError listing the valid ones."""
    try:
        return Role(str(value).lower())
    except ValueError:
        names = ", ".join(role.value for role in Role)
        raise ValidationError(f"unknown role {value!r}; use one of: {names}") from None


def parse_team_role(value: object) -> Role:
    """A role a product team member can hold (administrator, developer, support, viewer)."""
    if isinstance(value, str) and value.strip().lower() == "view-only":  # Particle's title
        return Role.VIEWER
    role = parse_role(value)
    if role not in TEAM_ROLES:
        names = ", ".join(r.value for r in TEAM_ROLES)
        raise ValidationError(f"a product team role must be one of: {names} (not {role.value})")
    return role


def parse_scopes(value: object) -> frozenset[str]:
    """A non-empty list of known product scopes (a JSON array or a comma-separated string)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ValidationError("scopes must be a non-empty list of scope names, e.g. "
                              '["devices:list", "firmware:get"]')
    unknown = sorted(set(value) - PRODUCT_SCOPES)
    if unknown:
        raise ValidationError(
            f"unknown scope(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(sorted(PRODUCT_SCOPES))}"
        )
    return frozenset(value)


def roles_with(permission: Permission) -> list[Role]:
    """Roles that hold ``permission``."""
    return [role for role, held in ROLE_PERMISSIONS.items() if permission in held]


def roles_with_scope(scope: str) -> list[Role]:
    """Roles whose scope set contains ``scope``."""
    return [role for role, held in ROLE_SCOPES.items() if scope in held]


@dataclass(frozen=True)
class Actor:
    """Who is acting and what the token grants.

    ``subject`` goes into the audit log. ``role`` is the installation role; ``memberships``
    the (product id, team role) pairs read from the store when the token was checked; an API
    user has ``api_product_id`` and ``api_scopes`` instead. ``product_id`` is set (by
    :meth:`for_product`) once the API has checked the request's product, and then the coarse
    :meth:`can` checks of the fleet service answer for that product.
    """

    subject: str
    role: Role
    token_hash: str | None = None
    memberships: tuple[tuple[int, Role], ...] = ()
    api_product_id: int | None = None
    api_scopes: frozenset[str] = frozenset()
    product_id: int | None = None
    user_id: int | None = None
    client_id: str | None = None

    @property
    def is_api_user(self) -> bool:
        """True for an API user's token (one product, explicit scopes)."""
        return self.api_product_id is not None

    def scopes_on(self, product_id: int) -> frozenset[str]:
        """Every scope this identity holds on a product (empty: not its product)."""
        if self.is_api_user:
            return self.api_scopes if product_id == self.api_product_id else frozenset()
        scopes = ROLE_SCOPES[self.role]
        for member_of, team_role in self.memberships:
            if member_of == product_id:
                scopes = scopes | ROLE_SCOPES[team_role]
        return scopes

    def belongs_to(self, product_id: int) -> bool:
        """True when the identity holds anything on the product (else it must look absent)."""
        return bool(self.scopes_on(product_id))

    def holds_somewhere(self, scope: str) -> bool:
        """True when ``scope`` is held installation-wide or on at least one product."""
        if self.is_api_user:
            return scope in self.api_scopes
        return scope in ROLE_SCOPES[self.role] or any(
            scope in ROLE_SCOPES[team_role] for _, team_role in self.memberships
        )

    def holds_installation_wide(self, scope: str) -> bool:
        """True when the installation role (not a team, not an API user) grants ``scope``
        on every product."""
        return not self.is_api_user and scope in ROLE_SCOPES[self.role]

    def for_product(self, product_id: int) -> Actor:
        """This actor bound to one product (after the API checked the request's scope)."""
        return replace(self, product_id=product_id)

    def require_scope(self, scope: str, product_id: int, action: str, product: str) -> None:
        """Raise PermissionDeniedError unless ``scope`` is held on the product."""
        if scope in self.scopes_on(product_id):
            return
        if self.is_api_user:
            raise PermissionDeniedError(
                f"this API user may not {action}: its token lacks scope {scope!r} on product "
                f"{product}; a product administrator can add it "
                f"(PUT /v1/products/{product}/team/{self.subject} with the scopes)"
            )
        allowed = ", ".join(role.value for role in roles_with_scope(scope))
        held = [] if self.role is Role.NONE else [f"the {self.role.value} role"]
        team_role = dict(self.memberships).get(product_id)
        if team_role is not None:
            held.append(f"the {team_role.value} {'team ' if held else ''}role")
        raise PermissionDeniedError(
            f"{' and '.join(held) or 'this token'} may not {action} on product {product} "
            f"(scope {scope!r}); it needs one of: {allowed}"
        )

    def can(self, permission: Permission) -> bool:
        """True when the identity holds ``permission`` (on its bound product, if any)."""
        if permission is Permission.ADMINISTER or self.product_id is None:
            if self.is_api_user:
                return False
            return permission in ROLE_PERMISSIONS[self.role]
        scopes = self.scopes_on(self.product_id)
        if permission is Permission.READ:
            return bool(scopes)
        return bool(scopes & WRITE_SCOPES)

    def require(self, permission: Permission, action: str) -> None:
        """Raise PermissionDeniedError unless the identity holds ``permission``."""
        if not self.can(permission):
            if self.is_api_user:
                raise PermissionDeniedError(f"an API user may not {action}")
            allowed = ", ".join(
                role.value for role in roles_with(permission) if role is not Role.NONE
            )
            raise PermissionDeniedError(
                f"the {self.role.value} role may not {action}; it needs one of: {allowed}"
            )


#: The actor of commands run directly on the store by an operator with file access (CLI).
SYSTEM_ACTOR = Actor("system", Role.OWNER)
