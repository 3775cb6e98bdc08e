"""The OTA memory a session's presence write read, handed to that session's updater.

A session's first store write marks its device online (``PresenceService.device_online``).
That transaction reads the device's OTA memory as well (one more statement in a transaction
that runs anyway), and leaves it here under the session's presence token; the session's
updater takes it (``OtaEngine.load_memory``) instead of reading the store again: one
worker-thread hop fewer per session. The memory is read after the session took the device's
presence in that same transaction, so it is what a read at the updater's start would see,
except for a change committed in between: a write by an older session of the device that is
still ending, or an operator's flash request forgetting refused images (its event then
finds no memory to clear yet). A separate read has the same race over its own thread hop;
this one spans the presence commit and one scheduling round.

Entries live from the presence write to the updater's first step (the next scheduling tick):
the table is bounded (the oldest are dropped first), and the session's end drops its entry;
an updater that finds none reads the store as before.
"""

from __future__ import annotations

from server.store.tx_ota import OtaMemoryRecord

#: Entries held at most: sessions between their presence write and their updater's start.
MAX_HANDED_OFF = 8192


class MemoryHandOff:
    """Presence token -> the OTA memory its presence write read (bounded, take-once)."""

    __slots__ = ("_capacity", "_entries")

    def __init__(self, capacity: int = MAX_HANDED_OFF) -> None:
        if capacity < 1:
            raise ValueError("the hand-off capacity must be at least 1")
        self._capacity = capacity
        self._entries: dict[str, OtaMemoryRecord] = {}

    def put(self, session: str, memory: OtaMemoryRecord) -> None:
        """Leave ``memory`` for the session named ``session`` (drops the oldest when full)."""
        self._entries.pop(session, None)
        while len(self._entries) >= self._capacity:
            del self._entries[next(iter(self._entries))]
        self._entries[session] = memory

    def take(self, session: str, device_id: str) -> OtaMemoryRecord | None:
        """The memory left for ``session`` if it is ``device_id``'s, removed; None when
        there is none (the caller reads the store)."""
        memory = self._entries.pop(session, None)
        if memory is None or memory.device_id != device_id:
            return None
        return memory

    def drop(self, session: str) -> None:
        """The session ended: forget what was left for it."""
        self._entries.pop(session, None)

    def __len__(self) -> int:
        return len(self._entries)
