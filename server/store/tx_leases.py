"""Named leases of once-per-installation jobs (issue 16 item 3), portable SQLAlchemy Core.

A lease row names a job, its holder (a node's process) and when the lease ends (epoch ms).
Taking and renewing are one conditional upsert: insert the row, or take it over when it
expired or is the caller's own (``INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE
leases.expires_at <= now OR leases.holder = me``; PostgreSQL and SQLite 3.24+ both have it).
The statement's RETURNING row says whether the caller holds the lease: a conflicting row
whose WHERE is false is left alone and returns nothing. On PostgreSQL two nodes racing for a
free lease serialize on the row (the loser's upsert re-checks the WHERE against the winner's
row), so exactly one holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from server.store import schema as t

#: Longest lease name and holder (the table's columns).
MAX_NAME = 64
MAX_HOLDER = 96


@dataclass(frozen=True)
class LeaseRecord:
    """One named lease as stored."""

    name: str
    holder: str
    #: Epoch ms: the lease is free from then on.
    expires_at: int
    #: Epoch ms: when this holder took it (renewals keep it).
    taken_at: int


def _check(name: str, holder: str) -> None:
    if not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"a lease name is 1 to {MAX_NAME} characters, not {name!r}")
    if not 0 < len(holder) <= MAX_HOLDER:
        raise ValueError(f"a lease holder is 1 to {MAX_HOLDER} characters, not {holder!r}")


def take_lease(conn: Connection, name: str, holder: str, now: int, until: int) -> bool:
    """Take or renew lease ``name`` for ``holder`` until ``until`` (epoch ms), if it is
    free (never taken, or expired at ``now``) or already ``holder``'s; True when
    ``holder`` holds it afterwards."""
    _check(name, holder)
    if until <= now:
        raise ValueError("a lease must end after it is taken")
    dialect = conn.dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"named leases need PostgreSQL or SQLite, not {dialect}")
    # Both dialects' Insert have on_conflict_do_update; the shared type does not say so.
    statement: Any = insert(t.leases).values(name=name, holder=holder, expires_at=until,
                                             taken_at=now)
    leases = t.leases.c
    statement = statement.on_conflict_do_update(
        index_elements=[leases.name],
        set_={
            "holder": statement.excluded.holder,
            "expires_at": statement.excluded.expires_at,
            # A renewal keeps the time the holder took it; a takeover starts anew.
            "taken_at": sa.case((leases.holder == holder, leases.taken_at),
                                else_=statement.excluded.taken_at),
        },
        where=sa.or_(leases.expires_at <= now, leases.holder == holder),
    ).returning(leases.holder)
    return conn.execute(statement).first() is not None


def release_lease(conn: Connection, name: str, holder: str) -> bool:
    """Give lease ``name`` up if ``holder`` holds it (a graceful stop: another node may
    take it at once instead of after its expiry); True when it did."""
    result = conn.execute(
        sa.delete(t.leases).where(t.leases.c.name == name, t.leases.c.holder == holder))
    return bool(result.rowcount)


def get_lease(conn: Connection, name: str) -> LeaseRecord | None:
    """The lease row of ``name`` (expired or not), None when it was never taken or was
    released."""
    row = conn.execute(
        sa.select(t.leases.c.name, t.leases.c.holder, t.leases.c.expires_at,
                  t.leases.c.taken_at).where(t.leases.c.name == name)).first()
    return None if row is None else LeaseRecord(str(row[0]), str(row[1]), int(row[2]),
                                                int(row[3]))


def list_leases(conn: Connection) -> list[LeaseRecord]:
    """Every lease row, by name."""
    rows = conn.execute(
        sa.select(t.leases.c.name, t.leases.c.holder, t.leases.c.expires_at,
                  t.leases.c.taken_at).order_by(t.leases.c.name)).all()
    return [LeaseRecord(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]
