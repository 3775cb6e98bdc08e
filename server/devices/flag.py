"""A one-shot flag that costs a trio.Event only while someone waits on it.

A live session keeps a few "has this happened yet" markers (its Describe recorded, its
device's OTA memory loaded, an update result seen). Each used to be a ``trio.Event``: about
300 bytes apiece with the set of waiting tasks, per idle session, although nearly always
nobody waits. :class:`Flag` has the same ``set`` / ``is_set`` / ``wait`` API and makes the
event only for a waiter.
"""

from __future__ import annotations

import trio


class Flag:
    """Set once, never cleared; ``wait()`` returns once it is set (at once if it is)."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: trio.Event | None = None

    def is_set(self) -> bool:
        """True once :meth:`set` was called."""
        return self._set

    def set(self) -> None:
        """Set the flag and wake every waiter (idempotent)."""
        self._set = True
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def wait(self) -> None:
        """Return once the flag is set (a checkpoint either way, as trio.Event.wait)."""
        if self._set:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()
