"""Bursts of like events (refused connections, failed sign-ins) in a few log lines.

The first event of a burst is reported at once; the events that follow within ``interval``
seconds are only counted, and one summary per interval reports them by reason and by their
busiest sources. A flood of thousands of events per second so costs a line every
``interval`` seconds, however many sources it comes from. Sans-IO: time is passed in; the
caller words the lines and logs them (and calls :meth:`BurstLog.flush` at
:attr:`BurstLog.deadline`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

#: Distinct sources remembered per interval for the summary; more are counted as "others".
MAX_SOURCES_TRACKED = 1000
#: Busiest sources named in a summary.
TOP_SOURCES = 3


@dataclass(frozen=True)
class BurstSummary:
    """The events of one interval after the first of a burst."""

    count: int
    #: (reason, events), most frequent first.
    by_reason: list[tuple[str, int]]
    #: (source, events) of the busiest sources, busiest first.
    top_sources: list[tuple[str, int]]

    def reasons(self) -> str:
        """``"12 reason a, 3 reason b"``."""
        return ", ".join(f"{n} {reason}" for reason, n in self.by_reason)

    def sources(self) -> str:
        """``"192.0.2.1 (10), 192.0.2.7 (2)"``."""
        return ", ".join(f"{source} ({n})" for source, n in self.top_sources)


class BurstLog:
    """Counts events into at most one summary per ``interval`` (plus the first event)."""

    __slots__ = ("_by_reason", "_by_source", "_window_end", "interval", "total")

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("the log summary interval must be positive")
        self.interval = interval
        #: Every event ever noted (monitoring).
        self.total = 0
        self._window_end: float | None = None
        self._by_reason: Counter[str] = Counter()
        self._by_source: Counter[str] = Counter()

    @property
    def deadline(self) -> float | None:
        """When :meth:`flush` is due (None: no event is waiting to be summarised and no
        interval is running)."""
        return self._window_end

    def note(self, now: float, reason: str, source: str) -> bool:
        """Count one event. True when it is the first of a burst (the caller logs it now);
        False when it will be part of the next summary."""
        self.total += 1
        if self._window_end is None:
            self._window_end = now + self.interval
            return True
        self._by_reason[reason] += 1
        if source in self._by_source or len(self._by_source) < MAX_SOURCES_TRACKED:
            self._by_source[source] += 1
        else:
            self._by_source["others"] += 1
        return False

    def flush(self, now: float) -> BurstSummary | None:
        """At or after :attr:`deadline`: the events counted since the last line (None if
        there were none; the burst is then over). Before it: None."""
        if self._window_end is None or now < self._window_end:
            return None
        count = sum(self._by_reason.values())
        if count == 0:
            self._window_end = None  # quiet for a whole interval: the next event is reported
            return None
        summary = BurstSummary(count, self._by_reason.most_common(),
                               self._by_source.most_common(TOP_SOURCES))
        self._by_reason.clear()
        self._by_source.clear()
        self._window_end = now + self.interval
        return summary
