"""Phase plans and each device's stable place in them.

A device's *position* is a number in [0, 1) drawn from BLAKE2b of (rollout id, device id):
it never changes, so a device keeps its phase between phases and across restarts, and a
device that joins the target set later falls into a phase by the same rule (issue 15;
the complaint "random samples change between phases").

Plans are cumulative, as ``--phases 10,50,100`` reads. Devices are placed by rank in
position order, exactly (phase k of a percent plan covers ``ceil(p_k * N / 100)`` of the N
target devices): see :mod:`otacore.rollout.placement`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from otacore.rollout.errors import RolloutPlanError

#: Most phases a plan may have (a plan is typed by an operator; 20 is already a lot).
MAX_PHASES = 20
_POSITION_SCALE = float(1 << 64)


def device_position(device_id: str, rollout_id: str) -> float:
    """The device's place in [0, 1) for this rollout: BLAKE2b-64 of both ids, scaled.

    The rollout id salts the hash, so each rollout draws an independent sample (a device
    is not always among the first) while staying fixed for the whole of one rollout.
    """
    return positions_of(rollout_id)(device_id)


def positions_of(rollout_id: str) -> Callable[[str], float]:
    """:func:`device_position` for one rollout, its salt computed once (placing 100,000
    devices hashes each of them)."""
    salt = hashlib.blake2b(rollout_id.encode(), digest_size=32).digest()  # any length id

    def position(device_id: str) -> float:
        digest = hashlib.blake2b(
            device_id.encode(), digest_size=8, key=salt, person=b"ota-phase"
        ).digest()
        return int.from_bytes(digest, "big") / _POSITION_SCALE

    return position


class PlanKind(StrEnum):
    """How a plan's phases are sized."""

    PERCENT = "percent"
    COUNT = "count"


@dataclass(frozen=True)
class Phase:
    """One phase: its cumulative size (percent, or count of devices; None: every device
    left) and an optional start time (epoch ms; None: when the previous phase succeeded)."""

    size: float | int | None
    start_at: int | None = None


@dataclass(frozen=True)
class PhasePlan:
    """An ordered, validated list of phases; build with :meth:`percentages` or :meth:`counts`."""

    kind: PlanKind
    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        _validate(self.kind, self.phases)

    @classmethod
    def percentages(
        cls, cumulative: Sequence[float], start_at: Sequence[int | None] | None = None
    ) -> PhasePlan:
        """A plan of cumulative percentages of the target set, e.g. ``(10, 50, 100)``."""
        starts = _starts(start_at, len(cumulative))
        pairs = zip(cumulative, starts, strict=True)
        return cls(PlanKind.PERCENT, tuple(Phase(p, s) for p, s in pairs))

    @classmethod
    def counts(
        cls,
        cumulative: Sequence[int],
        *,
        then_all: bool = False,
        start_at: Sequence[int | None] | None = None,
    ) -> PhasePlan:
        """A plan of cumulative device counts, e.g. ``(5, 50)``; ``then_all`` adds a last
        phase with every remaining device (else devices past the last count get no offer)."""
        sizes: list[int | None] = list(cumulative)
        if then_all:
            sizes.append(None)
        starts = _starts(start_at, len(sizes))
        return cls(PlanKind.COUNT, tuple(Phase(n, s) for n, s in zip(sizes, starts, strict=True)))

    @classmethod
    def single(cls) -> PhasePlan:
        """One phase with every device: a Particle release."""
        return cls.percentages((100,))

    @classmethod
    def parse(cls, text: str) -> PhasePlan:
        """A plan from an operator's text: ``"10,50,100"`` (percent; a trailing ``%``
        allowed) or ``"5,50,all"`` / ``"#5,#50"`` (counts)."""
        parts = [p.strip() for p in str(text).split(",")]
        if not parts or any(not p for p in parts):
            raise RolloutPlanError(
                f"phases {text!r}: give comma-separated cumulative percentages such as "
                "10,50,100, or counts such as #5,#50,all"
            )
        if parts[-1].lower() == "all" or all(p.startswith("#") for p in parts[:-1] or parts):
            then_all = parts[-1].lower() == "all"
            body = parts[:-1] if then_all else parts
            try:
                counts = [int(p.lstrip("#")) for p in body]
            except ValueError:
                raise RolloutPlanError(
                    f"phases {text!r}: counts must be whole numbers such as #5,#50,all"
                ) from None
            return cls.counts(counts, then_all=then_all)
        try:
            percents = [float(p.rstrip("%")) for p in parts]
        except ValueError:
            raise RolloutPlanError(
                f"phases {text!r}: percentages must be numbers such as 10,50,100"
            ) from None
        return cls.percentages(percents)

    def to_dict(self) -> dict[str, object]:
        """A compact, msgpack/JSON-able form."""
        return {
            "kind": self.kind.value,
            "sizes": [p.size for p in self.phases],
            "starts": [p.start_at for p in self.phases],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PhasePlan:
        """The inverse of :meth:`to_dict`."""
        try:
            kind = PlanKind(str(data["kind"]))
            sizes = list(data["sizes"])  # type: ignore[call-overload]
            starts = list(data["starts"])  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutPlanError(f"malformed phase plan {data!r}: {exc}") from None
        if len(sizes) != len(starts):
            raise RolloutPlanError("malformed phase plan: sizes and starts differ in length")
        pairs = zip(sizes, starts, strict=True)
        return cls(kind, tuple(Phase(size, start) for size, start in pairs))


def _starts(start_at: Sequence[int | None] | None, n: int) -> list[int | None]:
    if start_at is None:
        return [None] * n
    if len(start_at) != n:
        raise RolloutPlanError(f"{len(start_at)} start times given for {n} phases")
    return list(start_at)


def _validate(kind: PlanKind, phases: tuple[Phase, ...]) -> None:
    if not phases:
        raise RolloutPlanError("a phase plan needs at least one phase")
    if len(phases) > MAX_PHASES:
        raise RolloutPlanError(f"a phase plan has at most {MAX_PHASES} phases, not {len(phases)}")
    previous_size: float = 0.0
    previous_start: int | None = None
    for number, phase in enumerate(phases, start=1):
        size = phase.size
        if kind is PlanKind.PERCENT:
            if isinstance(size, bool) or not isinstance(size, int | float) or size != size:
                raise RolloutPlanError(f"phase {number}: a percentage must be a number")
            if not 0 < size <= 100:
                raise RolloutPlanError(f"phase {number}: {size}% is outside (0, 100]")
        elif size is None:
            if number != len(phases):
                raise RolloutPlanError("only the last phase of a count plan may be 'all'")
        elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise RolloutPlanError(f"phase {number}: a count must be a whole number >= 1")
        if size is not None:
            if size <= previous_size:
                raise RolloutPlanError(
                    f"phase {number}: sizes are cumulative and must increase "
                    f"({size} after {previous_size}); an equal size would be an empty phase"
                )
            previous_size = float(size)
        start = phase.start_at
        if start is not None:
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise RolloutPlanError(f"phase {number}: start time must be epoch milliseconds")
            if previous_start is not None and start < previous_start:
                raise RolloutPlanError(
                    f"phase {number}: starts before phase {number - 1} "
                    f"({start} < {previous_start} ms)"
                )
            previous_start = start
    if kind is PlanKind.PERCENT and phases[-1].size != 100:
        raise RolloutPlanError(
            f"the last phase must cover 100% of the target set, not {phases[-1].size}% "
            "(use counts to reach only some devices)"
        )
