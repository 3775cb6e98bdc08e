"""Event relay through the store: what one server process publishes, the others publish too.

Several server processes share one store, each with its own in-process :class:`EventBus`:
the worker processes of one node, and on a shared database (PostgreSQL, or a SQLite file
named by ``--db-url``) the processes of every node of the installation. The relay of each
process

* taps its bus (``EventBus.tap``): every event published here goes into a bounded buffer
  (publish stays synchronous and never blocks);
* flushes the buffer every ``flush_interval`` seconds in one write transaction
  (``server.store.tx_events.append_events``), at most ``batch`` events per transaction;
* reads the rows other processes appended after the last one it saw and publishes them on
  its bus with ``relayed=True`` (so they are not appended again: no echo):

  - on SQLite, every ``poll_interval`` seconds;
  - on PostgreSQL, when notified: each append sends ``NOTIFY`` in its transaction, and the
    relay LISTENs on a connection of its own (``server.store.pg_listen``), in a thread; a
    notification only says "read again", so any number of them coalesce into one pending
    read (no queue). A read every ``missed_notification_poll`` seconds covers a lost
    notification. When the listening connection breaks (database restart, network cut), the
    relay reconnects with back-off (``listen_retry_min`` doubling up to
    ``listen_retry_max``) and then reads every row after the last one it saw: nothing
    appended meanwhile is lost, nothing is published twice, and the order is kept;
* in the main process only, deletes rows older than ``retention`` seconds.

A process that cannot read the log for longer than ``retention`` (its database connection
gone that long) misses the rows pruned meanwhile: it says so in a warning. What it missed is
in the store's tables all the same (releases, flash requests, revocations, rollout states):
its devices pick it up at their next session, and a revoked device's next handshake is
refused.

Each row keeps its event's source (the cloud, a device or an API client), so a listener in
another process acts on the cloud's own events only, as it does in the publishing one.

A relay starts reading at the log's end at start-up: a new or restarted process does not
replay history (what happened before is in the store's tables already).

When the buffer is full (the store was unreachable for long enough to queue ``buffer``
events), new events are *not* relayed: they still reach this process's own subscribers,
``dropped`` counts them and a warning says so. Nothing waits on the store in ``publish``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import trio

from otacore.errors import OtaError, ValidationError
from server.events import Event, EventBus
from server.queued_batches import store_batch
from server.store import Store
from server.store.pg_listen import EventLogListener, ListenerLostError
from server.store.tx_events import append_events, last_event_id, prune_events, read_events_after

log = logging.getLogger("ota.relay")

#: Seconds one wait for notifications lasts in its thread (the thread lingers that long at
#: most after the relay stops, then closes the listening connection).
_LISTEN_WAIT = 1.0


@dataclass(frozen=True)
class RelaySettings:
    """Timings and bounds of the relay."""

    #: Seconds between flushes of the outgoing buffer (one transaction each).
    flush_interval: float = 0.025
    #: Seconds between polls for other processes' events (SQLite; PostgreSQL is notified).
    poll_interval: float = 0.05
    #: Seconds between reads of the log on PostgreSQL when no notification came (one lost
    #: on the way, or the listening connection down).
    missed_notification_poll: float = 5.0
    #: Seconds before the first attempt to listen again after the listening connection to
    #: PostgreSQL broke (or to read again after a failed read); each failed attempt doubles
    #: the wait, up to ``listen_retry_max``.
    listen_retry_min: float = 0.1
    #: Longest wait between attempts to listen again.
    listen_retry_max: float = 5.0
    #: Outgoing events held at most (beyond: dropped from the relay, counted).
    buffer: int = 20_000
    #: Events per append transaction and rows per poll.
    batch: int = 1000
    #: Rows older than this many seconds are pruned (main process only).
    retention: float = 120.0
    #: Seconds between those prunings.
    prune_interval: float = 10.0
    #: Seconds the last flush may take when the relay stops.
    final_flush_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in ("flush_interval", "poll_interval", "missed_notification_poll",
                     "listen_retry_min", "listen_retry_max", "retention", "prune_interval",
                     "final_flush_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValidationError(f"{name} must be a positive number of seconds, not "
                                      f"{value!r}")
        for name in ("buffer", "batch"):
            if getattr(self, name) < 1:
                raise ValidationError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.listen_retry_max < self.listen_retry_min:
            raise ValidationError(
                f"listen_retry_max ({self.listen_retry_max}) must be at least listen_retry_min "
                f"({self.listen_retry_min})"
            )


@dataclass
class RelayStats:
    """Counters of one relay."""

    appended: int = 0
    received: int = 0
    dropped: int = 0
    pruned: int = 0
    store_errors: int = 0
    #: The id the next poll reads after.
    last_id: int = 0
    #: Notifications of other processes' appends received (PostgreSQL).
    notifications: int = 0
    #: Listening connections made, and lost (PostgreSQL).
    listener_connects: int = 0
    listener_losses: int = 0
    #: The PostgreSQL backend pid of the listening connection (None: not listening).
    listener_pid: int | None = None


class EventRelay:
    """One process's end of the store relay (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        origin: str,
        *,
        settings: RelaySettings | None = None,
        prune: bool = False,
        listen: bool | None = None,
    ) -> None:
        """``listen``: read when notified (PostgreSQL) rather than every ``poll_interval``;
        None: when the store is on PostgreSQL."""
        if not origin or len(origin) > 64:
            raise ValueError("a relay origin is 1 to 64 characters (the event_log column)")
        self.store = store
        self.bus = bus
        self.origin = origin
        self.settings = settings or RelaySettings()
        self.prune = prune
        self.listen = store.backend == "postgresql" if listen is None else listen
        self.stats = RelayStats()
        self._outgoing: deque[Event] = deque()
        self._pending = trio.Event()
        #: Set when the log should be read again (a notification, a new listener).
        self._wake = trio.Event()
        #: trio.current_time() of the last successful read of the log.
        self._last_read: float | None = None
        self._last_warning = -1e9

    # -- the bus tap (synchronous, never blocks) ---------------------------------------------

    def _tap(self, event: Event) -> None:
        if len(self._outgoing) >= self.settings.buffer:
            self.stats.dropped += 1
            self._warn(
                "event relay buffer full (%d events): %d events so far not relayed to the "
                "other server processes",
                self.settings.buffer,
                self.stats.dropped,
            )
            return
        self._outgoing.append(event)
        self._pending.set()

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 5.0:  # at most one warning per 5 s per relay
            self._last_warning = now
            log.warning(message, *args)

    # -- the tasks ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[EventRelay] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Tap the bus, then flush, poll (and prune) until cancelled; a last flush on the
        way out sends what this process published just before it stopped."""
        self.stats.last_id = await trio.to_thread.run_sync(self._read_last_id)
        self._last_read = trio.current_time()
        self.bus.tap = self._tap
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_loop)
                if self.listen:
                    await nursery.start(self._listen_loop)
                    nursery.start_soon(self._notified_poll_loop)
                else:
                    nursery.start_soon(self._poll_loop)
                if self.prune:
                    nursery.start_soon(self._prune_loop)
                task_status.started(self)
        finally:
            self.bus.tap = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.settings.final_flush_timeout
                while self._outgoing and not scope.cancel_called:
                    if not await self.flush():
                        break

    def _read_last_id(self) -> int:
        with self.store.read() as tx:
            return last_event_id(tx.conn)

    async def _flush_loop(self) -> None:
        while True:
            await self._pending.wait()
            await trio.sleep(self.settings.flush_interval)  # gather a batch
            while self._outgoing:
                if not await self.flush():
                    await trio.sleep(self.settings.flush_interval * 4)  # the store is busy
            self._pending = trio.Event()
            if self._outgoing:  # arrived while the last flush ran
                self._pending.set()

    async def flush(self) -> bool:
        """Append up to ``batch`` buffered events in one transaction; False if the store
        refused (the events stay buffered, in order)."""
        try:
            appended = await store_batch(self._outgoing, self.settings.batch, self._append)
        except OtaError as exc:  # the batch is back in the buffer, in order
            self.stats.store_errors += 1
            self._warn("event relay cannot append to the store: %s; retrying", exc)
            return False
        self.stats.appended += appended
        return True

    def _append(self, batch: list[Event]) -> None:
        with self.store.write() as tx:
            append_events(tx.conn, self.origin, batch)

    async def _poll_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.poll_interval)
            await self.poll()

    async def _notified_poll_loop(self) -> None:
        retry = self.settings.listen_retry_min
        while True:
            with trio.move_on_after(self.settings.missed_notification_poll):
                await self._wake.wait()
            self._wake = trio.Event()  # a notification during the read: read again
            errors = self.stats.store_errors
            await self.poll()
            if self.stats.store_errors > errors:  # the store refused: again, with back-off
                await trio.sleep(retry)
                retry = min(retry * 2, self.settings.listen_retry_max)
                self._wake.set()
            else:
                retry = self.settings.listen_retry_min

    async def _listen_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Listen for other processes' appends; after each (re)connection, read the log
        (the catch-up). Started after the first attempt, whether it listens or not."""
        retry = self.settings.listen_retry_min
        limiter = trio.CapacityLimiter(1)  # its own thread: never waits for the store's
        while True:
            try:
                listener = await trio.to_thread.run_sync(
                    EventLogListener.connect, self.store.engine, abandon_on_cancel=True,
                    limiter=limiter,
                )
            except ListenerLostError as exc:
                self.stats.store_errors += 1
                self._warn("event relay: %s; trying again in %.1f s", exc, retry)
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep(retry)
                retry = min(retry * 2, self.settings.listen_retry_max)
                continue
            retry = self.settings.listen_retry_min
            self.stats.listener_connects += 1
            self.stats.listener_pid = listener.backend_pid
            self._wake.set()  # catch up with what was appended while nobody listened
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            try:
                while True:
                    origins = await trio.to_thread.run_sync(
                        listener.wait, _LISTEN_WAIT, abandon_on_cancel=True, limiter=limiter
                    )
                    if origins - {self.origin}:  # our own appends are not read back
                        self.stats.notifications += 1
                        self._wake.set()
            except ListenerLostError as exc:
                self.stats.listener_losses += 1
                log.warning("event relay: %s; listening again in %.1f s", exc, retry)
            finally:
                listener.close()
                self.stats.listener_pid = None
            await trio.sleep(retry)

    async def poll(self) -> int:
        """Publish the events other processes appended since the last poll; how many."""
        published = 0
        while True:
            try:
                events, next_id = await trio.to_thread.run_sync(self._read, self.stats.last_id)
            except OtaError as exc:
                self.stats.store_errors += 1
                self._warn("event relay cannot read the store: %s; retrying", exc)
                return published
            self._note_read()
            self.stats.last_id = next_id
            for event in events:
                self.bus.publish(event, relayed=True)
            published += len(events)
            self.stats.received += len(events)
            if len(events) < self.settings.batch:
                return published

    def _note_read(self) -> None:
        """Warn when the log could not be read for longer than it keeps rows."""
        now = trio.current_time()
        if self._last_read is not None and now - self._last_read > self.settings.retention:
            log.warning(
                "event relay could not read the event log for %.0f s, longer than its "
                "retention (%.0f s): events other processes published meanwhile may be "
                "lost here; devices pick up releases and flash requests at their next session",
                now - self._last_read, self.settings.retention,
            )
        self._last_read = now

    def _read(self, after_id: int) -> tuple[list[Event], int]:
        with self.store.read() as tx:
            return read_events_after(
                tx.conn, after_id, exclude_origin=self.origin, limit=self.settings.batch
            )

    async def _prune_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.prune_interval)
            await self.prune_now()

    async def prune_now(self, retention: float | None = None) -> int:
        """Delete rows older than ``retention`` seconds (default: the settings'); how many."""
        keep = self.settings.retention if retention is None else retention
        cutoff = time.time_ns() // 1_000_000 - int(keep * 1000)
        try:
            pruned = await trio.to_thread.run_sync(self._prune, cutoff)
        except OtaError as exc:
            self.stats.store_errors += 1
            self._warn("event relay cannot prune the store: %s", exc)
            return 0
        self.stats.pruned += pruned
        return pruned

    def _prune(self, cutoff_ms: int) -> int:
        with self.store.write() as tx:
            return prune_events(tx.conn, cutoff_ms)
