"""Product teams and API users (Particle's ``/v1/products/:p/team``).

A team member is an existing account with a role on one product; an API user is a
programmatic account created for one product with an explicit list of scopes, whose single
access token never expires and is replaced whenever its scopes change (Particle docs, "API
users"). Nobody grants or takes away more than they hold: the scopes of a role given, of an
API user created, or of a member changed or removed must all be scopes the acting identity
holds on that product.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass

from otacore.errors import PermissionDeniedError, ValidationError
from server.fleet.auth import (
    API_USER_DOMAIN,
    NO_PASSWORD,
    AuthService,
    UnknownUserError,
    unknown_user,
)
from server.fleet.base import Outcome
from server.fleet.errors import DuplicateError
from server.fleet.roles import (
    ROLE_SCOPES,
    TEAM_ROLES,
    Actor,
    Role,
    parse_scopes,
    parse_team_role,
)
from server.fleet.text import clean_text
from server.store import ProductRecord, Tx, UserRecord
from server.store.tx_auth import ApiUserRecord, MemberRecord

_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class TeamMember:
    """One entry of a product's team: a person (with ``member``) or an API user."""

    user: UserRecord
    member: MemberRecord | None = None
    api_user: ApiUserRecord | None = None


@dataclass(frozen=True)
class ApiUserGrant:
    """A created or updated API user and its (new) access token, shown once."""

    username: str
    api_user: ApiUserRecord
    token: str


class TeamService(AuthService):
    """List, invite, change and remove product team members; create API users."""

    async def list_team(self, actor: Actor, product_id: int) -> list[TeamMember]:
        """The product's people and API users, by user name."""

        def work() -> list[TeamMember]:
            with self.store.read() as tx:
                product = self._product(tx, product_id)
                _require(actor, product, "teams.users:list", "list the team")
                people = [TeamMember(user, member) for user, member in tx.list_members(product.id)]
                bots = [TeamMember(user, api_user=grant)
                        for user, grant in tx.list_api_users(product.id)]
            return sorted(people + bots, key=lambda m: m.user.username)

        return await self._read(work)

    async def invite_member(
        self, actor: Actor, product_id: int, username: object, role: object = None
    ) -> TeamMember:
        """Add an existing account to the product's team (role default: viewer)."""

        def work() -> Outcome:
            product, name = self._product_and_name(product_id, username)
            the_role = Role.VIEWER if role is None else parse_team_role(role)
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product.id)
                _require(actor, product, "teams.users:invite", "invite team members")
                _require_covers(actor, product, ROLE_SCOPES[the_role],
                                f"give the {the_role.value} role")
                user = tx.get_user(name)
                if user is None:
                    # Deliberately told apart from an existing account: with no e-mail
                    # invitations (Particle's answer for unknown addresses) an inviter must
                    # learn that the account is missing. Account names are therefore not
                    # secret from those who may invite (README, "Security model"); the
                    # sign-in limits do not rely on them being secret.
                    raise unknown_user(name)
                if tx.get_api_user(user.id) is not None:
                    raise ValidationError(f"{name} is an API user; it belongs to its own product")
                if tx.get_member(product.id, user.id) is not None:
                    raise DuplicateError(
                        f"{name} is already on the team of product {product.slug}; change its "
                        f"role with PUT /v1/products/{product.slug}/team/{name}"
                    )
                tx.put_member(product.id, user.id, the_role.value, actor.subject, now)
                tx.add_audit(actor=actor.subject, action="team.invite", product_id=product.id,
                             target=f"user:{name}", details={"role": the_role.value}, now=now)
                member = tx.get_member(product.id, user.id)
            return Outcome(TeamMember(user, member))

        result: TeamMember = await self._run(work)
        return result

    async def create_api_user(
        self, actor: Actor, product_id: int, friendly_name: object, scopes: object
    ) -> ApiUserGrant:
        """Create an API user of the product with these scopes, and its access token."""

        def work() -> Outcome:
            label = clean_text(friendly_name, "friendly_name", 200, required=True)
            wanted = parse_scopes(scopes)
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_id)
                _require(actor, product, "teams.users:invite", "create API users")
                _require_covers(actor, product, wanted, "give these scopes")
                username = _api_username(tx, label)
                user = tx.insert_user(username, NO_PASSWORD, Role.NONE.value, now)
                grant = ApiUserRecord(user.id, product.id, label, sorted(wanted),
                                      actor.subject, now)
                tx.insert_api_user(grant)
                token = self._issue(tx, Role.NONE, username, 0, user_id=user.id)
                tx.add_audit(actor=actor.subject, action="team.api_user.create",
                             product_id=product.id, target=f"user:{username}",
                             details={"scopes": sorted(wanted)}, now=now)
            return Outcome(ApiUserGrant(username, grant, token.access_token))

        result: ApiUserGrant = await self._run(work)
        return result

    async def update_member(
        self, actor: Actor, product_id: int, username: object, changes: Mapping[str, object]
    ) -> TeamMember | ApiUserGrant:
        """Change a person's team role (``role``), or an API user's ``friendly_name`` and
        ``scopes`` (which replaces its token: the old one stops working)."""

        def work() -> Outcome:
            product, name = self._product_and_name(product_id, username)
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product.id)
                _require(actor, product, "teams.users:update", "change team members")
                user, member, grant = _find_member(tx, product, name)
                if grant is not None:
                    return Outcome(self._update_api_user(tx, actor, product, user, grant,
                                                         changes, now))
                assert member is not None
                unknown = sorted(set(changes) - {"role"})
                if unknown or "role" not in changes:
                    raise ValidationError("give the new role of a team member: {\"role\": R}")
                the_role = parse_team_role(changes["role"])
                _require_covers(actor, product, ROLE_SCOPES[_role(member.role)],
                                f"change the role of a {member.role}")
                _require_covers(actor, product, ROLE_SCOPES[the_role],
                                f"give the {the_role.value} role")
                tx.put_member(product.id, user.id, the_role.value, actor.subject, now)
                tx.add_audit(actor=actor.subject, action="team.update", product_id=product.id,
                             target=f"user:{name}", details={"role": the_role.value}, now=now)
                return Outcome(TeamMember(user, tx.get_member(product.id, user.id)))

        result: TeamMember | ApiUserGrant = await self._run(work)
        return result

    def _update_api_user(
        self, tx: Tx, actor: Actor, product: ProductRecord, user: UserRecord,
        grant: ApiUserRecord, changes: Mapping[str, object], now: int,
    ) -> ApiUserGrant:
        unknown = sorted(set(changes) - {"friendly_name", "scopes"})
        if unknown or not changes:
            raise ValidationError("give an API user's new friendly_name and/or scopes")
        label = grant.friendly_name
        if "friendly_name" in changes:
            label = clean_text(changes["friendly_name"], "friendly_name", 200, required=True)
        scopes = frozenset(grant.scopes)
        if "scopes" in changes:
            scopes = parse_scopes(changes["scopes"])
        _require_covers(actor, product, frozenset(grant.scopes), "change this API user")
        _require_covers(actor, product, scopes, "give these scopes")
        tx.update_api_user(user.id, friendly_name=label, scopes=sorted(scopes))
        # One live token per API user; new scopes, new token (Particle: no scope creep).
        tx.revoke_user_tokens(user.id, now)
        token = self._issue(tx, Role.NONE, user.username, 0, user_id=user.id)
        tx.add_audit(actor=actor.subject, action="team.api_user.update", product_id=product.id,
                     target=f"user:{user.username}", details={"scopes": sorted(scopes)}, now=now)
        updated = tx.get_api_user(user.id)
        assert updated is not None
        return ApiUserGrant(user.username, updated, token.access_token)

    async def remove_member(self, actor: Actor, product_id: int, username: object) -> None:
        """Take a person off the product's team, or delete an API user (and its token)."""

        def work() -> Outcome:
            product, name = self._product_and_name(product_id, username)
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product.id)
                _require(actor, product, "teams.users:remove", "remove team members")
                user, member, grant = _find_member(tx, product, name)
                if grant is not None:
                    held = frozenset(grant.scopes)
                else:
                    held = ROLE_SCOPES[_role(member.role if member else "none")]
                if user.username != actor.subject:  # anyone may leave a team
                    _require_covers(actor, product, held, "remove this member")
                if grant is not None:
                    tx.delete_user(user.id)
                    action = "team.api_user.delete"
                else:
                    tx.delete_member(product.id, user.id)
                    action = "team.remove"
                tx.add_audit(actor=actor.subject, action=action, product_id=product.id,
                             target=f"user:{name}", details={}, now=now)
            return Outcome(None)

        await self._run(work)

    def _product_and_name(self, product_id: int, username: object) -> tuple[ProductRecord, str]:
        name = clean_text(username, "username", 200, required=True)
        with self.store.read() as tx:
            return self._product(tx, product_id), name


