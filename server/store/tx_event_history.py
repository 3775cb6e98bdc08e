"""The ``event_history`` table: the stored, bounded history of device and product events.

Plain functions over an open SQLAlchemy ``Connection`` (``Tx.conn`` of a store transaction):
record a batch (one INSERT), read a page newest first by id, and prune in bounded batches
by age and by rows per device. The writer is ``server.event_history.EventRecorder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from otacore.messages import EVENT_DATA_MAX_BYTES
from server.events import Event
from server.store.schema import event_history
from server.store.tx_events import event_of_row

#: Longest event name and coreid the table holds (longer ones are cut, never refused).
_NAME_MAX = 200
_COREID_MAX = 64
_TTL_MAX = 2**31 - 1


@dataclass(frozen=True)
class StoredEvent:
    """One row of the history: the event, its id (to page on) and whether its data was cut
    to :data:`EVENT_DATA_MAX_BYTES`."""

    id: int
    event: Event
    data_cut: bool


def cut_data(data: str | None) -> tuple[str | None, bool]:
    """``data`` cut to at most Particle's event data limit (1,024 bytes of UTF-8, on a
    character boundary), and whether it was cut. Device events are within it already
    (otacore.messages); the cloud's own JSON data may be longer."""
    if data is None:
        return None, False
    encoded = data.encode("utf-8", "replace")
    if len(encoded) <= EVENT_DATA_MAX_BYTES:
        return data, False
    return encoded[:EVENT_DATA_MAX_BYTES].decode("utf-8", "ignore"), True


def _storable(conn: Connection, value: str) -> str:
    """PostgreSQL text cannot hold NUL; each becomes U+FFFD there (as in event_log)."""
    if conn.dialect.name == "postgresql" and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def record_events(conn: Connection, events: Sequence[Event]) -> None:
    """Insert ``events`` (in order) in one statement. Whatever a device put in an event is
    stored, never refused (one refused row would fail the whole batch): long names are
    cut, the data to Particle's limit, the ttl is capped."""
    if not events:
        return
    rows = []
    for event in events:
        data, data_cut = cut_data(event.data)
        rows.append({
            "name": _storable(conn, event.name[:_NAME_MAX]),
            "data": None if data is None else _storable(conn, data),
            "data_cut": data_cut,
            "product_id": event.product_id,
            "device_id": None if event.device_id is None else event.device_id[:24],
            "coreid": _storable(conn, event.coreid[:_COREID_MAX]),
            "ttl": max(0, min(event.ttl, _TTL_MAX)),
            "public": event.public,
            "published_at": event.published_at,
            "source": event.source.value,
        })
    # Compiled afresh each time (at most a few batches a second per process), kept out of
    # the engine's statement cache: its first single- and many-row compilations would
    # otherwise land, once, in whatever a memory census measures then. (The option stays
    # on this transaction's connection: the recorder's write holds nothing else.)
    conn.execution_options(compiled_cache=None).execute(sa.insert(event_history), rows)


def read_history(
    conn: Connection,
    *,
    product_id: int,
    device_id: str | None = None,
    name_prefix: str = "",
    before_id: int | None = None,
    limit: int = 50,
) -> list[StoredEvent]:
    """The product's (or one of its devices') stored events, newest first: at most
    ``limit`` with id < ``before_id`` (all when None) whose name starts with
    ``name_prefix`` (case-sensitive, as the live stream's filter)."""
    table = event_history
    query = sa.select(table).where(table.c.product_id == product_id)
    if device_id is not None:
        query = query.where(table.c.device_id == device_id)
    if before_id is not None:
        query = query.where(table.c.id < before_id)
    if name_prefix:
        # substr compares exactly on both backends (LIKE folds case on SQLite, and a
        # range on name depends on PostgreSQL's collation).
        query = query.where(sa.func.substr(table.c.name, 1, len(name_prefix)) == name_prefix)
    rows = conn.execute(query.order_by(table.c.id.desc()).limit(limit)).all()
    return [
        StoredEvent(
            int(row.id),
            event_of_row(row),
            bool(row.data_cut),
        )
        for row in rows
    ]


def prune_older(conn: Connection, cutoff_ms: int, batch: int) -> int:
    """Delete at most ``batch`` rows published before ``cutoff_ms`` (epoch ms), oldest
    first; return how many went (``batch``: call again)."""
    table = event_history
    doomed = (sa.select(table.c.id).where(table.c.published_at < cutoff_ms)
              .order_by(table.c.published_at).limit(batch))
    ids = [int(value) for value in conn.execute(doomed).scalars()]
    if not ids:
        return 0
    conn.execute(sa.delete(table).where(table.c.id.in_(ids)))
    return len(ids)


def devices_over(conn: Connection, keep: int, limit: int) -> list[str]:
    """At most ``limit`` device ids holding more than ``keep`` rows (one pass over the
    device index)."""
    table = event_history
    query = (sa.select(table.c.device_id)
             .where(table.c.device_id.is_not(None))
             .group_by(table.c.device_id)
             .having(sa.func.count() > keep)
             .limit(limit))
    return [str(value) for value in conn.execute(query).scalars()]


def prune_device_excess(conn: Connection, device_id: str, keep: int) -> int:
    """Delete the device's rows beyond its ``keep`` newest; return how many went."""
    table = event_history
    boundary = conn.execute(
        sa.select(table.c.id).where(table.c.device_id == device_id)
        .order_by(table.c.id.desc()).offset(keep).limit(1)
    ).scalar()
    if boundary is None:
        return 0
    result = conn.execute(
        sa.delete(table).where(table.c.device_id == device_id, table.c.id <= int(boundary))
    )
    return int(result.rowcount or 0)


def count_rows(conn: Connection, *, device_id: str | None = None) -> int:
    """Rows held (of one device when given)."""
    query = sa.select(sa.func.count()).select_from(event_history)
    if device_id is not None:
        query = query.where(event_history.c.device_id == device_id)
    return int(conn.execute(query).scalar() or 0)
