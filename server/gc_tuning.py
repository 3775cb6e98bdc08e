"""How a server process tunes CPython's cyclic garbage collector.

Measured with ``bench/sessions/plane_ping_cost.py`` (a real ``ota server``, TLS sessions
answering CoAP pings): with CPython's default thresholds (700, 10, 10) the server's CPU per
keep-alive ping grew with the number of sessions held (332 us at 500 sessions, 460 us at
2,000 on a busy 2-core machine), and a census of what each collection promoted showed why.
Each message wakes a session's reader, writer and timer tasks; the coroutines, cancel scopes
and events they then suspend in are new objects that live until the device's next message,
seconds later. They outlive the young generations, so every ping feeds the collector
objects that survive, and the collections that follow scan a heap that grows with the
sessions. With a first threshold of 50,000 the young objects of many pings die by reference
counting before any collection looks at them: 267-278 us per ping at both 500 and 2,000
sessions, with no collection at all during 10,000 pings. Objects made before serving
(modules, configuration, caches) are moved out of the collector's sight with
``gc.freeze()``: they are never garbage.

Sessions as records (issue 14) remove the task trees themselves; this is the setting for
the objects that remain.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from otacore.errors import ValidationError


@dataclass(frozen=True)
class CollectorSettings:
    """The cyclic garbage collector's thresholds in a server process (``gc.set_threshold``)."""

    #: Net container allocations between young collections (CPython's default: 700; a
    #: higher value lets the objects of many device messages die before a collection).
    young_threshold: int = 50_000
    #: Young collections between middle-generation collections (default 10).
    middle_threshold: int = 10
    #: Middle collections between full collections (default 10; CPython also waits until
    #: objects pending promotion reach 25% of the old generation).
    old_threshold: int = 10
    #: ``gc.freeze()`` once the process serves: what start-up made is never scanned again.
    freeze_at_start: bool = True

    def __post_init__(self) -> None:
        # gc.set_threshold(0, ...) turns the collector off: cyclic garbage would never be freed.
        for name in ("young_threshold", "middle_threshold", "old_threshold"):
            value = getattr(self, name)
            if value < 1:
                raise ValidationError(f"{name} must be at least 1, not {value}")

    def apply_thresholds(self) -> None:
        """Set this process's collector thresholds."""
        gc.set_threshold(self.young_threshold, self.middle_threshold, self.old_threshold)

    def started(self) -> str:
        """The process finished starting: freeze what exists (when configured). Returns the
        collector's state as read back from ``gc``, for the log."""
        if self.freeze_at_start:
            gc.collect()  # free start-up garbage first: frozen objects are never freed
            gc.freeze()
        return collector_state()


def collector_state() -> str:
    """This process's collector thresholds and frozen objects, read from ``gc``."""
    young, middle, old = gc.get_threshold()
    return (f"garbage collector thresholds {young}/{middle}/{old}, "
            f"{gc.get_freeze_count()} start-up objects frozen")
