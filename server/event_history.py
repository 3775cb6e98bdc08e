"""The stored event history: each process records the device and product events published
on its own bus, once per installation; a once-only job keeps the history bounded.

What is kept: every event with a device id or a product id, private ones too (readers need
``events:get`` on the product, as for the live stream). Each event is recorded by the
process where it was published: :attr:`EventBus.recorder` sees only events published
there, never those the relay brought in from another process or node (``relayed=True``),
so a release seen by every node is one row, not one per node.

How it is written: :meth:`EventRecorder.record` runs inside ``EventBus.publish`` (the
device's session path), so it only appends to a bounded buffer and never touches the
store. One task drains the buffer every ``history_flush_interval`` seconds, up to
``history_batch`` events per INSERT. When the buffer is full (the store slow or away),
the new event is not recorded: ``ota_event_history_dropped_total`` counts it and a warning
says so at most once per :data:`WARN_PERIOD` seconds. The live stream still carries it.

Bounds: rows older than ``history_retention`` seconds, and a device's rows beyond its
``history_per_device`` newest, are deleted by :func:`prune_event_history`, which runs
under the ``event-history-pruning`` job lease (``server.leases``), in batches of
``history_prune_batch`` rows or devices per transaction.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy.exc
import trio

from otacore.errors import OtaError, ValidationError
from server import metrics
from server.events import Event, EventBus
from server.queued_batches import store_batch
from server.store import Store
from server.store.tx_event_history import (
    devices_over,
    prune_device_excess,
    prune_older,
    record_events,
)

log = logging.getLogger("ota.history")

#: Seconds between two warnings about dropped events (per recorder).
WARN_PERIOD = 10.0
#: Errors a store call may end with that the writer and the pruning outlive.
STORE_ERRORS = (OtaError, sqlalchemy.exc.SQLAlchemyError)


@dataclass(frozen=True)
class HistorySettings:
    """Bounds and timings of the stored event history (the ``[events]`` section)."""

    #: Seconds a device's or product's event stays in the stored history (7 days).
    history_retention: float = 7 * 24 * 3600.0
    #: Rows kept per device in the stored history (its newest; older ones are pruned).
    history_per_device: int = 500
    #: Events each server process holds at most while they wait to be stored; beyond it,
    #: new events are not stored (counted in ota_event_history_dropped_total).
    history_buffer: int = 10_000
    #: Events stored per INSERT.
    history_batch: int = 500
    #: Seconds between writes of the waiting events (one transaction each).
    history_flush_interval: float = 0.25
    #: Seconds between prunings of the history (once per installation).
    history_prune_interval: float = 60.0
    #: Rows (by age) or devices (by count) one pruning transaction handles.
    history_prune_batch: int = 1000
    #: Seconds the last write may take when a server process stops.
    history_final_flush_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in ("history_retention", "history_flush_interval", "history_prune_interval",
                     "history_final_flush_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
                raise ValidationError(f"{name} must be a positive number of seconds, not "
                                      f"{value!r}")
        for name in ("history_per_device", "history_buffer", "history_batch",
                     "history_prune_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(f"{name} must be a whole number of at least 1, not "
                                      f"{value!r}")


def kept(event: Event) -> bool:
    """True for an event the history keeps: one about a device or a product."""
    return event.device_id is not None or event.product_id is not None


@dataclass
class RecorderStats:
    """Counters of one recorder."""

    recorded: int = 0
    dropped: int = 0
    store_errors: int = 0


class EventRecorder:
    """One process's writer of the stored history (see the module docstring)."""

    def __init__(self, store: Store, bus: EventBus, settings: HistorySettings | None = None,
                 ) -> None:
        self.store = store
        self.bus = bus
        self.settings = settings or HistorySettings()
        self.stats = RecorderStats()
        self._waiting: deque[Event] = deque()
        self._pending = trio.Event()
        self._last_warning = -math.inf
        self._write_lock = trio.Lock()

    def record(self, event: Event) -> None:
        """The bus's recorder hook: buffer ``event`` if kept (never blocks, never waits on
        the store); a full buffer drops it, counted."""
        if not kept(event):
            return
        if len(self._waiting) >= self.settings.history_buffer:
            self.stats.dropped += 1
            metrics.history_dropped()
            now = time.monotonic()
            if now - self._last_warning >= WARN_PERIOD:
                self._last_warning = now
                log.warning("event history buffer full (%d events): %d events so far not "
                            "stored (the store is slow or unreachable)",
                            self.settings.history_buffer, self.stats.dropped)
            return
        self._waiting.append(event)
        self._pending.set()

    def attach(self) -> None:
        """Hook into the bus now (before :meth:`run` starts, e.g. to keep what a server's
        start-up publishes); the events wait in the buffer until :meth:`run` writes them."""
        self.bus.recorder = self.record

    @property
    def waiting(self) -> int:
        """Events buffered, not yet stored."""
        return len(self._waiting)

    async def run(self, *, task_status: trio.TaskStatus[EventRecorder] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Hook into the bus and write until cancelled; then a last write (at most
        ``history_final_flush_timeout`` seconds) stores what was published just before."""
        self.attach()
        try:
            task_status.started(self)
            while True:
                await self._pending.wait()
                await trio.sleep(self.settings.history_flush_interval)  # gather a batch
                while self._waiting:
                    if not await self.flush():
                        await trio.sleep(self.settings.history_flush_interval * 4)
                self._pending = trio.Event()
                if self._waiting:
                    self._pending.set()
        finally:
            self.bus.recorder = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.settings.history_final_flush_timeout
                while self._waiting and not scope.cancel_called:
                    if not await self.flush():
                        break

    async def flush(self) -> bool:
        """Store up to ``history_batch`` buffered events in one INSERT; False when the store
        refused (they stay buffered, in order)."""
        async with self._write_lock:  # one write at a time: rows keep publishing order
            try:
                recorded = await store_batch(self._waiting, self.settings.history_batch,
                                             self._write)
            except STORE_ERRORS as exc:  # the batch is back in the buffer, in order
                self.stats.store_errors += 1
                now = time.monotonic()
                if now - self._last_warning >= WARN_PERIOD:
                    self._last_warning = now
                    log.warning("cannot store events in the history: %s; retrying", exc)
                return False
            self.stats.recorded += recorded
            return True

    async def drain(self) -> None:
        """Store every event buffered now (what a caller published before it asked), in
        batches, and any write already under way; OtaError when the store refuses."""
        while True:
            # flush() takes the write lock first, so a batch the run loop has already taken
            # off the buffer (in flight in a thread, the buffer empty) is committed before
            # this returns: an empty buffer alone does not mean "stored".
            if not await self.flush():
                raise OtaError("the store refused the event history's write (see the log)")
            if not self._waiting:
                return

    def _write(self, batch: list[Event]) -> None:
        with self.store.write() as tx:
            record_events(tx.conn, batch)


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (the store's times)."""
    return time.time_ns() // 1_000_000


@dataclass
class PruneResult:
    """What one pruning pass deleted."""

    expired: int = 0
    excess: int = 0


def prune_once(store: Store, settings: HistorySettings,
               clock: Callable[[], int] = now_ms) -> PruneResult:
    """One pruning pass (blocking; run in a thread): rows older than the retention, then
    every device's rows beyond its newest ``history_per_device``; each transaction handles
    at most ``history_prune_batch`` rows or devices, so no write holds the store long."""
    result = PruneResult()
    cutoff = clock() - int(settings.history_retention * 1000)
    batch = settings.history_prune_batch
    while True:
        with store.write() as tx:
            went = prune_older(tx.conn, cutoff, batch)
        result.expired += went
        if went < batch:
            break
    while True:
        with store.write() as tx:
            devices = devices_over(tx.conn, settings.history_per_device, batch)
            for device_id in devices:
                result.excess += prune_device_excess(tx.conn, device_id,
                                                     settings.history_per_device)
        if len(devices) < batch:
            break
    return result


async def prune_event_history(store: Store, settings: HistorySettings,
                              clock: Callable[[], int] = now_ms) -> None:
    """The history's pruning job: a pass at once, then every ``history_prune_interval``
    seconds (run under the ``event-history-pruning`` lease: once per installation)."""
    while True:
        try:
            result = await trio.to_thread.run_sync(prune_once, store, settings, clock)
        except STORE_ERRORS as exc:
            log.warning("cannot prune the event history (trying again in %g s): %s",
                        settings.history_prune_interval, exc)
        else:
            if result.expired or result.excess:
                log.info("pruned %d expired events and %d beyond %d per device from the "
                         "event history", result.expired, result.excess,
                         settings.history_per_device)
        await trio.sleep(settings.history_prune_interval)