def _role(stored: str) -> Role:
    try:
        return Role(stored)
    except ValueError:
        return Role.NONE


def _require(actor: Actor, product: ProductRecord, scope: str, action: str) -> None:
    actor.require_scope(scope, product.id, action, product.slug)


def _require_covers(actor: Actor, product: ProductRecord, scopes: frozenset[str],
                    action: str) -> None:
    """Nobody grants (or takes away) more than they hold on the product."""
    missing = sorted(scopes - actor.scopes_on(product.id))
    if missing:
        raise PermissionDeniedError(
            f"you may not {action} on product {product.slug}: it takes scopes you do not hold "
            f"there ({', '.join(missing)})"
        )


def _find_member(
    tx: Tx, product: ProductRecord, name: str
) -> tuple[UserRecord, MemberRecord | None, ApiUserRecord | None]:
    user = tx.get_user(name)
    grant = None if user is None else tx.get_api_user(user.id)
    member = None if user is None else tx.get_member(product.id, user.id)
    if user is None or (member is None and (grant is None or grant.product_id != product.id)):
        raise UnknownUserError(f"{name} is not on the team of product {product.slug}")
    if grant is not None and grant.product_id != product.id:
        grant = None
    return user, member, grant


def _api_username(tx: Tx, label: str) -> str:
    """``<name>+<10 random>@api.otacloud``, as Particle names API users (unique)."""
    base = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "api-user"
    while True:
        suffix = "".join(secrets.choice(_ALPHABET) for _ in range(10))
        name = f"{base}+{suffix}{API_USER_DOMAIN}"
        if tx.get_user(name) is None:
            return name


__all__ = ["TEAM_ROLES", "ApiUserGrant", "TeamMember", "TeamService"]
