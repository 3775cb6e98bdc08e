"""Failure thresholds that halt a rollout by themselves (issue 15; AWS ``abortCriteria``,
hawkBit's error condition, NervesHub's failure thresholds).

A threshold fires when, among the devices of its scope (one phase, or the whole rollout)
whose latest attempt finished (succeeded or failed), at least ``min_sample`` did and the
share whose latest outcome is one of ``kinds`` exceeds ``percent``. Evaluation is pure and
deterministic; the :class:`Crossing` names the scope, the counts per kind and the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from otacore.rollout.errors import RolloutCriteriaError
from otacore.rollout.outcomes import FAILURES, Counts, Outcome


class Action(StrEnum):
    """What a crossed threshold does."""

    PAUSE = "pause"  # an operator resumes
    ABORT = "abort"  # no new offers; transfers in progress are told to discard


class Scope(StrEnum):
    """What a threshold counts over."""

    PHASE = "phase"  # each opened phase separately
    ROLLOUT = "rollout"  # every target device


def parse_action(value: object) -> Action:
    """An :class:`Action` from ``pause`` or ``abort``."""
    try:
        return Action(str(value).lower())
    except ValueError:
        raise RolloutCriteriaError(f"on-failure action {value!r}: use pause or abort") from None


@dataclass(frozen=True)
class Threshold:
    """Fire ``action`` when more than ``percent`` % of at least ``min_sample`` finished
    devices of the scope failed with one of ``kinds``."""

    percent: float
    min_sample: int = 1
    action: Action = Action.PAUSE
    scope: Scope = Scope.PHASE
    kinds: frozenset[Outcome] = FAILURES

    def __post_init__(self) -> None:
        percent = self.percent
        if isinstance(percent, bool) or not isinstance(percent, int | float) or percent != percent:
            raise RolloutCriteriaError("a failure threshold's percentage must be a number")
        if not 0 <= percent < 100:
            raise RolloutCriteriaError(
                f"failure threshold {percent}% is outside [0, 100) (at 100 it could never fire)"
            )
        sample = self.min_sample
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
            raise RolloutCriteriaError("a minimum sample must be a whole number >= 1")
        object.__setattr__(self, "action", parse_action(self.action))
        try:
            object.__setattr__(self, "scope", Scope(self.scope))
        except ValueError:
            raise RolloutCriteriaError(f"scope {self.scope!r}: use phase or rollout") from None
        kinds = frozenset(Outcome(k) for k in self.kinds)
        if not kinds or not kinds <= FAILURES:
            names = ", ".join(sorted(k.value for k in FAILURES))
            raise RolloutCriteriaError(f"threshold kinds must be a non-empty subset of: {names}")
        object.__setattr__(self, "kinds", kinds)

    def describe(self) -> str:
        """The rule in words."""
        kinds = "any failure" if self.kinds == FAILURES else "/".join(sorted(self.kinds))
        return (
            f"{self.action.value} when {kinds} exceeds {self.percent:g}% of finished devices "
            f"per {self.scope.value} (minimum sample {self.min_sample})"
        )

    def to_dict(self) -> dict[str, object]:
        """Compact msgpack/JSON-able form."""
        return {
            "percent": self.percent,
            "min_sample": self.min_sample,
            "action": self.action.value,
            "scope": self.scope.value,
            "kinds": sorted(k.value for k in self.kinds),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Threshold:
        """The inverse of :meth:`to_dict`."""
        unknown = sorted(set(data) - {"percent", "min_sample", "action", "scope", "kinds"})
        if unknown:
            raise RolloutCriteriaError(
                f"malformed threshold: unknown field(s) {', '.join(map(str, unknown))}; "
                "known: percent, min_sample, action, scope, kinds"
            )
        try:
            return cls(
                percent=data["percent"],  # type: ignore[arg-type]
                min_sample=data["min_sample"],  # type: ignore[arg-type]
                action=Action(str(data["action"])),
                scope=Scope(str(data["scope"])),
                kinds=frozenset(Outcome(str(k)) for k in data["kinds"]),  # type: ignore[attr-defined]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutCriteriaError(f"malformed threshold {data!r}: {exc}") from None


@dataclass(frozen=True)
class Crossing:
    """A threshold that fired: where (phase index or None for the whole rollout), the
    failures by kind, the sample, and the threshold itself."""

    threshold_index: int
    threshold: Threshold
    phase: int | None
    failed_by_kind: Mapping[str, int]
    failed: int
    finished: int

    @property
    def percent(self) -> float:
        """The failed share in percent."""
        return 100.0 * self.failed / self.finished

    @property
    def reason(self) -> str:
        """A sentence an operator reads: which kinds, the counts, the threshold."""
        where = "the rollout" if self.phase is None else f"phase {self.phase + 1}"
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.failed_by_kind.items()) if n)
        return (
            f"{where}: {self.failed} of {self.finished} finished devices failed ({kinds}) = "
            f"{self.percent:.1f}% > {self.threshold.percent:g}% "
            f"(minimum sample {self.threshold.min_sample}); action {self.threshold.action.value}"
        )

    def to_dict(self) -> dict[str, object]:
        """The crossing as data (for an event or the API)."""
        return {
            "threshold": self.threshold_index,
            "phase": self.phase,
            "failed_by_kind": dict(self.failed_by_kind),
            "failed": self.failed,
            "finished": self.finished,
            "percent": round(self.percent, 3),
            "max_percent": self.threshold.percent,
            "min_sample": self.threshold.min_sample,
            "action": self.threshold.action.value,
        }


def check(
    index: int, threshold: Threshold, phase: int | None, counts: Counts, acknowledged: int = 0
) -> Crossing | None:
    """The crossing of one threshold over one scope's counts, or None.

    ``acknowledged`` is the failed count an operator resumed past: the threshold fires
    again only once more devices have failed than that.
    """
    finished = counts.finished
    if finished < threshold.min_sample:  # never below the minimum sample
        return None
    by_kind = {k.value: counts.by_status[k.value] for k in sorted(threshold.kinds)}
    failed = sum(by_kind.values())
    if failed <= acknowledged:
        return None
    if failed * 100 <= threshold.percent * finished:
        return None
    return Crossing(index, threshold, phase, by_kind, failed, finished)


def evaluate(
    thresholds: Sequence[Threshold],
    phase_counts: Sequence[Counts],
    total: Counts,
    acknowledged: Mapping[str, int] | None = None,
) -> list[Crossing]:
    """Every crossing, thresholds in order, phases in order; aborts first so an abort wins
    over a pause that fires at the same moment."""
    acks = acknowledged or {}
    found: list[Crossing] = []
    for index, threshold in enumerate(thresholds):
        scopes: Iterable[tuple[int | None, Counts]] = (
            [(None, total)] if threshold.scope is Scope.ROLLOUT else enumerate(phase_counts)
        )
        for phase, counts in scopes:
            crossing = check(index, threshold, phase, counts, acks.get(ack_key(index, phase), 0))
            if crossing is not None:
                found.append(crossing)
    return sorted(found, key=lambda c: c.threshold.action is not Action.ABORT)


def ack_key(index: int, phase: int | None) -> str:
    """The key of an acknowledged (resumed past) crossing: ``"<threshold>:<phase or *>"``."""
    return f"{index}:{'*' if phase is None else phase}"
