"""Leases between the nodes of one installation (issue 16 item 3).

Several ``ota server`` nodes share one store (PostgreSQL). Two kinds of lease keep them from
acting twice, and let the others go on when one dies (SIGKILL, power):

* **Session leases** (columns of ``devices``): the write that marks a device online takes
  its lease for this node (``server.fleet.presence``). Each server process holding device
  sessions (the main process with a device plane, each worker process) runs a
  :class:`SessionLeaseKeeper`: it renews the leases of every session of that process in
  one UPDATE per ``renew_interval`` and closes a live session of the process whose lease
  went elsewhere (a stale session after a network split: the device is served by another
  node, or another process of this one, now), so a process never acts on a device another
  holds; it also marks offline a device whose session in the process ended while the store
  could not record it (a database outage), which the renewals would otherwise keep
  "online" for good. A lease not renewed in time is free (its node died, or just its
  process hung or died): the device's next session on any node takes it.
* **Job leases** (the ``leases`` table, ``server.store.tx_leases``): :class:`JobLease`
  runs a once-per-installation job (rollout ticks, the sweeper of expired session leases,
  the event log's pruning) only while this node holds the job's named lease, renewing it
  every ``renew_interval``; the job is cancelled when the lease may have run out (a
  renewal failed until then), and another node takes the lease once it expired.

Times in the store are the nodes' wall clocks (epoch ms, as everywhere in the store): the
nodes' clocks must agree (NTP) to well within ``lease - renew_interval``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy.exc
import trio

from otacore.errors import OtaError, ValidationError
from server.devices.tally import Tally
from server.store import Store
from server.store.tx_events import prune_events
from server.store.tx_leases import MAX_HOLDER, release_lease, take_lease

if TYPE_CHECKING:
    from server.devices.plane import DevicePlane
    from server.fleet import Fleet

log = logging.getLogger("ota.leases")

#: The named leases of the installation's once-only jobs.
ROLLOUT_TICKS = "rollout-ticks"
SESSION_SWEEPER = "session-sweeper"
EVENT_LOG_PRUNING = "event-log-pruning"
EVENT_HISTORY_PRUNING = "event-history-pruning"
BLOB_SWEEPER = "blob-sweeper"
#: The shortest period of the blob sweeper (``blob_sweep_grace`` may be 0 in tests).
MIN_BLOB_SWEEP_INTERVAL = 60.0
#: Why a session whose lease another session took (or the sweeper freed) is closed.
LEASE_LOST = "session lease held elsewhere"

#: Seconds a stopping node waits for the release of a job lease (else it expires).
RELEASE_TIMEOUT = 5.0
#: Errors a store call may end with that a lease loop outlives (tried again next period).
STORE_ERRORS = (OtaError, sqlalchemy.exc.SQLAlchemyError)


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (the store's times)."""
    return time.time_ns() // 1_000_000


def check_lease_timings(lease: float, renew_interval: float) -> None:
    """ValidationError unless both are positive and a lease outlives two renewals' gap
    (a renewal may be late by a store round trip)."""
    for name, value in (("session_lease", lease), ("lease_renew_interval", renew_interval)):
        if not (math.isfinite(value) and value > 0):
            raise ValidationError(f"{name} must be a positive number of seconds, not "
                                  f"{value!r}")
    if renew_interval * 2 > lease:
        raise ValidationError(
            f"lease_renew_interval ({renew_interval:g} s) must be at most half of "
            f"session_lease ({lease:g} s): a lease must survive a late renewal")


@dataclass(frozen=True)
class LeaseTimings:
    """How long a lease lasts and how often its holder renews it (seconds)."""

    lease: float = 30.0
    renew_interval: float = 10.0

    def __post_init__(self) -> None:
        check_lease_timings(self.lease, self.renew_interval)


