"""A rollout's policy: its phases, success condition, thresholds, rate limit, back-off and
reboot timeout, validated, with a compact dict form for the store."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from otacore.rollout.criteria import Threshold
from otacore.rollout.errors import RolloutPlanError
from otacore.rollout.phases import PhasePlan

MINUTE_MS = 60_000
#: Default time a device has to come back (and report) after rebooting into new firmware.
DEFAULT_REBOOT_TIMEOUT_MS = 15 * MINUTE_MS


def _whole(value: object, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RolloutPlanError(f"{what} must be a whole number >= {minimum}, not {value!r}")
    return value


@dataclass(frozen=True)
class RateLimit:
    """At most ``base_per_minute`` new offers a minute, growing like AWS IoT's
    ``exponentialRate``: multiplied by ``increment_factor`` each time
    ``increase_after_notified`` devices were offered or ``increase_after_succeeded``
    succeeded since the last increase, up to ``max_per_minute``."""

    base_per_minute: int
    increment_factor: float = 1.0
    increase_after_notified: int | None = None
    increase_after_succeeded: int | None = None
    max_per_minute: int | None = None

    def __post_init__(self) -> None:
        _whole(self.base_per_minute, "the base rate (devices per minute)", minimum=1)
        factor = self.increment_factor
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not (
            1.0 <= factor <= 5.0
        ):
            raise RolloutPlanError(
                f"the rate's increment factor must be a number in [1, 5], not {factor!r}"
            )
        for name in ("increase_after_notified", "increase_after_succeeded"):
            value = getattr(self, name)
            if value is not None:
                _whole(value, name.replace("_", " "), minimum=1)
        if factor > 1 and self.increase_after_notified is None and (
            self.increase_after_succeeded is None
        ):
            raise RolloutPlanError(
                "a growing rate needs a criterion: increase after N offered or N succeeded"
            )
        if self.max_per_minute is not None:
            _whole(self.max_per_minute, "the maximum rate", minimum=self.base_per_minute)

    def grown(self, rate: int) -> int:
        """The rate after one increase (at least one more, capped at the maximum)."""
        bigger = max(rate + 1, math.ceil(rate * self.increment_factor))
        return bigger if self.max_per_minute is None else min(bigger, self.max_per_minute)

    def to_dict(self) -> dict[str, object]:
        """Compact form."""
        return {
            "base": self.base_per_minute,
            "factor": self.increment_factor,
            "after_notified": self.increase_after_notified,
            "after_succeeded": self.increase_after_succeeded,
            "max": self.max_per_minute,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RateLimit:
        """The inverse of :meth:`to_dict`."""
        try:
            return cls(
                data["base"], data["factor"], data["after_notified"],  # type: ignore[arg-type]
                data["after_succeeded"], data["max"],  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise RolloutPlanError(f"malformed rate limit {data!r}: missing {exc}") from None


@dataclass(frozen=True)
class Backoff:
    """Per-device back-off (NervesHub's "penalty box"): after every ``max_failures``
    failures a device gets no new offer for ``hold_ms``."""

    max_failures: int = 3
    hold_ms: int = 60 * MINUTE_MS

    def __post_init__(self) -> None:
        _whole(self.max_failures, "the failures before a hold", minimum=1)
        _whole(self.hold_ms, "the hold time (ms)", minimum=1)

    def to_dict(self) -> dict[str, object]:
        """Compact form."""
        return {"failures": self.max_failures, "hold_ms": self.hold_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Backoff:
        """The inverse of :meth:`to_dict`."""
        try:
            return cls(data["failures"], data["hold_ms"])  # type: ignore[arg-type]
        except KeyError as exc:
            raise RolloutPlanError(f"malformed back-off {data!r}: missing {exc}") from None


@dataclass(frozen=True)
class Policy:
    """Everything that decides a rollout's course besides its devices' outcomes.

    A phase (after the first) without a start time opens once the previous phase met its
    success condition (``success_percent`` of its devices succeeded; an empty phase meets
    it at once) and then ``phase_wait_ms`` passed. The rollout starts at ``start_at``
    (None: at its first tick).
    """

    plan: PhasePlan
    thresholds: tuple[Threshold, ...] = ()
    success_percent: float = 100.0
    phase_wait_ms: int = 0
    rate: RateLimit | None = None
    backoff: Backoff | None = field(default_factory=Backoff)
    reboot_timeout_ms: int = DEFAULT_REBOOT_TIMEOUT_MS
    start_at: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.plan, PhasePlan):
            raise RolloutPlanError("a policy needs a PhasePlan")
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        if not all(isinstance(t, Threshold) for t in self.thresholds):
            raise RolloutPlanError("thresholds must be Threshold objects")
        pct = self.success_percent
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 < pct <= 100:
            raise RolloutPlanError(f"the success percentage must be in (0, 100], not {pct!r}")
        _whole(self.phase_wait_ms, "the phase wait (ms)")
        _whole(self.reboot_timeout_ms, "the reboot timeout (ms)", minimum=1)
        if self.start_at is not None:
            _whole(self.start_at, "the start time (epoch ms)")

    @classmethod
    def particle_release(cls) -> Policy:
        """A Particle release: one phase with every device, no criteria, no rate, no hold."""
        return cls(PhasePlan.single(), backoff=None)

    def to_dict(self) -> dict[str, object]:
        """Compact msgpack/JSON-able form."""
        return {
            "plan": self.plan.to_dict(),
            "thresholds": [t.to_dict() for t in self.thresholds],
            "success_percent": self.success_percent,
            "phase_wait_ms": self.phase_wait_ms,
            "rate": None if self.rate is None else self.rate.to_dict(),
            "backoff": None if self.backoff is None else self.backoff.to_dict(),
            "reboot_timeout_ms": self.reboot_timeout_ms,
            "start_at": self.start_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Policy:
        """The inverse of :meth:`to_dict`."""
        try:
            rate = data["rate"]
            backoff = data["backoff"]
            return cls(
                plan=PhasePlan.from_dict(data["plan"]),  # type: ignore[arg-type]
                thresholds=tuple(Threshold.from_dict(t) for t in data["thresholds"]),  # type: ignore[attr-defined]
                success_percent=data["success_percent"],  # type: ignore[arg-type]
                phase_wait_ms=data["phase_wait_ms"],  # type: ignore[arg-type]
                rate=None if rate is None else RateLimit.from_dict(rate),  # type: ignore[arg-type]
                backoff=None if backoff is None else Backoff.from_dict(backoff),  # type: ignore[arg-type]
                reboot_timeout_ms=data["reboot_timeout_ms"],  # type: ignore[arg-type]
                start_at=data["start_at"],  # type: ignore[arg-type]
            )
        except (KeyError, TypeError) as exc:
            raise RolloutPlanError(f"malformed rollout policy: {exc}") from None
