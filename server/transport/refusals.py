"""Refused device connections, reported where an operator looks without flooding the log.

The first refusal of a burst is reported at once, with what to change if it is wrong; the
refusals that follow within ``interval`` seconds are only counted, and one summary line per
interval reports them (by reason, and the busiest source addresses). A flood of thousands
of connections per second so costs a line every ``interval`` seconds. Sans-IO: time is
passed in; the transport's task logs the lines.
"""

from __future__ import annotations

from collections import Counter

#: Distinct source addresses remembered per interval for the summary; more are "others".
MAX_SOURCES_TRACKED = 1000
#: Busiest sources named in a summary.
TOP_SOURCES = 3


class RefusalLog:
    """Aggregates refusals into at most one log line per ``interval`` (plus the first)."""

    __slots__ = ("_by_reason", "_by_source", "_window_end", "interval", "total")

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("the refusal log interval must be positive")
        self.interval = interval
        #: Every refusal ever noted (monitoring).
        self.total = 0
        self._window_end: float | None = None
        self._by_reason: Counter[str] = Counter()
        self._by_source: Counter[str] = Counter()

    @property
    def deadline(self) -> float | None:
        """When :meth:`flush` is due (None: no refusal is waiting to be summarised and no
        interval is running)."""
        return self._window_end

    def note(self, now: float, transport: str, reason: str, source: str, detail: str) -> str | None:
        """Count one refusal. Returns the line to log now (the first refusal of a burst),
        or None when it will be part of the next summary."""
        self.total += 1
        if self._window_end is None:
            self._window_end = now + self.interval
            advice = f" ({detail})" if detail else ""
            return (
                f"refused {transport} device connection from {source}: {reason}{advice}; "
                f"further refusals are summarised every {self.interval:g} s"
            )
        self._by_reason[f"{transport}: {reason}"] += 1
        if source in self._by_source or len(self._by_source) < MAX_SOURCES_TRACKED:
            self._by_source[source] += 1
        else:
            self._by_source["others"] += 1
        return None

    def flush(self, now: float) -> str | None:
        """At or after :attr:`deadline`: the summary of the refusals counted since the last
        line (None if there were none; the burst is then over). Before it: None."""
        if self._window_end is None or now < self._window_end:
            return None
        count = sum(self._by_reason.values())
        if count == 0:
            self._window_end = None  # quiet for a whole interval: the next one is reported
            return None
        reasons = ", ".join(f"{n} {reason}" for reason, n in self._by_reason.most_common())
        top = ", ".join(f"{src} ({n})" for src, n in self._by_source.most_common(TOP_SOURCES))
        self._by_reason.clear()
        self._by_source.clear()
        self._window_end = now + self.interval
        return (
            f"refused {count} more device connections in the last {self.interval:g} s "
            f"({reasons}); most from {top}"
        )
