"""A count that only grows and that tasks can wait on: the engine's causal markers.

The OTA engine counts what it has finished handling (the kicks of a session's updater, the
release and flash events it watched); anyone who needs to know that the engine has acted on
something (a test proving that nothing was offered, an operator's tooling) waits for the
count to reach a value instead of sleeping and hoping the engine was quick enough.
"""

from __future__ import annotations

import trio


class Tally:
    """A non-decreasing count with :meth:`reached` to wait for a value (the event it
    waits on exists only while someone waits: one per live session's updater)."""

    __slots__ = ("_changed", "_value")

    def __init__(self) -> None:
        self._value = 0
        self._changed: trio.Event | None = None

    @property
    def value(self) -> int:
        """The count so far."""
        return self._value

    def advance_to(self, value: int) -> None:
        """Raise the count to ``value`` (a lower value changes nothing) and wake waiters."""
        if value > self._value:
            self._value = value
            changed = self._changed
            if changed is not None:
                self._changed = None
                changed.set()

    def add(self, count: int = 1) -> None:
        """Raise the count by ``count``."""
        self.advance_to(self._value + count)

    async def reached(self, value: int) -> None:
        """Return once the count is at least ``value`` (at once when it already is)."""
        while self._value < value:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
