"""Exact placement of a rollout's target devices into its phases.

Both kinds of plan place by *rank*: the unplaced target devices, ordered by their stable
position (:func:`~otacore.rollout.phases.device_position`, then id), fill the phases in
order until each phase's cumulative size is reached. A count plan's sizes are its counts;
a percent plan is a count plan whose counts follow the target set: phase k covers exactly
``ceil(p_k * N / 100)`` of the N target devices (at least one when N > 0), so "10% of 20
devices" is 2 devices, never 0 or 5 (a position threshold would draw a binomial sample).

Placements are kept (by :class:`~otacore.rollout.rollout.Rollout`, saved by its caller):
a placed device keeps its phase between phases, across restarts and whatever the target
set does later. When the target set grows, the devices placed so far keep their phases
and the newcomers, by rank among themselves, fill phases 1..k up to their exact share of
the new N (earlier phases first). That is exact unless the devices kept in phase k already
go past the share (ceilings of a larger N need not fit earlier placements: 34% of 2
devices is 1 and 51% is 2, of 3 both are 2); nobody is moved to make it exact. When the
set shrinks, nobody moves either (a phase may then hold more than its share of the
smaller N; a device that leaves and comes back keeps its phase).

When placement happens: a count plan places a phase's devices when the phase opens (its
count is of devices then in the target set); a percent plan places every phase when the
rollout starts, so each device's phase is known (and stored) from then on, and an offer
decision for one device needs only that device's saved placement.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from fractions import Fraction

from otacore.rollout.phases import PhasePlan, PlanKind


def phase_sizes(plan: PhasePlan, targets: int) -> list[int | None]:
    """Each phase's cumulative size in devices for a target set of ``targets`` devices:
    a count plan's counts (None: every device left), a percent plan's exact shares
    ``ceil(p * N / 100)``."""
    if plan.kind is PlanKind.COUNT:
        return [None if p.size is None else int(p.size) for p in plan.phases]
    # The percentage as the operator wrote it (repr: the shortest exact decimal), so
    # 70.1% of 1000 is 701, not 702 through binary rounding.
    return [math.ceil(Fraction(repr(float(p.size or 0))) * targets / 100) for p in plan.phases]


def phases_to_place(plan: PhasePlan, opened: int) -> int:
    """How many phases (from the first) have their devices placed once ``opened`` phases
    opened: none before the start; then a percent plan's all, a count plan's opened."""
    if opened == 0:
        return 0
    return len(plan.phases) if plan.kind is PlanKind.PERCENT else opened


def opened_phases_full(plan: PhasePlan, opened: int, placed: Sequence[int]) -> bool:
    """True when a count plan's opened phases hold their counts (``placed``: target
    devices placed in each phase, from the first), so a device not placed yet cannot be
    placed until the next phase opens (a count does not follow the target set; a percent
    plan's shares do, and an ``all`` phase takes every device: both answer False)."""
    if plan.kind is not PlanKind.COUNT or opened == 0:
        return False
    cumulative = 0
    for index, size in enumerate(phase_sizes(plan, 0)[:opened]):
        cumulative += placed[index] if index < len(placed) else 0
        if size is None or cumulative < size:
            return False
    return True


def place(
    plan: PhasePlan,
    opened: int,
    targets: Collection[str],
    placed: Mapping[str, int],
    position: Callable[[str], float],
) -> dict[str, int]:
    """New placements (device -> 0-based phase) of the unplaced ``targets``, given the
    ``placed`` devices (targets or not; only targets count toward a phase's size) and
    ``opened`` phases; see the module docstring for the rule. Hashes positions only when
    some phase has room, so a rollout whose phases are full costs O(targets) set lookups."""
    filled = phases_to_place(plan, opened)
    if filled == 0:
        return {}
    per_phase = Counter(placed[d] for d in targets if d in placed)
    unplaced = [d for d in targets if d not in placed]
    if not unplaced:
        return {}
    sizes = phase_sizes(plan, len(targets))
    rooms: list[int] = []
    cumulative = 0  # placed targets in phases up to this one, newcomers included
    for index in range(filled):
        cumulative += per_phase[index]
        size = sizes[index]
        left = len(unplaced) - sum(rooms)
        room = left if size is None else min(left, max(0, size - cumulative))
        rooms.append(room)
        cumulative += room
    wanted = sum(rooms)
    if wanted == 0:
        return {}
    ranked = heapq.nsmallest(wanted, unplaced, key=lambda d: (position(d), d))
    new: dict[str, int] = {}
    cursor = 0
    for index, room in enumerate(rooms):
        for device in ranked[cursor : cursor + room]:
            new[device] = index
        cursor += room
    return new
