"""A dedicated PostgreSQL connection LISTENing for the event log's notifications.

Appends to ``event_log`` notify :data:`~server.store.tx_events.EVENTS_CHANNEL` at commit
(``server.store.tx_events.append_events``). A listener needs a connection of its own: LISTEN
belongs to a database session, and the store's pooled connections are lent to other work
(https://www.postgresql.org/docs/current/sql-listen.html). The connection is made with the
store engine's own connection arguments (same host, database, user, password, TLS), in
autocommit mode (a LISTEN inside an open transaction takes effect only at its commit, and
notifications are delivered to a session only between transactions).

Blocking calls, for one thread at a time (the relay runs :meth:`EventLogListener.wait` in a
worker thread): :meth:`close` may be called from another thread while a :meth:`wait` runs,
and then the connection is closed by that wait as it returns (closing a psycopg connection
under a thread that is waiting on it is not safe), within its timeout.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import Engine

from server.store.errors import StoreUnavailableError
from server.store.postgresql import connection_defaults
from server.store.tx_events import EVENTS_CHANNEL


class ListenerLostError(StoreUnavailableError):
    """The listening connection broke (database restarted, network cut, backend terminated);
    make a new one and read the rows missed meanwhile."""


class EventLogListener:
    """One LISTEN connection on the event log's channel (see the module docstring)."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._waiting = False
        self._closing = False
        #: The PostgreSQL backend's process id (``pg_stat_activity.pid``) of this session.
        self.backend_pid: int = connection.info.backend_pid

    @classmethod
    def connect(cls, engine: Engine) -> EventLogListener:
        """A new connection to ``engine``'s PostgreSQL database, listening (blocking);
        ListenerLostError if the database cannot be reached."""
        args, params = engine.dialect.create_connect_args(engine.url)
        # The store's connection defaults (TCP keep-alive, user timeout, connect timeout:
        # server.store.postgresql.CONNECTION_DEFAULTS): an idle LISTEN connection whose
        # peer vanished without a FIN is found dead, and the relay reconnects.
        params = {**connection_defaults(engine.url), **params,
                  "autocommit": True, "application_name": "ota event relay"}
        try:
            connection: psycopg.Connection[Any] = psycopg.connect(*args, **params)
        except psycopg.Error as exc:
            raise ListenerLostError(f"cannot connect to listen for events: {exc}") from exc
        try:
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(EVENTS_CHANNEL)))
        except psycopg.Error as exc:
            connection.close()
            raise ListenerLostError(f"cannot listen for events: {exc}") from exc
        return cls(connection)

    def wait(self, timeout: float) -> set[str]:
        """Wait up to ``timeout`` seconds for notifications (blocking); the origins (the
        payloads) of those that came, empty when none did. After the first one, those
        already received are taken too, without waiting. ListenerLostError when the
        connection broke."""
        with self._lock:
            if self._closing:
                return set()
            self._waiting = True
        origins: set[str] = set()
        try:
            for notify in self._connection.notifies(timeout=timeout, stop_after=1):
                origins.add(notify.payload)
            return origins
        except psycopg.Error as exc:
            raise ListenerLostError(f"the connection listening for events broke: {exc}") \
                from exc
        finally:
            with self._lock:
                self._waiting = False
                if self._closing:
                    self._connection.close()

    def close(self) -> None:
        """Close the connection now, or as soon as the :meth:`wait` running returns (any
        thread)."""
        with self._lock:
            self._closing = True
            if not self._waiting:
                self._connection.close()
