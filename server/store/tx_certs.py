"""Store queries on device certificates and their revocation (``schema.device_certificates``
and ``schema.device_revocations``; the rule they feed is ``server.authorization.may_connect``).

These tables have no foreign key to ``devices``: removing a device row leaves its
certificates and its revocation in place, so importing the device again does not undo a
revocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t

_CERTS = t.device_certificates
_REVOCATIONS = t.device_revocations

# The handshake path's reads, built once (see tx_fleet.py): the presented certificate,
# whether its device is registered and whether the device is under revocation.
SELECT_CERTIFICATE = sa.select(_CERTS).where(_CERTS.c.sha256 == sa.bindparam("sha256"))
SELECT_REGISTERED = sa.select(t.devices.c.id).where(t.devices.c.id == sa.bindparam("device_id"))
SELECT_REVOCATION = sa.select(_REVOCATIONS).where(
    _REVOCATIONS.c.device_id == sa.bindparam("device_id")
)


@dataclass(frozen=True)
class CertificateRecord:
    """One device certificate the server knows (issued through it, or seen)."""

    sha256: str
    serial: str
    device_id: str
    not_after: int
    issued_at: int | None
    first_seen_at: int | None
    revoked_at: int | None
    revoked_by: str | None

    @property
    def revoked(self) -> bool:
        """True once revoked (and not reinstated)."""
        return self.revoked_at is not None


@dataclass(frozen=True)
class RevocationRecord:
    """A device under revocation: only certificates issued later are accepted for it."""

    device_id: str
    revoked_at: int
    revoked_by: str


@dataclass(frozen=True)
class CertificateStanding:
    """What a handshake needs to decide on one presented certificate, read together."""

    registered: bool
    certificate: CertificateRecord | None
    revocation: RevocationRecord | None


class CertificateQueries:
    """Mixin for :class:`server.store.Tx`."""

    conn: Connection

    def certificate_standing(self, device_id: str, sha256: str) -> CertificateStanding:
        """The presented certificate's record, whether its device is registered and whether
        the device is revoked: three primary-key lookups."""
        cert_row = self.conn.execute(SELECT_CERTIFICATE, {"sha256": sha256}).mappings().first()
        registered = (
            self.conn.execute(SELECT_REGISTERED, {"device_id": device_id}).first() is not None
        )
        revocation_row = (
            self.conn.execute(SELECT_REVOCATION, {"device_id": device_id}).mappings().first()
        )
        return CertificateStanding(
            registered,
            None if cert_row is None else CertificateRecord(**cert_row),
            None if revocation_row is None else RevocationRecord(**revocation_row),
        )

    def get_certificate(self, sha256: str) -> CertificateRecord | None:
        """The certificate with this SHA-256 fingerprint, if known."""
        row = self.conn.execute(SELECT_CERTIFICATE, {"sha256": sha256}).mappings().first()
        return None if row is None else CertificateRecord(**row)

    def list_certificates(self, device_id: str) -> list[CertificateRecord]:
        """Every certificate known for ``device_id``, oldest first."""
        rows = self.conn.execute(
            sa.select(_CERTS)
            .where(_CERTS.c.device_id == device_id)
            .order_by(sa.func.coalesce(_CERTS.c.issued_at, _CERTS.c.first_seen_at), _CERTS.c.sha256)
        ).mappings()
        return [CertificateRecord(**row) for row in rows]

    def get_revocation(self, device_id: str) -> RevocationRecord | None:
        """The device's revocation, if it is revoked."""
        row = self.conn.execute(SELECT_REVOCATION, {"device_id": device_id}).mappings().first()
        return None if row is None else RevocationRecord(**row)

    def certificates_revoked(self, device_id: str) -> bool:
        """True when the device is under revocation and has no certificate issued since
        (what the device row's ``certs_revoked`` flag shows)."""
        if self.get_revocation(device_id) is None:
            return False
        valid_issued = self.conn.execute(
            sa.select(_CERTS.c.sha256).where(
                _CERTS.c.device_id == device_id,
                _CERTS.c.issued_at.is_not(None),
                _CERTS.c.revoked_at.is_(None),
            ).limit(1)
        ).first()
        return valid_issued is None

    def record_issued_certificate(
        self, *, sha256: str, serial: str, device_id: str, not_after: int, now: int
    ) -> None:
        """Record a certificate the installation CA issued for ``device_id``."""
        self.conn.execute(
            sa.insert(_CERTS).values(
                sha256=sha256, serial=serial, device_id=device_id, not_after=not_after,
                issued_at=now, first_seen_at=None, revoked_at=None, revoked_by=None,
            )
        )  # fmt: skip

    def record_seen_certificate(
        self, *, sha256: str, serial: str, device_id: str, not_after: int, now: int
    ) -> None:
        """Record that a handshake presented this certificate (first time only)."""
        updated = self.conn.execute(
            sa.update(_CERTS)
            .where(_CERTS.c.sha256 == sha256, _CERTS.c.first_seen_at.is_(None))
            .values(first_seen_at=now)
        ).rowcount
        if updated or self.get_certificate(sha256) is not None:
            return
        self.conn.execute(
            sa.insert(_CERTS).values(
                sha256=sha256, serial=serial, device_id=device_id, not_after=not_after,
                issued_at=None, first_seen_at=now, revoked_at=None, revoked_by=None,
            )
        )  # fmt: skip

    def revoke_device_certificates(self, device_id: str, *, by: str, now: int) -> int:
        """Put ``device_id`` under revocation and revoke every certificate known for it;
        returns how many certificates were newly revoked. Idempotent."""
        revoked = self.conn.execute(
            sa.update(_CERTS)
            .where(_CERTS.c.device_id == device_id, _CERTS.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_by=by)
        ).rowcount
        if self.get_revocation(device_id) is None:
            self.conn.execute(
                sa.insert(_REVOCATIONS).values(device_id=device_id, revoked_at=now, revoked_by=by)
            )
        return int(revoked)

    def reinstate_device_certificates(self, device_id: str) -> tuple[bool, int]:
        """Lift ``device_id``'s revocation and un-revoke its certificates, except those a
        certificate issued after their revocation replaced (re-provisioning gave the
        device a new identity: the old one stays revoked); returns (whether it was
        revoked, how many certificates were reinstated)."""
        lifted = self.conn.execute(
            sa.delete(_REVOCATIONS).where(_REVOCATIONS.c.device_id == device_id)
        ).rowcount
        newer = _CERTS.alias("newer")
        replaced = (
            sa.select(newer.c.sha256)
            .where(newer.c.device_id == device_id, newer.c.issued_at > _CERTS.c.revoked_at)
            .exists()
        )
        reinstated = self.conn.execute(
            sa.update(_CERTS)
            .where(_CERTS.c.device_id == device_id, _CERTS.c.revoked_at.is_not(None),
                   ~replaced)
            .values(revoked_at=None, revoked_by=None)
        ).rowcount
        return bool(lifted), int(reinstated)
