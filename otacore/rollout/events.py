"""What the rollout state machine hands out: offer decisions and events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class State(StrEnum):
    """A rollout's state."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"


class Verdict(StrEnum):
    """The answer of ``may_offer`` / ``may_continue``; OFFER and CONTINUE allow."""

    OFFER = "offer"
    CONTINUE = "continue"
    NOT_TARGETED = "not_targeted"
    PHASE_NOT_OPEN = "phase_not_open"
    RATE_LIMITED = "rate_limited"
    HELD_OFF = "held_off"
    SCHEDULED = "scheduled"
    PAUSED = "paused"
    ABORTED = "aborted"
    OUTSIDE_WINDOW = "outside_window"
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"


@dataclass(frozen=True)
class Decision:
    """Whether to start (or continue) an offer, why not, and when to ask again.

    ``retry_at`` (epoch ms) is set when the answer will change by time alone (a scheduled
    start, a hold, the rate limit, a window); ``forced`` marks an offer allowed outside
    its maintenance window by the operator's force flag (the caller audit-logs it).
    """

    verdict: Verdict
    detail: str
    phase: int | None = None
    retry_at: int | None = None
    forced: bool = False

    @property
    def allowed(self) -> bool:
        """True for OFFER and CONTINUE."""
        return self.verdict in (Verdict.OFFER, Verdict.CONTINUE)


class EventKind(StrEnum):
    """Kinds of rollout events."""

    STARTED = "started"
    PHASE_STARTED = "phase_started"
    #: A phase met its success condition: the rollout advances past it.
    PHASE_ADVANCED = "phase_advanced"
    PAUSED = "paused"
    RESUMED = "resumed"
    ABORTED = "aborted"
    COMPLETED = "completed"
    THRESHOLD_CROSSED = "threshold_crossed"
    DEVICE_HELD = "device_held"
    DEVICE_TIMED_OUT = "device_timed_out"
    RATE_INCREASED = "rate_increased"


@dataclass(frozen=True)
class RolloutEvent:
    """One thing that happened: its kind, time, phase (0-based, or None), who caused it
    (an operator's subject, or ``"policy"``), a reason in words and details as data.
    An ABORTED event's ``data["discard"]`` lists the devices to tell to discard."""

    kind: EventKind
    at: int
    reason: str
    phase: int | None = None
    by: str = "policy"
    data: Mapping[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The event as data (for the event bus, the store, the API)."""
        return {
            "kind": self.kind.value,
            "at": self.at,
            "phase": self.phase,
            "by": self.by,
            "reason": self.reason,
            **({"data": dict(self.data)} if self.data else {}),
        }
