"""The ``event_log`` table: events one server process hands to the others sharing the store.

Plain functions over an open SQLAlchemy ``Connection`` (``Tx.conn`` of a store transaction):
append a batch, read the rows after an id, prune rows older than a cutoff. Readers follow
the log by id, which is only safe when ids become visible in increasing order: SQLite has
one writer at a time (ids are assigned and committed in order); on PostgreSQL a sequence
value taken by a transaction that commits late would appear *behind* a reader's position,
so :func:`append_events` takes a table lock that serialises appenders until their commit
(readers are not blocked: SHARE ROW EXCLUSIVE conflicts with writers only). The store's
writers' advisory lock (server.store.postgresql) serialises them already; the table lock
keeps the log's order a property of this module, whoever appends.

On PostgreSQL an append also sends ``NOTIFY`` on :data:`EVENTS_CHANNEL` in the same
transaction: PostgreSQL delivers a notification only when its transaction commits
(https://www.postgresql.org/docs/current/sql-notify.html), so a listener woken by it always
finds the rows. The payload names the appending process (its origin), so that a relay can
ignore its own appends; a notification only says "read again" (the rows say what).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.events import Event, EventSource
from server.store.schema import event_log

#: The channel appends notify on PostgreSQL (per database: one installation, one channel).
EVENTS_CHANNEL = "ota_event_log"

#: Longest event name and coreid the table holds (longer ones are cut, never refused).
_NAME_MAX = 200
_COREID_MAX = 64
#: Largest ttl the column holds (a 32-bit INTEGER; a device may send any uint32, and a
#: ttl of 68 years means "forever" as well).
_TTL_MAX = 2**31 - 1


def append_events(conn: Connection, origin: str, events: Sequence[Event]) -> None:
    """Append ``events`` (in order) as published by process ``origin``, in one statement;
    on PostgreSQL, notify :data:`EVENTS_CHANNEL` with ``origin`` as the payload (delivered
    at commit, module docstring).

    Whatever a device put in an event is stored, never refused (one refused row would fail
    the relay's whole batch again at every flush): long names are cut, the ttl is capped,
    and on PostgreSQL, whose text cannot hold NUL characters, each NUL becomes U+FFFD."""
    if not events:
        return
    text = _text_for(conn)
    if conn.dialect.name == "postgresql":
        # Ids must commit in id order for readers that follow the log (module docstring).
        conn.execute(sa.text("LOCK TABLE event_log IN SHARE ROW EXCLUSIVE MODE"))
    conn.execute(
        sa.insert(event_log),
        [
            {
                "origin": origin,
                "name": text(event.name[:_NAME_MAX]),
                "data": None if event.data is None else text(event.data),
                "product_id": event.product_id,
                "device_id": event.device_id,
                "coreid": text(event.coreid[:_COREID_MAX]),
                "ttl": max(0, min(event.ttl, _TTL_MAX)),
                "public": event.public,
                "published_at": event.published_at,
                "source": event.source.value,
            }
            for event in events
        ],
    )
    if conn.dialect.name == "postgresql":
        # pg_notify() takes the channel and payload as parameters (NOTIFY cannot).
        conn.execute(sa.select(sa.func.pg_notify(EVENTS_CHANNEL, origin)))


def _text_for(conn: Connection) -> Callable[[str], str]:
    """How a string is made storable on ``conn``'s database (PostgreSQL refuses NUL)."""
    if conn.dialect.name == "postgresql":
        return lambda value: value.replace("\x00", "\ufffd") if "\x00" in value else value
    return lambda value: value


def last_event_id(conn: Connection) -> int:
    """The highest id in the log (0 when empty): where a new reader starts, so that it
    sees only what is appended from now on."""
    return int(conn.execute(sa.select(sa.func.max(event_log.c.id))).scalar() or 0)


def read_events_after(
    conn: Connection, after_id: int, *, exclude_origin: str, limit: int = 1000
) -> tuple[list[Event], int]:
    """Events with id > ``after_id`` not published by ``exclude_origin``, oldest first, at
    most ``limit``; and the id to read after next time.

    The next position skips this reader's own rows too (they are never returned and must
    not be scanned again). The log's end is read *first* and the rows are read up to it:
    every id up to that end was committed when it was read (ids commit in order), so the
    answer is right even where the two statements see different snapshots.
    """
    end_id = last_event_id(conn)
    if end_id <= after_id:
        return [], after_id
    rows = conn.execute(
        sa.select(
            event_log.c.id,
            event_log.c.name,
            event_log.c.data,
            event_log.c.product_id,
            event_log.c.device_id,
            event_log.c.coreid,
            event_log.c.ttl,
            event_log.c.public,
            event_log.c.published_at,
            event_log.c.source,
        )
        .where(
            event_log.c.id > after_id,
            event_log.c.id <= end_id,
            event_log.c.origin != exclude_origin,
        )
        .order_by(event_log.c.id)
        .limit(limit)
    ).all()
    next_id = int(rows[-1].id) if len(rows) >= limit else end_id
    return [event_of_row(row) for row in rows], next_id


def event_of_row(row: Any) -> Event:
    """The event a stored row holds (the relay's log and the event history have the same
    columns for it)."""
    return Event(
        name=row.name,
        data=row.data,
        product_id=row.product_id,
        device_id=row.device_id,
        coreid=row.coreid,
        ttl=int(row.ttl),
        public=bool(row.public),
        published_at=int(row.published_at),
        source=_source_of(row.source),
    )


def _source_of(value: object) -> EventSource:
    """A row's publisher; an unknown value is a device's (never trusted as the cloud's)."""
    try:
        return EventSource(value)
    except ValueError:
        return EventSource.DEVICE


def prune_events(conn: Connection, cutoff_ms: int) -> int:
    """Delete the rows published before ``cutoff_ms`` (epoch ms), except the newest row;
    return how many went.

    The newest row stays so that ids never go back, behind every reader's position, even on
    a store created before ``event_log`` had AUTOINCREMENT: without it SQLite gives a new
    row max(rowid) + 1, and an emptied table would hand out old ids again
    (https://sqlite.org/autoinc.html).
    """
    newest = last_event_id(conn)
    result = conn.execute(
        sa.delete(event_log).where(event_log.c.published_at < cutoff_ms, event_log.c.id < newest)
    )
    return int(result.rowcount or 0)
