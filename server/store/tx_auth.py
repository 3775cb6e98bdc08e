"""Store queries on users, OAuth clients, tokens and the audit log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t
from server.store.records import (
    AuditRecord,
    ClientRecord,
    TokenRecord,
    UserRecord,
    record_from,
)


@dataclass(frozen=True)
class MemberRecord:
    """A user's role on one product's team."""

    product_id: int
    user_id: int
    role: str
    invited_by: str
    created_at: int


@dataclass(frozen=True)
class ApiUserRecord:
    """An API user: a programmatic user bound to one product with explicit scopes."""

    user_id: int
    product_id: int
    friendly_name: str
    scopes: list[str]
    created_by: str
    created_at: int


class AuthQueries:
    """Users, clients, token hashes and the audit log; mixed into the store's Tx."""

    conn: Connection

    # --- users and clients ---------------------------------------------------------------------

    def insert_user(self, username: str, password_hash: str, role: str, now: int) -> UserRecord:
        """Create an operator account."""
        self.conn.execute(
            sa.insert(t.users).values(
                username=username,
                password_hash=password_hash,
                role=role,
                disabled=False,
                created_at=now,
            )
        )
        user = self.get_user(username)
        assert user is not None
        return user

    def get_user(self, username: str) -> UserRecord | None:
        """An account by user name."""
        row = (
            self.conn.execute(sa.select(t.users).where(t.users.c.username == username))
            .mappings()
            .first()
        )
        return None if row is None else record_from(UserRecord, row)

    def get_user_by_id(self, user_id: int) -> UserRecord | None:
        """An account by id."""
        row = self.conn.execute(sa.select(t.users).where(t.users.c.id == user_id)).mappings()
        found = row.first()
        return None if found is None else record_from(UserRecord, found)

    def update_user(self, user_id: int, *, role: str | None = None,
                    disabled: bool | None = None) -> None:
        """Change an account's installation role and/or its disabled flag."""
        values: dict[str, Any] = {}
        if role is not None:
            values["role"] = role
        if disabled is not None:
            values["disabled"] = disabled
        if values:
            self.conn.execute(sa.update(t.users).where(t.users.c.id == user_id).values(**values))

    def delete_user(self, user_id: int) -> None:
        """Delete an account (its tokens, memberships and API-user grant go with it)."""
        self.conn.execute(sa.delete(t.tokens).where(t.tokens.c.user_id == user_id))
        members = t.product_members
        self.conn.execute(sa.delete(members).where(members.c.user_id == user_id))
        self.conn.execute(sa.delete(t.api_users).where(t.api_users.c.user_id == user_id))
        self.conn.execute(sa.delete(t.users).where(t.users.c.id == user_id))

    # --- product teams and API users -------------------------------------------------------------

    def memberships_of(self, user_id: int) -> list[MemberRecord]:
        """Every product team a user belongs to."""
        rows = self.conn.execute(
            sa.select(t.product_members).where(t.product_members.c.user_id == user_id)
        ).mappings()
        return [record_from(MemberRecord, row) for row in rows]

    def get_member(self, product_id: int, user_id: int) -> MemberRecord | None:
        """A user's membership of one product's team."""
        row = self.conn.execute(
            sa.select(t.product_members).where(
                t.product_members.c.product_id == product_id,
                t.product_members.c.user_id == user_id,
            )
        ).mappings().first()
        return None if row is None else record_from(MemberRecord, row)

    def list_members(self, product_id: int) -> list[tuple[UserRecord, MemberRecord]]:
        """A product's team (people, not API users), by user name."""
        query = (
            sa.select(t.users, t.product_members.c.role.label("member_role"),
                      t.product_members.c.invited_by, t.product_members.c.created_at.label("since"))
            .join(t.product_members, t.product_members.c.user_id == t.users.c.id)
            .where(t.product_members.c.product_id == product_id)
            .order_by(t.users.c.username)
        )
        found = []
        for row in self.conn.execute(query).mappings():
            user = record_from(UserRecord, row)
            found.append((user, MemberRecord(product_id, user.id, row["member_role"],
                                             row["invited_by"], row["since"])))
        return found

    def put_member(self, product_id: int, user_id: int, role: str, invited_by: str,
                   now: int) -> None:
        """Add a user to a product's team, or change its role there."""
        if self.get_member(product_id, user_id) is None:
            self.conn.execute(sa.insert(t.product_members).values(
                product_id=product_id, user_id=user_id, role=role, invited_by=invited_by,
                created_at=now,
            ))
        else:
            self.conn.execute(
                sa.update(t.product_members)
                .where(t.product_members.c.product_id == product_id,
                       t.product_members.c.user_id == user_id)
                .values(role=role)
            )

    def delete_member(self, product_id: int, user_id: int) -> bool:
        """Remove a user from a product's team; True when it was a member."""
        result = self.conn.execute(
            sa.delete(t.product_members).where(
                t.product_members.c.product_id == product_id,
                t.product_members.c.user_id == user_id,
            )
        )
        return bool(result.rowcount)

    def insert_api_user(self, record: ApiUserRecord) -> None:
        """Bind a (programmatic) user to its product and scopes."""
        self.conn.execute(sa.insert(t.api_users).values(
            user_id=record.user_id, product_id=record.product_id,
            friendly_name=record.friendly_name, scopes=sorted(record.scopes),
            created_by=record.created_by, created_at=record.created_at,
        ))

    def update_api_user(self, user_id: int, *, friendly_name: str, scopes: list[str]) -> None:
        """Change an API user's name and scopes."""
        self.conn.execute(
            sa.update(t.api_users).where(t.api_users.c.user_id == user_id)
            .values(friendly_name=friendly_name, scopes=sorted(scopes))
        )

    def get_api_user(self, user_id: int) -> ApiUserRecord | None:
        """The API-user grant of a user (None for people)."""
        row = self.conn.execute(
            sa.select(t.api_users).where(t.api_users.c.user_id == user_id)
        ).mappings().first()
        return None if row is None else record_from(ApiUserRecord, row)

    def list_api_users(self, product_id: int) -> list[tuple[UserRecord, ApiUserRecord]]:
        """A product's API users, by user name."""
        query = (
            sa.select(t.users, t.api_users.c.product_id, t.api_users.c.friendly_name,
                      t.api_users.c.scopes, t.api_users.c.created_by,
                      t.api_users.c.created_at.label("granted_at"))
            .join(t.api_users, t.api_users.c.user_id == t.users.c.id)
            .where(t.api_users.c.product_id == product_id)
            .order_by(t.users.c.username)
        )
        found = []
        for row in self.conn.execute(query).mappings():
            user = record_from(UserRecord, row)
            found.append((user, ApiUserRecord(user.id, row["product_id"], row["friendly_name"],
                                              list(row["scopes"]), row["created_by"],
                                              row["granted_at"])))
        return found

    def insert_client(
        self, client_id: str, secret_hash: str, name: str, role: str, now: int
    ) -> ClientRecord:
        """Create an OAuth client for the client_credentials grant."""
        self.conn.execute(
            sa.insert(t.oauth_clients).values(
                client_id=client_id, secret_hash=secret_hash, name=name, role=role, created_at=now
            )
        )
        client = self.get_client(client_id)
        assert client is not None
        return client

    def get_client(self, client_id: str) -> ClientRecord | None:
        """An OAuth client by id."""
        row = (
            self.conn.execute(
                sa.select(t.oauth_clients).where(t.oauth_clients.c.client_id == client_id)
            )
            .mappings()
            .first()
        )
        return None if row is None else record_from(ClientRecord, row)

    # --- tokens -----------------------------------------------------------------------------------

    def insert_token(self, record: TokenRecord) -> None:
        """Store a token hash with its role and lifetime."""
        self.conn.execute(
            sa.insert(t.tokens).values(
                token_hash=record.token_hash,
                kind=record.kind,
                role=record.role,
                subject=record.subject,
                user_id=record.user_id,
                client_id=record.client_id,
                pair_hash=record.pair_hash,
                created_at=record.created_at,
                expires_at=record.expires_at,
                revoked_at=record.revoked_at,
            )
        )

    def get_token(self, token_hash: str) -> TokenRecord | None:
        """A token by its hash."""
        row = (
            self.conn.execute(sa.select(t.tokens).where(t.tokens.c.token_hash == token_hash))
            .mappings()
            .first()
        )
        return None if row is None else record_from(TokenRecord, row)

    def revoke_token(self, token_hash: str, now: int) -> bool:
        """Revoke a token; True when it was live."""
        result = self.conn.execute(
            sa.update(t.tokens)
            .where(t.tokens.c.token_hash == token_hash, t.tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return bool(result.rowcount)

    def revoke_user_tokens(self, user_id: int, now: int) -> int:
        """Revoke every live token of a user; how many were live."""
        result = self.conn.execute(
            sa.update(t.tokens)
            .where(t.tokens.c.user_id == user_id, t.tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return int(result.rowcount)

    # --- audit log ----------------------------------------------------------------------------

    def add_audit(
        self,
        *,
        actor: str,
        action: str,
        product_id: int | None,
        target: str,
        details: dict[str, Any],
        now: int,
    ) -> None:
        """Append an entry to the audit log (in the same transaction as the change)."""
        self.conn.execute(
            sa.insert(t.audit_log).values(
                at=now,
                actor=actor,
                action=action,
                product_id=product_id,
                target=target,
                details=details,
            )
        )

    def list_audit(
        self,
        product_id: int | None = None,
        limit: int = 100,
        *,
        before_id: int | None = None,
        action_prefix: str | None = None,
        actor: str | None = None,
    ) -> list[AuditRecord]:
        """Newest audit entries first, optionally for one product; ``before_id`` pages on
        (entries older than that id: ix_audit_product serves product and id together),
        ``action_prefix`` keeps actions starting with it (e.g. "firmware."), ``actor``
        keeps one actor's entries."""
        log = t.audit_log
        query = sa.select(log).order_by(log.c.id.desc()).limit(limit)
        if product_id is not None:
            query = query.where(log.c.product_id == product_id)
        if before_id is not None:
            query = query.where(log.c.id < before_id)
        if action_prefix:
            query = query.where(log.c.action.startswith(action_prefix, autoescape=True))
        if actor:
            query = query.where(log.c.actor == actor)
        return [record_from(AuditRecord, row) for row in self.conn.execute(query).mappings()]

    def table_counts(self) -> dict[str, int]:
        """Row count of every table (tests compare snapshots to prove nothing changed)."""
        counts = {}
        for table in t.metadata.sorted_tables:
            counts[table.name] = int(
                self.conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            )
        return counts

    def dump_tables(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, sorted (for before/after equality checks in tests)."""
        dump = {}
        for table in t.metadata.sorted_tables:
            rows = self.conn.execute(sa.select(table)).all()
            dump[table.name] = sorted((tuple(row) for row in rows), key=repr)
        return dump
