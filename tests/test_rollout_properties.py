"""Hypothesis properties of the rollout policy: phase membership is exact, monotone and
stable across restarts and changes of the target set, no offer after an abort, counts add
up, and thresholds never fire below their minimum sample."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.rollout import (
    FAILURES,
    Action,
    Backoff,
    DeviceProgress,
    EventKind,
    Outcome,
    PhasePlan,
    Policy,
    RateLimit,
    Rollout,
    RolloutStateError,
    Scope,
    State,
    Threshold,
    device_position,
)
from otacore.rollout.outcomes import count

MIN = 60_000
device_ids = st.lists(
    st.integers(0, 2**96 - 1).map(lambda n: f"{n:024x}"), min_size=1, max_size=60, unique=True
)


@st.composite
def percent_plans(draw: st.DrawFn) -> PhasePlan:
    inner = draw(st.lists(st.integers(1, 99), max_size=5, unique=True))
    return PhasePlan.percentages([*sorted(inner), 100])


@st.composite
def count_plans(draw: st.DrawFn) -> PhasePlan:
    sizes = sorted(draw(st.lists(st.integers(1, 80), min_size=1, max_size=4, unique=True)))
    return PhasePlan.counts(sizes, then_all=draw(st.booleans()))


def _exact_sizes(plan: PhasePlan, n: int) -> list[int]:
    """ceil(p_k * N / 100) for each cumulative percentage p_k, in exact arithmetic."""
    return [math.ceil(Fraction(repr(float(p.size))) * n / 100) for p in plan.phases]  # type: ignore[arg-type]


def _cumulative(rollout: Rollout, devices: list[str], phases: int) -> list[int]:
    placed = [rollout.phase_of(d) for d in devices]
    return [sum(1 for p in placed if p is not None and p <= k) for k in range(phases)]


@given(plan=percent_plans(), devices=device_ids, joiners=device_ids,
       rid=st.text(min_size=1, max_size=20))
@settings(max_examples=200, deadline=None)
def test_percent_membership_is_monotone_and_stable(
    plan: PhasePlan, devices: list[str], joiners: list[str], rid: str
) -> None:
    phases = len(plan.phases)
    rollout = Rollout(rid, Policy(plan), 0)
    rollout.set_targets(devices, 0)
    rollout.tick(0)  # starts: a percent plan places every phase at once
    # Exact: phases 1..k hold ceil(p_k * N) devices (at least one when p_k > 0).
    assert _cumulative(rollout, devices, phases) == _exact_sizes(plan, len(devices))
    # By rank: every device of phase k lies before every device of phase k + 1.
    by_rank = sorted(devices, key=lambda d: (device_position(d, rid), d))
    ranked_phases = [rollout.phase_of(d) for d in by_rank]
    assert ranked_phases == sorted(ranked_phases)  # type: ignore[type-var]
    before = {d: rollout.phase_of(d) for d in devices}
    # Stable across a restart.
    restored = Rollout.from_dict(rollout.to_dict(), devices, progress=rollout.devices)
    assert {d: restored.phase_of(d) for d in devices} == before
    # The target set grows: nobody moves, and the newcomers bring phases 1..k to at least
    # their exact share of the new N, no further: exactly that share, unless the devices
    # kept in phase k already go past it (ceilings of a larger N need not fit earlier
    # placements: 34% of 2 is 1 and 51% is 2, but of 3 both are 2).
    newcomers = [d for d in joiners if d not in before]
    grown = [*devices, *newcomers]
    restored.set_targets(grown, 1)
    assert {d: restored.phase_of(d) for d in devices} == before
    cumulative, kept = _cumulative(restored, grown, phases), 0
    for k, share in enumerate(_exact_sizes(plan, len(grown))):
        kept_here = sum(1 for p in before.values() if p == k)
        assert cumulative[k] == max(share, (cumulative[k - 1] if k else 0) + kept_here)
        kept += kept_here
    assert cumulative[-1] == len(grown)  # the last phase (100%) has every device
    # Monotone: phases 1..k only grow with the target set.
    assert all(new >= old for new, old in zip(cumulative, _cumulative(rollout, devices,
                                                                        phases), strict=True))
    # It shrinks: still nobody moves, and a leaver that comes back keeps its phase.
    placed = {d: restored.phase_of(d) for d in grown}
    restored.set_targets(grown[1:], 2)
    assert {d: restored.phase_of(d) for d in grown} == placed
    restored.set_targets(grown, 3)
    assert {d: restored.phase_of(d) for d in grown} == placed


@pytest.mark.parametrize(("percent", "n", "expected"), [
    (10, 20, 2), (10, 60, 6), (10, 1, 1), (1, 5, 1), (33.3, 1000, 333), (70.1, 1000, 701),
    (12.5, 8, 1), (50, 3, 2), (100, 7, 7),
])
def test_percent_phase_is_exactly_the_ceiling_of_its_share(
    percent: float, n: int, expected: int
) -> None:
    devices = [f"{i:024x}" for i in range(1, n + 1)]
    plan = PhasePlan.percentages((percent, 100) if percent < 100 else (100,))
    rollout = Rollout("exact", Policy(plan), 0)
    rollout.set_targets(devices, 0)
    assert rollout.members(0) == []  # placed when the rollout starts, not before
    rollout.tick(0)
    assert len(rollout.members(0)) == expected
    assert len(rollout.members(0)) + sum(len(rollout.members(k)) for k in
                                         range(1, len(plan.phases))) == n


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, int, object]]:
    """Operations on a rollout: outcomes of device i, ticks, pause, resume, abort, joins."""
    op = st.one_of(
        st.tuples(st.just("outcome"), st.integers(0, 59), st.sampled_from(list(Outcome))),
        st.tuples(st.just("tick"), st.integers(0, 0), st.none()),
        st.tuples(st.just("pause"), st.integers(0, 0), st.none()),
        st.tuples(st.just("resume"), st.integers(0, 0), st.none()),
        st.tuples(st.just("abort"), st.integers(0, 0), st.none()),
        st.tuples(st.just("join"), st.integers(0, 59), st.none()),
        st.tuples(st.just("restart"), st.integers(0, 0), st.none()),
    )
    return draw(st.lists(op, max_size=80))


@given(
    plan=st.one_of(percent_plans(), count_plans()),
    script=scripts(),
    percent=st.integers(0, 99),
    min_sample=st.integers(1, 10),
    action=st.sampled_from(list(Action)),
    scope=st.sampled_from(list(Scope)),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=150, deadline=None)
def test_random_histories_keep_the_invariants(
    plan: PhasePlan,
    script: list[tuple[str, int, object]],
    percent: int,
    min_sample: int,
    action: Action,
    scope: Scope,
    seed: int,
) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    devices = [f"{rng.getrandbits(96):024x}" for _ in range(60)]
    targets = set(devices[:40])
    policy = Policy(
        plan, thresholds=(Threshold(percent, min_sample, action, scope),),
        phase_wait_ms=rng.choice([0, MIN]), backoff=Backoff(2, 5 * MIN),
        rate=RateLimit(5, 2.0, increase_after_succeeded=3, max_per_minute=40),
        reboot_timeout_ms=3 * MIN,
    )
    rollout = Rollout("prop", policy, 0)
    rollout.set_targets(targets, 0)
    placements: dict[str, int] = {}
    rows: dict[str, list[object]] = {}  # what a caller stored of take_changed()
    aborted_at: int | None = None
    now = 0
    for name, index, outcome in script:
        now += rng.choice([1, 1000, MIN])
        device = devices[index]
        events = []
        if name == "outcome":
            if rollout.phase_of(device) is None or device not in targets:
                continue
            events = rollout.record_outcome(device, outcome, now)
        elif name == "tick":
            events = rollout.tick(now)
        elif name in ("pause", "resume", "abort"):
            try:
                events = getattr(rollout, name)("ops", now)
            except RolloutStateError:
                continue
        elif name == "join":
            targets.add(device)
            events = rollout.set_targets(targets, now)
        else:  # restart: resume exactly from the saved state and the saved devices
            saved = rollout.to_dict()
            new, changed = rollout.take_changed()
            assert set(new).isdisjoint(rows) and set(changed) <= set(rows)
            rows.update({d: p.to_list() for d, p in (new | changed).items()})
            rollout = Rollout.from_dict(
                saved, targets, progress={d: DeviceProgress.from_list(p) for d, p in
                                          rows.items()})
            assert rollout.to_dict() == saved
            assert rollout.devices == {d: DeviceProgress.from_list(p) for d, p in rows.items()}
        for event in events:
            if event.kind is EventKind.THRESHOLD_CROSSED:
                assert event.data["finished"] >= min_sample  # never below the sample
                assert event.data["failed"] * 100 > percent * event.data["finished"]
            if event.kind is EventKind.ABORTED and aborted_at is None:
                aborted_at = now
        if rollout.state is State.ABORTED:
            # Never an offer after an abort, whatever the device or the time.
            assert not any(rollout.may_offer(d, now + 10 * MIN).allowed for d in devices)
            assert not any(rollout.may_continue(d, now).allowed for d in devices)
        # A device's placement never changes.
        for d in targets:
            phase = rollout.phase_of(d)
            if phase is not None:
                assert placements.setdefault(d, phase) == phase
        # Counts add up: statuses are exclusive, per phase and in total.
        counts = rollout.counts(now)
        assert counts.total.members == len(targets)
        placed = sum(1 for d in targets if rollout.phase_of(d) is not None)
        assert sum(c.members for c in counts.phases) == placed
        for c in (*counts.phases, counts.total):
            assert c.held_off <= c.failed <= c.members
            assert c.finished == c.failed + c.by_status["succeeded"]
            assert c.failures_total >= c.failed
        assert counts.total.failed == sum(
            counts.total.by_status[k.value] for k in FAILURES
        )
        # The running tally equals a count from scratch.
        assert counts.total == count(targets, rollout.devices, now)
        for phase, phase_counts in enumerate(counts.phases):
            assert phase_counts == count(rollout.members(phase), rollout.devices, now)
    if aborted_at is not None:
        assert rollout.state is State.ABORTED


def test_phase_one_is_exact_and_lowest_ranked_on_large_id_sets() -> None:
    seed = random.SystemRandom().getrandbits(32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    n = 20_000
    devices = [f"{rng.getrandbits(96):024x}" for _ in range(n)]
    for percent in (1, 10, 50, 90):
        plan = PhasePlan.percentages((percent, 100))
        rid = f"r-{seed}"
        rollout = Rollout(rid, Policy(plan), 0)
        rollout.set_targets(devices, 0)
        rollout.tick(0)
        first = set(rollout.members(0))
        assert len(first) == math.ceil(percent * n / 100), (seed, percent)
        ranked = sorted(devices, key=lambda d: (device_position(d, rid), d))
        assert first == set(ranked[: len(first)]), (seed, percent)