class JobLease:
    """Runs a job only while this node holds the named lease (see the module docstring)."""

    def __init__(self, store: Store, name: str, holder: str, timings: LeaseTimings, *,
                 clock: Callable[[], int] = now_ms) -> None:
        if not 0 < len(holder) <= MAX_HOLDER:
            raise ValueError(f"a lease holder is 1 to {MAX_HOLDER} characters, not {holder!r}")
        self.store = store
        self.name = name
        self.holder = holder
        self.timings = timings
        self.clock = clock
        #: True while this node holds the lease (and runs the job).
        self.held = False
        #: Times this node took the lease (a causal marker for tests and operators).
        self.taken = Tally()
        #: Attempts at taking or renewing finished (failed ones too).
        self.attempts = Tally()

    def _take(self) -> bool:
        now = self.clock()
        until = now + round(self.timings.lease * 1000)
        with self.store.write() as tx:
            return take_lease(tx.conn, self.name, self.holder, now, until)

    def _release(self) -> None:
        with self.store.write() as tx:
            release_lease(tx.conn, self.name, self.holder)

    async def try_take(self) -> float | None:
        """Take or renew the lease once: the trio time until which it is surely held
        (measured from before the write, so it never outlasts the stored expiry), or
        None when another node holds it or the store failed."""
        started = trio.current_time()
        try:
            held = await trio.to_thread.run_sync(self._take)
        except STORE_ERRORS as exc:
            log.warning("lease %s: cannot take or renew it: %s", self.name, exc)
            held = False
        finally:
            self.attempts.add()
        return started + self.timings.lease if held else None

    async def run(self, job: Callable[[], Awaitable[object]], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: wait for the lease, run ``job`` while it is held, and give the
        lease up when cancelled (a graceful stop: another node takes it over at once).
        Started once the first attempt is decided (the job runs by then if it got the
        lease), so a server's tasks are settled when it reports itself started."""
        status: trio.TaskStatus[None] | None = task_status
        try:
            while True:
                held_until = await self.try_take()
                if held_until is not None:
                    await self._run_held(job, held_until, status)
                elif status is not None:
                    status.started()
                status = None
                await trio.sleep(self.timings.renew_interval)
        finally:
            if self.taken.value:  # held it at some time: give it up if still held
                self.held = False
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + RELEASE_TIMEOUT
                    try:
                        await trio.to_thread.run_sync(self._release, abandon_on_cancel=True)
                    except STORE_ERRORS as exc:
                        log.warning("lease %s: not released (it expires): %s", self.name, exc)

    async def _run_held(self, job: Callable[[], Awaitable[object]], held_until: float,
                        status: trio.TaskStatus[None] | None) -> None:
        """Run ``job`` until the lease may have run out (no renewal succeeded in time) or
        another node took it; the job ending by itself ends the holding too."""
        self.held = True
        self.taken.add()
        log.info("lease %s: taken by %s", self.name, self.holder)
        try:
            # The job's scope ends when the lease may have expired: no renewal extended it.
            with trio.CancelScope(deadline=held_until) as job_scope:
                async with trio.open_nursery() as nursery:

                    async def renew() -> None:
                        while True:
                            await trio.sleep(self.timings.renew_interval)
                            renewed_until = await self.try_take()
                            if renewed_until is None:
                                continue  # a failed write: try again while still held
                            job_scope.deadline = renewed_until

                    nursery.start_soon(renew)
                    if status is not None:
                        status.started()
                    await job()
                    nursery.cancel_scope.cancel()
            if job_scope.cancelled_caught:
                log.warning("lease %s: not renewed in time; %s stops its job",
                            self.name, self.holder)
        finally:
            self.held = False


class SessionLeaseKeeper:
    """Renews the session leases of one server process's sessions, closes a session of the
    process whose lease went elsewhere, and frees a device whose session here ended
    unrecorded (see the module docstring).

    Every process holding device sessions runs one (the main process with a device plane,
    and each worker process: ``server.workers``), so each renews exactly its own leases:
    the sessions of a process that hangs or dies are not kept "online" by another process
    of its node; their leases run out and the sweeper frees the devices."""

    def __init__(self, fleet: Fleet, plane: DevicePlane, renew_interval: float) -> None:
        self.fleet = fleet
        self.plane = plane
        self.renew_interval = renew_interval
        #: The process whose sessions' leases this keeper renews (their tokens are
        #: "<origin>/<serial>": ``DevicePlane.presence_token``).
        self.origin = plane.origin
        #: Renewals finished (failed ones too): a causal marker for tests.
        self.renewals = Tally()
        #: Sessions closed because their lease went elsewhere.
        self.closed_stale = 0
        #: Presences freed because their session had ended here without its offline write.
        self.freed_ended = 0
        # Sessions missing from the last renewal's leases: a session whose presence write
        # had not committed before the renewal ran is missing once; twice means lost.
        self._missing: set[tuple[str, str]] = set()
        # Leases renewed last time for sessions of this process that are not live: one
        # whose presence committed just before its handler went live is there once; twice
        # means ended.
        self._ended: set[tuple[str, str]] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Renew every ``renew_interval`` seconds until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.renew_interval)
            await self.renew()

    async def renew(self) -> int:
        """Renew this process's session leases once (one statement); close its sessions
        that lost theirs, free the devices of its sessions that ended unrecorded. Returns
        how many leases were renewed."""
        live = self._live_sessions()
        try:
            renewed = await self.fleet.renew_session_leases(self.origin)
        except STORE_ERRORS as exc:
            log.warning("cannot renew the session leases of %s (trying again in %g s): %s",
                        self.origin, self.renew_interval, exc)
            self.renewals.add()
            return 0
        missing = live - renewed
        lost = missing & self._missing
        self._missing = missing - lost
        for device_id, presence in sorted(lost):
            self._close(device_id, presence)
        # A session that ends marks its device offline, freeing the lease; when that write
        # fails (the database was away just then: restarted, crashed, cut off), the device
        # stays "online" under this process's token, and the renewal, which extends every
        # lease of the process, would keep it so for good. (Only this process's tokens
        # are judged, whatever the store returned: another process's live session is
        # never "ended" here.)
        prefix = f"{self.origin}/"
        ended = {key for key in renewed - live if key[1].startswith(prefix)}
        gone = ended & self._ended
        self._ended = ended - gone
        for device_id, presence in sorted(gone):
            await self._free(device_id, presence)
        self.renewals.add()
        return len(renewed)

    async def _free(self, device_id: str, presence: str) -> None:
        """Mark offline a device whose session here ended without saying so (only while
        ``presence`` still owns it: a newer session anywhere keeps it)."""
        try:
            await self.fleet.device_offline(device_id, session=presence)
        except STORE_ERRORS as exc:
            log.warning("cannot mark %s offline (its session here ended): %s; trying again "
                        "at the next renewal", device_id, exc)
            self._ended.add((device_id, presence))
            return
        log.info("marked %s offline: its session here had ended while the store could not "
                 "record it", device_id)
        self.freed_ended += 1

    def _live_sessions(self) -> set[tuple[str, str]]:
        return {(device_id, handler.presence) for device_id, handler in self.plane.live.items()}

    def _close(self, device_id: str, presence: str) -> None:
        handler = self.plane.live.get(device_id)
        if handler is None or handler.presence != presence:
            return  # ended or replaced meanwhile
        log.warning("closing the session of %s: its lease is held elsewhere (the device is "
                    "served by another node or server process now, or the lease expired)",
                    device_id)
        self.closed_stale += 1
        handler.session.close(LEASE_LOST)


