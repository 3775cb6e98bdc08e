"""Roles, permissions and the acting identity behind every request."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from otacore.errors import PermissionDeniedError, ValidationError


class Role(StrEnum):
    """Team roles, as Particle names them."""

    OWNER = "owner"
    ADMINISTRATOR = "administrator"
    DEVELOPER = "developer"
    SUPPORT = "support"
    VIEWER = "viewer"


class Permission(StrEnum):
    """What a request needs."""

    READ = "read"
    #: Upload, release, lock, flash, edit devices and groups, publish events
    #: ("sender verification": only roles that may manage devices).
    MANAGE_DEVICES = "manage devices and firmware"
    #: Create products, users, OAuth clients and API tokens.
    ADMINISTER = "administer products and users"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.OWNER: frozenset(Permission),
    Role.ADMINISTRATOR: frozenset(Permission),
    Role.DEVELOPER: frozenset({Permission.READ, Permission.MANAGE_DEVICES}),
    Role.SUPPORT: frozenset({Permission.READ}),
    Role.VIEWER: frozenset({Permission.READ}),
}


def parse_role(value: object) -> Role:
    """A Role from its name, or a ValidationError listing the valid ones."""
    try:
        return Role(str(value).lower())
    except ValueError:
        names = ", ".join(role.value for role in Role)
        raise ValidationError(f"unknown role {value!r}; use one of: {names}") from None


def roles_with(permission: Permission) -> list[Role]:
    """Roles that hold ``permission``."""
    return [role for role, held in ROLE_PERMISSIONS.items() if permission in held]


@dataclass(frozen=True)
class Actor:
    """Who is acting: ``subject`` goes into the audit log, ``role`` decides what is allowed."""

    subject: str
    role: Role
    token_hash: str | None = None

    def can(self, permission: Permission) -> bool:
        """True when the role holds ``permission``."""
        return permission in ROLE_PERMISSIONS[self.role]

    def require(self, permission: Permission, action: str) -> None:
        """Raise PermissionDeniedError unless the role holds ``permission``."""
        if not self.can(permission):
            allowed = ", ".join(role.value for role in roles_with(permission))
            raise PermissionDeniedError(
                f"the {self.role.value} role may not {action}; it needs one of: {allowed}"
            )


#: The actor of commands run directly on the store by an operator with file access (CLI).
SYSTEM_ACTOR = Actor("system", Role.OWNER)
