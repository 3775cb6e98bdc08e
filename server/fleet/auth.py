"""Users, OAuth clients and API tokens: scrypt password hashes, token hashes, expiry.

Tokens are 40 random hex digits (as Particle's); only their SHA-256 is stored, so a copy of
the database grants nothing. Passwords and client secrets are hashed with scrypt
(RFC 7914; n=2**14, r=8, p=1, 16-byte salt) and compared in constant time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from otacore.errors import AuthError, ValidationError
from server.fleet.base import FleetBase, Outcome
from server.fleet.errors import DuplicateError
from server.fleet.roles import SYSTEM_ACTOR, Actor, Permission, Role, parse_role
from server.fleet.text import clean_text
from server.store import TokenRecord, Tx

SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
#: Particle's default access-token lifetime: 90 days.
DEFAULT_TOKEN_SECONDS = 90 * 24 * 3600
MAX_TOKEN_SECONDS = 10 * 365 * 24 * 3600


def hash_secret(secret: str) -> str:
    """scrypt hash of a password or client secret, with its parameters and salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    """True when ``secret`` matches a hash from :func:`hash_secret` (constant-time compare)."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            secret.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest, expected)


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against when the user is unknown, so timing does not tell."""
    return hash_secret(secrets.token_hex(8))


def token_hash(token: str) -> str:
    """The stored form of a token: SHA-256 hex of its text."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh token: 40 random hex digits (160 bits)."""
    return secrets.token_hex(20)


@dataclass(frozen=True)
class TokenGrant:
    """A token response (RFC 6749 section 5.1; Particle's field names)."""

    access_token: str
    expires_in: int  # seconds; 0 means it never expires
    refresh_token: str | None
    role: Role
    token_type: str = "bearer"


