"""Users, OAuth clients and API tokens: scrypt password hashes, token hashes, expiry.

Tokens are 40 random hex digits (as Particle's); only their SHA-256 is stored, so a copy of
the database grants nothing. Passwords and client secrets are hashed with scrypt
(RFC 7914; n=2**14, r=8, p=1, 16-byte salt) and compared in constant time.

scrypt is deliberately slow (~65 ms of one core here) and memory-hard, so it runs on its own
small thread pool (:attr:`AuthService.hash_limiter`, ``password_hash_threads`` threads, with a
bounded queue), never on the store's: failed sign-ins cannot hold the threads every other
request's store reads need. Limiting how many guesses one address or account may make is
the API's job (``server.api.throttle``); this service writes the audit rows of its
lockouts and unlocks.

A token is checked against the store on every request: its user must still exist and not be
disabled, and the user's CURRENT installation role, product teams and API-user scopes are
what it grants (so revoking or changing an account takes effect at once). Refresh tokens
live ``refresh_seconds`` (default :data:`DEFAULT_REFRESH_TOKEN_SECONDS`), are single-use
(refreshing revokes the old pair, RFC 6749 section 6 / RFC 9700 section 4.14.2) and re-check
the user or client the same way.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import trio

from otacore.errors import AuthError, NotFoundError, OtaError, ValidationError
from server.fleet.base import FleetBase, Outcome
from server.fleet.errors import DuplicateError
from server.fleet.roles import SYSTEM_ACTOR, Actor, Permission, Role, parse_role
from server.fleet.text import clean_text
from server.store import TokenRecord, Tx, UserRecord

SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
#: Particle's default access-token lifetime: 90 days.
DEFAULT_TOKEN_SECONDS = 90 * 24 * 3600
MAX_TOKEN_SECONDS = 10 * 365 * 24 * 3600
#: Refresh-token lifetime unless the operator sets another (``ota server
#: --refresh-token-lifetime``): as long as a default access token lives.
DEFAULT_REFRESH_TOKEN_SECONDS = 90 * 24 * 3600
#: Longest password or secret accepted (scrypt pre-hashes it with PBKDF2; bounded anyway).
MAX_SECRET_LENGTH = 1024
#: User names of API users end so; people's accounts may not.
API_USER_DOMAIN = "@api.otacloud"
#: The stored "password hash" of an account that cannot sign in with a password.
NO_PASSWORD = "!"


class InvalidCredentialsError(AuthError):
    """Unknown user or client, or a wrong password or secret (one message for all)."""


class AccountDisabledError(AuthError):
    """The credentials are right but the account is disabled."""


class UnknownUserError(NotFoundError):
    """No account has this user name."""


class CredentialCheckBusyError(OtaError):
    """Too many password checks are queued; the client should retry shortly (503)."""


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


def _verify_or_dummy(secret: str, stored: str | None) -> bool:
    """Verify ``secret``; with no usable hash, spend the same time and answer False."""
    if stored is None or not stored.startswith("scrypt$"):
        verify_secret(secret, _dummy_hash())
        return False
    return verify_secret(secret, stored)


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


def check_seconds(value: object, what: str, low: int, high: int) -> int:
    """A whole number of seconds within ``low..high`` (an int or a string of digits)."""
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            raise ValidationError(f"{what} must be a whole number of seconds within {low}..{high}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be a whole number of seconds")
    if not low <= value <= high:
        raise ValidationError(f"{what} must be within {low}..{high} seconds")
    return value


def check_expires_in(value: object) -> int:
    """Token lifetime in seconds: 0 (never expires) up to ten years."""
    return check_seconds(value, "expires_in", 0, MAX_TOKEN_SECONDS)


def _check_secret(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{what} is required")
    if len(value) > MAX_SECRET_LENGTH:
        raise ValidationError(f"{what} is longer than {MAX_SECRET_LENGTH} characters")
    return value


def _role_of(stored: str) -> Role:
    try:
        return Role(stored)
    except ValueError:  # an unknown stored role grants nothing
        return Role.NONE


def check_username(value: object) -> str:
    """A person's login name: 1-200 printable characters, no '/' or spaces, not API-like."""
    name = clean_text(value, "username", 200, required=True)
    if any(ch.isspace() or ch == "/" or not ch.isprintable() for ch in name):
        raise ValidationError("username must not contain spaces, '/' or control characters")
    if name.lower().endswith(API_USER_DOMAIN):
        raise ValidationError(f"user names ending in {API_USER_DOMAIN} are kept for API users")
    return name


