"""Store queries on the products' firmware signing keys and their rotation statements.

The private keys arrive here sealed (server.devices.key_vault) and leave sealed: this module
never sees a key in clear. Statement N of a product is row (product_id, N), the table's
primary key, so two rotations that read the same statements cannot both append statement
N + 1: the second insert collides (StoreConflictError) and its transaction rolls back.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.events import PRODUCT_KEYS_CHANGED, Event
from server.store import schema as t
from server.store.tx_events import append_events

_KEYS = t.product_signing_keys
_STATEMENTS = t.product_key_statements


@dataclass(frozen=True)
class SealedKeyRecord:
    """One signing key of a product as stored (its private half sealed)."""

    product_id: int
    key_id: str
    public_key: bytes
    sealed_private_key: bytes
    #: Fingerprint of the key-encryption key that sealed it.
    kek_id: str
    #: The key the product signs with now.
    current: bool
    #: The statement that withdrew it (None while devices trust it).
    withdrawn_sequence: int | None
    created_at: int


_COLUMNS = (_KEYS.c.product_id, _KEYS.c.key_id, _KEYS.c.public_key, _KEYS.c.sealed_private_key,
            _KEYS.c.kek_id, _KEYS.c.is_current, _KEYS.c.withdrawn_sequence, _KEYS.c.created_at)


def _record(row: Any) -> SealedKeyRecord:
    product_id, key_id, public, sealed, kek_id, current, withdrawn, created = row
    return SealedKeyRecord(int(product_id), str(key_id), bytes(public), bytes(sealed),
                           str(kek_id), bool(current),
                           None if withdrawn is None else int(withdrawn), int(created))


class KeyQueries:
    """Signing key queries (a mixin of ``server.store.Tx``)."""

    conn: Connection

    def current_signing_key(self, product_id: int) -> SealedKeyRecord | None:
        """The key product ``product_id`` signs with, None before its first."""
        row = self.conn.execute(sa.select(*_COLUMNS).where(
            _KEYS.c.product_id == product_id, _KEYS.c.is_current.is_(True))).first()
        return None if row is None else _record(row)

    def signing_keys(self, product_id: int) -> list[SealedKeyRecord]:
        """Every key the product ever had, oldest first."""
        rows = self.conn.execute(sa.select(*_COLUMNS).where(_KEYS.c.product_id == product_id)
                                 .order_by(_KEYS.c.created_at, _KEYS.c.key_id)).all()
        return [_record(row) for row in rows]

    def key_statements(self, product_id: int) -> list[bytes]:
        """The product's key rotation statements, statement 1 first."""
        rows = self.conn.execute(sa.select(_STATEMENTS.c.statement)
                                 .where(_STATEMENTS.c.product_id == product_id)
                                 .order_by(_STATEMENTS.c.sequence)).all()
        return [bytes(row[0]) for row in rows]

    def key_stamps(self) -> dict[int, tuple[str, int]]:
        """Product id -> (current key id, number of statements) of every product with a
        key: what changes with every key creation, rotation and withdrawal (statements are
        only ever appended). Two small grouped reads for all products at once."""
        current = dict(self.conn.execute(sa.select(_KEYS.c.product_id, _KEYS.c.key_id)
                                         .where(_KEYS.c.is_current.is_(True))).all())
        counts: dict[Any, Any] = dict(self.conn.execute(
            sa.select(_STATEMENTS.c.product_id, sa.func.count())
            .group_by(_STATEMENTS.c.product_id)).all())
        return {int(product): (str(key_id), int(counts.get(product, 0)))
                for product, key_id in current.items()}

    def any_kek_id(self) -> str | None:
        """The KEK fingerprint of some stored key (None when the store holds none)."""
        row = self.conn.execute(sa.select(_KEYS.c.kek_id).limit(1)).first()
        return None if row is None else str(row[0])

    def add_signing_key(self, record: SealedKeyRecord) -> None:
        """Store a new key (not current: see :meth:`make_current_key`)."""
        self.conn.execute(sa.insert(_KEYS).values(
            product_id=record.product_id, key_id=record.key_id, public_key=record.public_key,
            sealed_private_key=record.sealed_private_key, kek_id=record.kek_id,
            is_current=None, withdrawn_sequence=record.withdrawn_sequence,
            created_at=record.created_at))

    def make_current_key(self, product_id: int, key_id: str) -> None:
        """Sign with ``key_id`` from now on (the previous current key is kept)."""
        self.conn.execute(sa.update(_KEYS).where(
            _KEYS.c.product_id == product_id, _KEYS.c.is_current.is_(True),
            _KEYS.c.key_id != key_id).values(is_current=None))
        updated = self.conn.execute(sa.update(_KEYS).where(
            _KEYS.c.product_id == product_id, _KEYS.c.key_id == key_id).values(is_current=True))
        if updated.rowcount != 1:  # pragma: no cover - the callers stored the key first
            raise LookupError(f"product {product_id} has no key {key_id}")

    def add_key_statements(self, product_id: int, first_sequence: int,
                           statements: Iterable[bytes], now: int) -> None:
        """Append statements ``first_sequence``, ``first_sequence + 1``, ...; one whose
        sequence is taken collides (StoreConflictError, see the module docstring)."""
        rows = [{"product_id": product_id, "sequence": first_sequence + offset,
                 "statement": statement, "created_at": now}
                for offset, statement in enumerate(statements)]
        if rows:
            self.conn.execute(sa.insert(_STATEMENTS), rows)

    def mark_key_withdrawn(self, product_id: int, key_id: str, sequence: int) -> None:
        """Record that statement ``sequence`` withdrew ``key_id`` (a key the store never
        held, such as a provisioned key imported without its private half, is skipped)."""
        self.conn.execute(sa.update(_KEYS).where(
            _KEYS.c.product_id == product_id, _KEYS.c.key_id == key_id,
            _KEYS.c.withdrawn_sequence.is_(None)).values(withdrawn_sequence=sequence))


def _origin() -> str:
    """The event log origin of this process's key changes (never a relay's own origin, so
    every relay, this process's included, publishes them)."""
    return f"keys:{socket.gethostname()[:40]}:{os.getpid()}"


def announce_key_change(tx: KeyQueries, product_id: int, key_id: str, statements: int) -> None:
    """Tell every server process, through the event log, that ``product_id``'s keys
    changed (in ``tx``: the event commits with the change, or neither does). The product is
    named in the data, not as the event's product: the event is the cloud's signal to its
    own processes, so no product event stream shows it and the event history keeps none."""
    data = json.dumps({"product_id": product_id, "key_id": key_id, "statements": statements},
                      separators=(",", ":"))
    append_events(tx.conn, _origin(), [Event(PRODUCT_KEYS_CHANGED, data)])