def check_expires_in(value: object) -> int:
    """Token lifetime in seconds: 0 (never expires) up to ten years."""
    if isinstance(value, str) and (value.strip().isascii() and value.strip().isdigit()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("expires_in must be a whole number of seconds")
    if not 0 <= value <= MAX_TOKEN_SECONDS:
        raise ValidationError(f"expires_in must be within 0..{MAX_TOKEN_SECONDS} seconds")
    return value


class AuthService(FleetBase):
    """Issue, check and revoke tokens; manage users and OAuth clients."""

    def _issue(
        self,
        tx: Tx,
        role: Role,
        subject: str,
        expires_in: int,
        *,
        user_id: int | None = None,
        client_id: str | None = None,
        refresh: bool = False,
    ) -> TokenGrant:
        now = self.clock()
        access = new_token()
        refresh_token = new_token() if refresh else None
        expires_at = None if expires_in == 0 else now + expires_in * 1000
        access_hash = token_hash(access)
        refresh_hash = token_hash(refresh_token) if refresh_token else None
        tx.insert_token(
            TokenRecord(
                access_hash,
                "access",
                role.value,
                subject,
                user_id,
                client_id,
                refresh_hash,
                now,
                expires_at,
                None,
            )
        )
        if refresh_token is not None:
            tx.insert_token(
                TokenRecord(
                    token_hash(refresh_token),
                    "refresh",
                    role.value,
                    subject,
                    user_id,
                    client_id,
                    access_hash,
                    now,
                    None,
                    None,
                )
            )
        tx.add_audit(
            actor=subject,
            action="token.issue",
            product_id=None,
            target=f"token:{access_hash[:12]}",
            details={"role": role.value, "expires_in": expires_in},
            now=now,
        )
        return TokenGrant(access, expires_in, refresh_token, role)

    def create_api_token_sync(
        self,
        role: object,
        *,
        label: str = "api token",
        expires_in: object = 0,
        actor: Actor = SYSTEM_ACTOR,
    ) -> TokenGrant:
        """Issue a token of ``role`` directly (bootstrap from the CLI; blocking)."""
        actor.require(Permission.ADMINISTER, "create API tokens")
        the_role = parse_role(role)
        seconds = check_expires_in(expires_in)
        with self.store.write() as tx:
            return self._issue(
                tx, the_role, clean_text(label, "label", 200) or "api token", seconds
            )

    async def authenticate(self, token: str) -> Actor:
        """The actor behind a bearer token; AuthError when unknown, expired or revoked."""
        if not token or len(token) > 200:
            raise AuthError("the access token is invalid")
        digest = token_hash(token)

        def work() -> TokenRecord | None:
            with self.store.read() as tx:
                return tx.get_token(digest)

        record = await self._read(work)
        if record is None or record.kind != "access":
            raise AuthError("the access token is invalid")
        if record.revoked_at is not None:
            raise AuthError("the access token was revoked")
        if record.expires_at is not None and record.expires_at <= self.clock():
            raise AuthError("the access token has expired; request a new one at /oauth/token")
        return Actor(record.subject, Role(record.role), digest)

    async def password_grant(
        self, username: object, password: object, *, expires_in: object = DEFAULT_TOKEN_SECONDS
    ) -> TokenGrant:
        """OAuth password grant (RFC 6749 section 4.3)."""

        def work() -> Outcome:
            if not isinstance(username, str) or not isinstance(password, str):
                raise ValidationError("username and password are required")
            seconds = check_expires_in(expires_in)
            with self.store.read() as tx:
                user = tx.get_user(username)
            ok = verify_secret(password, user.password_hash if user else _dummy_hash())
            if user is None or not ok or user.disabled:
                raise AuthError("user credentials are invalid")
            with self.store.write() as tx:
                return Outcome(
                    self._issue(
                        tx, Role(user.role), user.username, seconds, user_id=user.id, refresh=True
                    )
                )

        return await self._run(work)

    async def client_credentials_grant(
        self,
        client_id: object,
        client_secret: object,
        *,
        expires_in: object = DEFAULT_TOKEN_SECONDS,
    ) -> TokenGrant:
        """OAuth client-credentials grant (RFC 6749 section 4.4)."""

        def work() -> Outcome:
            if not isinstance(client_id, str) or not isinstance(client_secret, str):
                raise AuthError("client credentials are required")
            seconds = check_expires_in(expires_in)
            with self.store.read() as tx:
                client = tx.get_client(client_id)
            ok = verify_secret(client_secret, client.secret_hash if client else _dummy_hash())
            if client is None or not ok:
                raise AuthError("client credentials are invalid")
            with self.store.write() as tx:
                return Outcome(
                    self._issue(
                        tx,
                        Role(client.role),
                        f"client:{client.client_id}",
                        seconds,
                        client_id=client.client_id,
                    )
                )

        return await self._run(work)

    async def refresh_grant(
        self, refresh_token: object, *, expires_in: object = DEFAULT_TOKEN_SECONDS
    ) -> TokenGrant:
        """OAuth refresh grant (RFC 6749 section 6): a new pair; the old pair is revoked."""

        def work() -> Outcome:
            if not isinstance(refresh_token, str) or not refresh_token:
                raise ValidationError("refresh_token is required")
            seconds = check_expires_in(expires_in)
            now = self.clock()
            with self.store.write() as tx:
                record = tx.get_token(token_hash(refresh_token))
                if record is None or record.kind != "refresh" or record.revoked_at is not None:
                    raise AuthError("the refresh token is invalid or revoked")
                tx.revoke_token(record.token_hash, now)
                if record.pair_hash:
                    tx.revoke_token(record.pair_hash, now)
                return Outcome(
                    self._issue(
                        tx,
                        Role(record.role),
                        record.subject,
                        seconds,
                        user_id=record.user_id,
                        client_id=record.client_id,
                        refresh=True,
                    )
                )

        return await self._run(work)

    async def revoke_token(self, actor: Actor) -> None:
        """Revoke the token the actor authenticated with (and its refresh partner)."""

        def work() -> Outcome:
            if actor.token_hash is None:
                raise ValidationError("this identity has no token to revoke")
            now = self.clock()
            with self.store.write() as tx:
                record = tx.get_token(actor.token_hash)
                tx.revoke_token(actor.token_hash, now)
                if record is not None and record.pair_hash:
                    tx.revoke_token(record.pair_hash, now)
                tx.add_audit(
                    actor=actor.subject,
                    action="token.revoke",
                    product_id=None,
                    target=f"token:{actor.token_hash[:12]}",
                    details={},
                    now=now,
                )
            return Outcome(None)

        await self._run(work)

    def create_user_sync(
        self, username: object, password: object, role: object, *, actor: Actor = SYSTEM_ACTOR
    ) -> None:
        """Create an operator account (blocking; CLI and API)."""
        actor.require(Permission.ADMINISTER, "create users")
        name = clean_text(username, "username", 200, required=True)
        if not isinstance(password, str) or len(password) < 8:
            raise ValidationError("password must be a string of at least 8 characters")
        the_role = parse_role(role)
        digest = hash_secret(password)
        now = self.clock()
        with self.store.write() as tx:
            if tx.get_user(name) is not None:
                raise DuplicateError(f"user {name!r} already exists")
            tx.insert_user(name, digest, the_role.value, now)
            tx.add_audit(
                actor=actor.subject,
                action="user.create",
                product_id=None,
                target=f"user:{name}",
                details={"role": the_role.value},
                now=now,
            )

    def create_client_sync(
        self, name: object, role: object, *, actor: Actor = SYSTEM_ACTOR
    ) -> tuple[str, str]:
        """Create an OAuth client; returns (client_id, client_secret), the secret shown once."""
        actor.require(Permission.ADMINISTER, "create OAuth clients")
        label = clean_text(name, "client name", 200, required=True)
        the_role = parse_role(role)
        client_id = f"{label.lower().replace(' ', '-')[:60]}-{secrets.token_hex(4)}"
        secret = secrets.token_hex(20)
        now = self.clock()
        with self.store.write() as tx:
            tx.insert_client(client_id, hash_secret(secret), label, the_role.value, now)
            tx.add_audit(
                actor=actor.subject,
                action="client.create",
                product_id=None,
                target=f"client:{client_id}",
                details={"role": the_role.value},
                now=now,
            )
        return client_id, secret
