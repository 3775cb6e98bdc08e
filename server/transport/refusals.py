"""Refused device connections, reported where an operator looks without flooding the log.

The first refusal of a burst is reported at once, with what to change if it is wrong; the
refusals that follow within ``interval`` seconds are only counted, and one summary line per
interval reports them (by reason, and the busiest source addresses). A flood of thousands
of connections per second so costs a line every ``interval`` seconds. Sans-IO: time is
passed in; the transport's task logs the lines. The counting is
:class:`server.burst_log.BurstLog`'s, shared with the sign-in log.
"""

from __future__ import annotations

from server.burst_log import BurstLog


class RefusalLog:
    """Aggregates refusals into at most one log line per ``interval`` (plus the first)."""

    __slots__ = ("_burst",)

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("the refusal log interval must be positive")
        self._burst = BurstLog(interval)

    @property
    def interval(self) -> float:
        """Seconds between summary lines."""
        return self._burst.interval

    @property
    def total(self) -> int:
        """Every refusal ever noted (monitoring)."""
        return self._burst.total

    @property
    def deadline(self) -> float | None:
        """When :meth:`flush` is due (None: no refusal is waiting to be summarised and no
        interval is running)."""
        return self._burst.deadline

    def note(self, now: float, transport: str, reason: str, source: str, detail: str) -> str | None:
        """Count one refusal. Returns the line to log now (the first refusal of a burst),
        or None when it will be part of the next summary."""
        if not self._burst.note(now, f"{transport}: {reason}", source):
            return None
        advice = f" ({detail})" if detail else ""
        return (
            f"refused {transport} device connection from {source}: {reason}{advice}; "
            f"further refusals are summarised every {self.interval:g} s"
        )

    def flush(self, now: float) -> str | None:
        """At or after :attr:`deadline`: the summary of the refusals counted since the last
        line (None if there were none; the burst is then over). Before it: None."""
        summary = self._burst.flush(now)
        if summary is None:
            return None
        return (
            f"refused {summary.count} more device connections in the last {self.interval:g} s "
            f"({summary.reasons()}); most from {summary.sources()}"
        )