class AuthService(FleetBase):
    """Issue, check and revoke tokens; manage users and OAuth clients."""

    def __init__(
        self,
        *args: Any,
        password_hash_threads: int = 2,
        password_hash_queue: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if password_hash_threads < 1 or password_hash_queue < 0:
            raise ValueError("password_hash_threads must be >= 1 and password_hash_queue >= 0")
        #: The password-hashing pool: separate from the store's ``limiter``.
        self.hash_limiter = trio.CapacityLimiter(password_hash_threads)
        #: Checks allowed to wait for a hashing thread before new ones get 503.
        self.hash_queue = password_hash_queue

    # --- tokens ---------------------------------------------------------------------------------

    def _issue(
        self,
        tx: Tx,
        role: Role,
        subject: str,
        expires_in: int,
        *,
        user_id: int | None = None,
        client_id: str | None = None,
        refresh_seconds: int | None = None,
    ) -> TokenGrant:
        """Store a new access token (and a refresh token when ``refresh_seconds`` is given)."""
        now = self.clock()
        access = new_token()
        refresh_token = new_token() if refresh_seconds is not None else None
        expires_at = None if expires_in == 0 else now + expires_in * 1000
        access_hash = token_hash(access)
        refresh_hash = token_hash(refresh_token) if refresh_token else None
        tx.insert_token(
            TokenRecord(access_hash, "access", role.value, subject, user_id, client_id,
                        refresh_hash, now, expires_at, None)
        )
        if refresh_token is not None and refresh_seconds is not None:
            tx.insert_token(
                TokenRecord(token_hash(refresh_token), "refresh", role.value, subject, user_id,
                            client_id, access_hash, now, now + refresh_seconds * 1000, None)
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
        """The actor behind a bearer token with what it grants now; AuthError when unknown,
        expired, revoked, or when its user or client is gone or disabled."""
        if not token or len(token) > 200:
            raise AuthError("the access token is invalid")
        digest = token_hash(token)

        def work() -> Actor:
            with self.store.read() as tx:
                return self._actor_for(tx, digest)

        return await self._read(work)

    def _actor_for(self, tx: Tx, digest: str) -> Actor:
        record = tx.get_token(digest)
        if record is None or record.kind != "access":
            raise AuthError("the access token is invalid")
        if record.revoked_at is not None:
            raise AuthError("the access token was revoked")
        if record.expires_at is not None and record.expires_at <= self.clock():
            raise AuthError("the access token has expired; request a new one at /oauth/token")
        if record.user_id is not None:
            user = self._live_user(tx, record.user_id)
            api_user = tx.get_api_user(user.id)
            if api_user is not None:
                return Actor(user.username, Role.NONE, digest, api_product_id=api_user.product_id,
                             api_scopes=frozenset(api_user.scopes), user_id=user.id)
            memberships = tuple(
                (m.product_id, _role_of(m.role)) for m in tx.memberships_of(user.id)
            )
            return Actor(user.username, _role_of(user.role), digest, memberships,
                         user_id=user.id)
        if record.client_id is not None:
            client = tx.get_client(record.client_id)
            if client is None:
                raise AuthError(f"the OAuth client {record.client_id} no longer exists")
            return Actor(record.subject, _role_of(client.role), digest,
                         client_id=client.client_id)
        return Actor(record.subject, _role_of(record.role), digest)

    @staticmethod
    def _live_user(tx: Tx, user_id: int) -> UserRecord:
        user = tx.get_user_by_id(user_id)
        if user is None:
            raise AuthError("the token's account no longer exists")
        if user.disabled:
            raise AccountDisabledError(
                f"the account {user.username} is disabled; an administrator can enable it "
                "(ota admin user-update --enable)"
            )
        return user

    async def _verify(self, secret: str, stored: str | None, *, familiar: bool = False) -> bool:
        """scrypt on the hashing pool (bounded queue: CredentialCheckBusyError beyond it).

        A ``familiar`` check (from an address the account signed in from before: the API's
        throttle knows, and bounds how many one address has in progress) joins the queue
        even when it is full, so a flood from elsewhere delays its owner but never refuses
        them."""
        if not familiar and self.hash_limiter.statistics().tasks_waiting >= self.hash_queue:
            raise CredentialCheckBusyError(
                "too many sign-ins are being checked right now; retry in a few seconds"
            )
        return await trio.to_thread.run_sync(
            _verify_or_dummy, secret, stored, limiter=self.hash_limiter
        )

    async def password_grant(
        self,
        username: object,
        password: object,
        *,
        expires_in: object = DEFAULT_TOKEN_SECONDS,
        refresh_seconds: int = DEFAULT_REFRESH_TOKEN_SECONDS,
        familiar: bool = False,
    ) -> TokenGrant:
        """OAuth password grant (RFC 6749 section 4.3); API users cannot sign in so.
        ``familiar``: see :meth:`_verify`."""
        name = _check_secret(username, "username")
        secret = _check_secret(password, "password")
        seconds = check_expires_in(expires_in)

        def lookup() -> UserRecord | None:
            with self.store.read() as tx:
                return tx.get_user(name)

        user = await self._read(lookup)
        ok = await self._verify(secret, user.password_hash if user is not None else None,
                                familiar=familiar)
        if user is None or not ok:
            raise InvalidCredentialsError("user credentials are invalid")

        def issue() -> Outcome:
            with self.store.write() as tx:
                live = self._live_user(tx, user.id)  # it may have changed meanwhile
                return Outcome(self._issue(tx, _role_of(live.role), live.username, seconds,
                                           user_id=live.id, refresh_seconds=refresh_seconds))

        return await self._run(issue)

    async def client_credentials_grant(
        self,
        client_id: object,
        client_secret: object,
        *,
        expires_in: object = DEFAULT_TOKEN_SECONDS,
        familiar: bool = False,
    ) -> TokenGrant:
        """OAuth client-credentials grant (RFC 6749 section 4.4); ``familiar``: see
        :meth:`_verify`."""
        if not isinstance(client_id, str) or not isinstance(client_secret, str):
            raise InvalidCredentialsError("client credentials are required")
        the_id = _check_secret(client_id, "client_id")
        secret = _check_secret(client_secret, "client_secret")
        seconds = check_expires_in(expires_in)

        def lookup() -> str | None:
            with self.store.read() as tx:
                client = tx.get_client(the_id)
            return None if client is None else client.secret_hash

        ok = await self._verify(secret, await self._read(lookup), familiar=familiar)
        if not ok:
            raise InvalidCredentialsError("client credentials are invalid")

        def issue() -> Outcome:
            with self.store.write() as tx:
                client = tx.get_client(the_id)
                if client is None:
                    raise InvalidCredentialsError("client credentials are invalid")
                return Outcome(self._issue(tx, _role_of(client.role),
                                           f"client:{client.client_id}", seconds,
                                           client_id=client.client_id))

        return await self._run(issue)

    async def refresh_grant(
        self,
        refresh_token: object,
        *,
        expires_in: object = DEFAULT_TOKEN_SECONDS,
        refresh_seconds: int = DEFAULT_REFRESH_TOKEN_SECONDS,
    ) -> TokenGrant:
        """OAuth refresh grant (RFC 6749 section 6): a new pair; the old pair is revoked.

        The refresh token must be unexpired; its user must still exist and be enabled (a
        client must still exist), and the new token carries their role as it is now. A
        refresh token stored before refresh tokens had a lifetime expires
        ``refresh_seconds`` after it was issued.
        """
        if not isinstance(refresh_token, str) or not refresh_token:
            raise ValidationError("refresh_token is required")
        if len(refresh_token) > 200:
            raise AuthError("the refresh token is invalid or revoked")
        seconds = check_expires_in(expires_in)
        digest = token_hash(refresh_token)

        def live(record: TokenRecord | None) -> TokenRecord:
            if record is None or record.kind != "refresh" or record.revoked_at is not None:
                raise AuthError("the refresh token is invalid or revoked")
            return record

        def work() -> Outcome:
            now = self.clock()
            # A read first: a made-up or spent token costs no write transaction, so a flood
            # of them never queues the store's one writer (SQLite) behind it.
            with self.store.read() as tx:
                live(tx.get_token(digest))
            with self.store.write() as tx:  # again in the write: it may be spent meanwhile
                record = live(tx.get_token(digest))
                expires_at = record.expires_at
                if expires_at is None:
                    expires_at = record.created_at + refresh_seconds * 1000
                if expires_at <= now:
                    raise AuthError("the refresh token has expired; sign in again with "
                                    "grant_type=password")
                if record.user_id is not None:
                    user = self._live_user(tx, record.user_id)
                    if tx.get_api_user(user.id) is not None:
                        raise AuthError("API users have no refresh tokens")
                    role, subject = _role_of(user.role), user.username
                elif record.client_id is not None:
                    client = tx.get_client(record.client_id)
                    if client is None:
                        raise AuthError(f"the OAuth client {record.client_id} no longer exists")
                    role, subject = _role_of(client.role), record.subject
                else:
                    role, subject = _role_of(record.role), record.subject
                tx.revoke_token(record.token_hash, now)
                if record.pair_hash:
                    tx.revoke_token(record.pair_hash, now)
                return Outcome(
                    self._issue(tx, role, subject, seconds, user_id=record.user_id,
                                client_id=record.client_id, refresh_seconds=refresh_seconds)
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

    # --- sign-in limits (the API's throttle keeps them; this audits them) ---------------------

    async def record_sign_in_lockout(
        self, kind: str, key: str, *, group: str, failures: int, seconds: float
    ) -> None:
        """Audit the first lockout of an address group, user name or client id (one row per
        lockout, not per failed attempt: guesses alone cannot drive store writes)."""

        def work(tx: Tx) -> Outcome:
            tx.add_audit(actor=f"address:{group}", action="sign_in.lockout", product_id=None,
                         target=f"{kind}:{key}",
                         details={"failures": failures, "locked_seconds": seconds},
                         now=self.clock())
            return Outcome(None)

        await self._run_grouped(work)

    async def record_sign_in_unlock(
        self, actor: Actor, kind: str, key: str, details: dict[str, Any]
    ) -> None:
        """Audit an administrator clearing a sign-in limit (``details``: what it held)."""
        actor.require(Permission.ADMINISTER, "clear sign-in limits")

        def work(tx: Tx) -> Outcome:
            tx.add_audit(actor=actor.subject, action="sign_in.unlock", product_id=None,
                         target=f"{kind}:{key}", details=details, now=self.clock())
            return Outcome(None)

        await self._run_grouped(work)

    # --- accounts and clients (CLI, blocking) ----------------------------------------------------

    def create_user_sync(
        self, username: object, password: object, role: object, *, actor: Actor = SYSTEM_ACTOR
    ) -> None:
        """Create an operator account (blocking; CLI). Role ``none`` gives it access only to
        the products whose team it joins."""
        actor.require(Permission.ADMINISTER, "create users")
        name = check_username(username)
        if not isinstance(password, str) or not 8 <= len(password) <= MAX_SECRET_LENGTH:
            raise ValidationError(
                f"password must be a string of 8 to {MAX_SECRET_LENGTH} characters"
            )
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

    def update_user_sync(
        self,
        username: object,
        *,
        role: object = None,
        disabled: bool | None = None,
        actor: Actor = SYSTEM_ACTOR,
    ) -> UserRecord:
        """Change an account's installation role or disable/enable it (blocking; CLI).

        Disabling revokes every live token of the account at once (an enabled account signs
        in afresh: old tokens stay revoked)."""
        actor.require(Permission.ADMINISTER, "change users")
        name = clean_text(username, "username", 200, required=True)
        the_role = None if role is None else parse_role(role)
        now = self.clock()
        with self.store.write() as tx:
            user = tx.get_user(name)
            if user is None:
                raise unknown_user(name)
            if tx.get_api_user(user.id) is not None and the_role is not None:
                raise ValidationError("an API user has scopes, not a role; change them with "
                                      "PUT /v1/products/:p/team/:username")
            tx.update_user(user.id, role=None if the_role is None else the_role.value,
                           disabled=disabled)
            revoked = tx.revoke_user_tokens(user.id, now) if disabled else 0
            tx.add_audit(
                actor=actor.subject,
                action="user.update",
                product_id=None,
                target=f"user:{name}",
                details={"role": None if the_role is None else the_role.value,
                         "disabled": disabled, "tokens_revoked": revoked},
                now=now,
            )
            updated = tx.get_user_by_id(user.id)
        assert updated is not None
        return updated

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


def unknown_user(name: str) -> UnknownUserError:
    """The error for a user name no account has."""
    return UnknownUserError(
        f"no user {name!r}; an installation administrator creates accounts "
        f"(ota admin user {name} --role none)"
    )
