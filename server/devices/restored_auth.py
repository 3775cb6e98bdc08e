"""Authorizing the sessions restored after a graceful restart, all in one read.

The next process restores every saved DTLS session at once (issue 14 item 6) and must
authorize each device again (it may have been revoked or removed while the server was
down) before serving it. Asked one by one as at a handshake, that is three primary-key
lookups per device (``Tx.certificate_standing``), about a quarter of a millisecond of server
CPU each through SQLAlchemy: 2.5 s for 10,000 devices. Here the same three lookups are made
for many certificates per statement (``IN`` lists of :data:`CHUNK`), in one read
transaction, and the same rule decides (``server.authorization.may_connect``).

A certificate the store has not recorded as seen gets no verdict here (None): asking the
directory alone records it (a write), as at a handshake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import sqlalchemy as sa

from server.authorization import ClientCertificate, KnownCertificate, may_connect
from server.store import Tx
from server.store import schema as t

__all__ = ["CHUNK", "authorize_restored"]

#: Certificates per statement (SQLite allows 32,766 bound parameters since 3.32; far fewer
#: keep each statement's parameter list short).
CHUNK: Final = 500

_CERTS = t.device_certificates
_REVOCATIONS = t.device_revocations


def authorize_restored(tx: Tx, certificates: Sequence[ClientCertificate]) -> list[bool | None]:
    """For each certificate, in order: True if its device may connect, False if not, None
    if the certificate was never recorded as seen (ask the directory alone: that records
    it). ``tx``: a read transaction (one snapshot for all)."""
    # sha256 -> (issued by this installation, seen at a handshake, revoked)
    known: dict[str, tuple[bool, bool, bool]] = {}
    registered: set[str] = set()
    revoked: set[str] = set()
    conn = tx.conn
    for start in range(0, len(certificates), CHUNK):
        chunk = certificates[start : start + CHUNK]
        fingerprints = sorted({c.sha256 for c in chunk})
        device_ids = sorted({c.device_id for c in chunk})
        for sha256, issued_at, first_seen_at, revoked_at in conn.execute(
            sa.select(_CERTS.c.sha256, _CERTS.c.issued_at, _CERTS.c.first_seen_at,
                      _CERTS.c.revoked_at).where(_CERTS.c.sha256.in_(fingerprints))
        ):  # fmt: skip
            known[sha256] = (issued_at is not None, first_seen_at is not None,
                             revoked_at is not None)
        registered.update(conn.execute(
            sa.select(t.devices.c.id).where(t.devices.c.id.in_(device_ids))).scalars())
        revoked.update(conn.execute(
            sa.select(_REVOCATIONS.c.device_id).where(_REVOCATIONS.c.device_id.in_(device_ids))
        ).scalars())  # fmt: skip
    verdicts: list[bool | None] = []
    for certificate in certificates:
        record = known.get(certificate.sha256)
        allowed = may_connect(
            None if record is None else KnownCertificate(issued=record[0], revoked=record[2]),
            registered=certificate.device_id in registered,
            device_revoked=certificate.device_id in revoked,
        )
        if allowed and (record is None or not record[1]):
            verdicts.append(None)  # admitted for the first time: the directory records it
        else:
            verdicts.append(allowed)
    return verdicts
