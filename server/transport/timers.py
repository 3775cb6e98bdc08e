"""One timer structure per process for the device sessions' deadlines.

Every live session used to run a task of its own that slept until its CoAP link's next
deadline (a CON's retransmission, RFC 7252 4.2), woken by an event each time the link
changed: a task, a cancel scope and an event per session, and two task switches per message.
:class:`ProcessTimers` is instead one heap of ``(deadline, sequence, owner)`` served by one
task. Arming is O(log n) and cancelling is lazy: an owner keeps the deadline it is armed for
(:attr:`Timed.timer_at`); a heap entry that no longer matches it is stale and skipped when
it reaches the top, and the heap is rebuilt without stale entries when they outnumber the
live ones. When a deadline falls due the serving task calls the owner's
:meth:`Timed.on_deadline` synchronously: it must not block (it may start a task to send).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import Protocol

import trio

log = logging.getLogger("otacloud.devices")

#: Stale heap entries tolerated beyond the live ones before the heap is rebuilt.
_COMPACT_SLACK = 64


class Timed(Protocol):
    """What :class:`ProcessTimers` calls back (a session handler)."""

    #: The deadline (trio clock) this owner is armed for; None when disarmed. Written by
    #: :class:`ProcessTimers` only.
    timer_at: float | None

    def on_deadline(self, now: float) -> None:
        """The armed deadline has come (``now`` >= it); must not block."""
        ...


class ProcessTimers:
    """A heap of deadlines with lazy cancellation, served by :meth:`run` (one task)."""

    __slots__ = ("_armed", "_heap", "_scope", "_sequence", "fired")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timed]] = []
        self._sequence = itertools.count()
        #: Owners armed right now (the heap may hold more entries: stale ones).
        self._armed = 0
        #: The serving task's sleep, moved earlier when an earlier deadline is armed.
        self._scope: trio.CancelScope | None = None
        #: Deadlines served so far (for tests and monitoring).
        self.fired = 0

    def __len__(self) -> int:
        """Owners armed right now."""
        return self._armed

    def arm(self, owner: Timed, deadline: float | None) -> None:
        """Call ``owner.on_deadline`` at ``deadline`` (trio clock) instead of at any
        deadline armed before; None disarms it."""
        current = owner.timer_at
        if deadline == current:
            return
        if deadline is None:
            owner.timer_at = None
            self._armed -= 1
            return
        if current is None:
            self._armed += 1
        owner.timer_at = deadline
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._sequence), owner))
        if len(heap) > 2 * self._armed + _COMPACT_SLACK:
            self._compact()
        scope = self._scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    def disarm(self, owner: Timed) -> None:
        """Forget ``owner``'s deadline, if any (its heap entry goes stale)."""
        self.arm(owner, None)

    def _compact(self) -> None:
        """Drop stale entries (and duplicates of a live one)."""
        live: dict[int, tuple[float, int, Timed]] = {}
        for entry in self._heap:
            deadline, _, owner = entry
            if owner.timer_at == deadline and id(owner) not in live:
                live[id(owner)] = entry
        self._heap = list(live.values())
        heapq.heapify(self._heap)

    def fire_due(self, now: float) -> int:
        """Call back every owner whose deadline is at or before ``now``; how many."""
        heap = self._heap
        fired = 0
        while heap and heap[0][0] <= now:
            deadline, _, owner = heapq.heappop(heap)
            if owner.timer_at != deadline:
                continue  # stale: re-armed or disarmed since
            owner.timer_at = None
            self._armed -= 1
            fired += 1
            try:
                owner.on_deadline(now)
            except Exception:  # one session's bug must not stop every session's timers
                log.exception("deadline of %r failed", owner)
        self.fired += fired
        return fired

    @property
    def next_deadline(self) -> float:
        """The earliest deadline in the heap (maybe stale), or +inf."""
        return self._heap[0][0] if self._heap else math.inf

    async def run(self) -> None:
        """Serve the deadlines until cancelled (one task per process)."""
        while True:
            self.fire_due(trio.current_time())
            with trio.CancelScope(deadline=self.next_deadline) as scope:
                self._scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._scope = None
