"""Store queries on users, OAuth clients, tokens and the audit log."""

from __future__ import annotations

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

    def list_audit(self, product_id: int | None = None, limit: int = 100) -> list[AuditRecord]:
        """Newest audit entries first, optionally for one product."""
        query = sa.select(t.audit_log).order_by(t.audit_log.c.id.desc()).limit(limit)
        if product_id is not None:
            query = query.where(t.audit_log.c.product_id == product_id)
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