async def sweep_expired_sessions(fleet: Fleet, interval: float, *,
                                 steps: Tally | None = None) -> None:
    """The sweeper job: every ``interval`` seconds, mark offline the devices whose session
    leases expired (run under the :data:`SESSION_SWEEPER` lease: once per installation).

    It sweeps only once the store has been reachable for one whole session lease since the
    job started or last failed to reach it: after the database was away (restarted,
    crashed, cut off) for longer than a lease, no node could renew its sessions' leases
    meanwhile, and every one has expired although the sessions are alive. Each node renews
    its leases within ``lease_renew_interval`` of the database's return (at most half a
    lease): sweeping at once would mark the whole fleet offline and make every node close
    every session as "lease lost" -- a reconnection of every device at once. A dead node's
    devices are marked offline one lease later instead. (The job starts again whenever this
    node takes the sweeper's lease, e.g. after an outage that let the lease run out.)
    ``steps`` counts the job's rounds (a marker for tests)."""
    lease = fleet.session_lease_ms / 1000
    reachable_since: float | None = None  # None: not seen reachable since (re)starting
    while True:
        now = trio.current_time()
        if reachable_since is None or now - reachable_since < lease:
            try:  # only whether the database answers: the nodes' renewals need it too
                await trio.to_thread.run_sync(fleet.store.ping)
            except STORE_ERRORS as exc:
                reachable_since = None
                log.warning("the session sweeper cannot reach the store (trying again in "
                            "%g s): %s", interval, exc)
            else:
                if reachable_since is None:
                    reachable_since = now
        else:
            try:
                count = await fleet.sweep_expired_sessions()
            except STORE_ERRORS as exc:
                reachable_since = None  # the nodes' renewals failed too: a grace again
                log.warning("cannot sweep expired session leases (trying again in %g s): "
                            "%s", interval, exc)
            else:
                if count:
                    log.info("marked %d devices offline: their session leases expired",
                             count)
        if steps is not None:
            steps.add()
        await trio.sleep(interval)


async def sweep_unreferenced_blobs(store: Store, interval: float) -> None:
    """The blob sweeper job: every ``interval`` seconds, delete the blobs no row refers to
    that were stored more than the store's grace period ago (``Store.sweep_blobs``), e.g.
    a deleted firmware's image. Deleting a firmware leaves its blob to this job: an upload
    of the same bytes may be between storing the blob and committing its row (run under
    the :data:`BLOB_SWEEPER` lease: once per installation)."""
    while True:
        await trio.sleep(interval)
        try:
            removed = await trio.to_thread.run_sync(store.sweep_blobs)
        except STORE_ERRORS as exc:
            log.warning("cannot sweep unreferenced blobs (trying again in %g s): %s",
                        interval, exc)
        else:
            if removed:
                log.info("deleted %d unreferenced blobs", len(removed))


async def prune_event_log(store: Store, retention: float, interval: float) -> None:
    """The event log's pruning job: every ``interval`` seconds, delete relayed events older
    than ``retention`` seconds (run under the :data:`EVENT_LOG_PRUNING` lease)."""

    def prune() -> int:
        cutoff = now_ms() - int(retention * 1000)
        with store.write() as tx:
            return prune_events(tx.conn, cutoff)

    while True:
        await trio.sleep(interval)
        try:
            pruned = await trio.to_thread.run_sync(prune)
        except STORE_ERRORS as exc:
            log.warning("cannot prune the event log: %s", exc)
        else:
            if pruned:
                log.debug("pruned %d relayed events", pruned)
