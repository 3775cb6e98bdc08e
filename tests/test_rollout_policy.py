"""Tests for otacore.rollout: phase plans, thresholds, policy validation and the state machine
(phases, thresholds, back-off, reboot timeouts, rate limits, pause/resume/abort, restore)."""

from __future__ import annotations

import json
import re

import msgpack
import pytest

from otacore.errors import ConflictError, ValidationError
from otacore.precedence import DeviceTargeting, ProductReleases
from otacore.rollout import (
    Action,
    Backoff,
    DeviceProgress,
    EventKind,
    MaintenanceWindow,
    Outcome,
    PhasePlan,
    Policy,
    RateLimit,
    Rollout,
    RolloutCriteriaError,
    RolloutFormatError,
    RolloutOutcomeError,
    RolloutPlanError,
    RolloutStateError,
    Scope,
    State,
    Threshold,
    Verdict,
    device_position,
)
from otacore.rollout.phases import PlanKind
from otacore.rollout.placement import opened_phases_full
from otacore.rollout.targets import RolloutScope

MIN = 60_000
DEVICES = [f"{i:024x}" for i in range(1, 61)]


def started(policy: Policy, devices: list[str] = DEVICES, rid: str = "r1") -> Rollout:
    rollout = Rollout(rid, policy, 0)
    rollout.set_targets(devices, 0)
    rollout.tick(0)
    return rollout


def kinds(events: list) -> list[EventKind]:
    return [e.kind for e in events]


def offerable(rollout: Rollout, now: int) -> list[str]:
    return sorted(d for d in rollout.targets if rollout.may_offer(d, now).allowed)


def deliver(rollout: Rollout, devices: list[str], final: Outcome, now: int) -> list:
    events: list = []
    for device in devices:
        events += rollout.record_outcome(device, Outcome.OFFERED, now)
        events += rollout.record_outcome(device, Outcome.DOWNLOADING, now)
        events += rollout.record_outcome(device, final, now)
    return events


# --- plans ------------------------------------------------------------------------------


def test_parse_percent_and_count_plans() -> None:
    plan = PhasePlan.parse("10, 50%,100")
    assert plan.kind is PlanKind.PERCENT
    assert [p.size for p in plan.phases] == [10.0, 50.0, 100.0]
    counts = PhasePlan.parse("#5,#20,all")
    assert counts.kind is PlanKind.COUNT
    assert [p.size for p in counts.phases] == [5, 20, None]
    assert PhasePlan.parse("#3").phases[0].size == 3
    assert PhasePlan.from_dict(plan.to_dict()) == plan
    assert PhasePlan.from_dict(json.loads(json.dumps(counts.to_dict()))) == counts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10,50", "last phase must cover 100%"),
        ("50,10,100", "must increase"),
        ("10,10,100", "empty phase"),
        ("0,100", "outside (0, 100]"),
        ("10,150", "outside (0, 100]"),
        ("ten,100", "must be numbers"),
        ("10,,100", "comma-separated"),
        ("#5,#5", "must increase"),
        ("#0,all", ">= 1"),
        ("#x,all", "whole numbers"),
        (",".join(str(i) for i in range(1, 30)) + ",100", "at most 20 phases"),
    ],
)
def test_bad_plans_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(RolloutPlanError, match=re.escape(message)):
        PhasePlan.parse(text)
    assert issubclass(RolloutPlanError, ValidationError)


def test_phase_start_times_must_not_go_backwards() -> None:
    with pytest.raises(RolloutPlanError, match="starts before phase 1"):
        PhasePlan.percentages((10, 100), start_at=(5000, 1000))
    with pytest.raises(RolloutPlanError, match="2 start times given for 3 phases"):
        PhasePlan.percentages((10, 50, 100), start_at=(1, 2))


def test_device_position_is_stable_and_salted_by_rollout() -> None:
    device = DEVICES[0]
    assert device_position(device, "r1") == device_position(device, "r1")
    assert 0 <= device_position(device, "r1") < 1
    firsts = {device_position(d, "r1") < 0.5 for d in DEVICES}
    assert firsts == {True, False}
    # Another rollout draws another sample.
    other = [device_position(d, "r2") for d in DEVICES]
    assert [device_position(d, "r1") for d in DEVICES] != other


# --- thresholds and policy validation ---------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"percent": 100}, "outside"),
        ({"percent": -1}, "outside"),
        ({"percent": "20"}, "must be a number"),
        ({"percent": 20, "min_sample": 0}, ">= 1"),
        ({"percent": 20, "action": "explode"}, "use pause or abort"),
        ({"percent": 20, "scope": "galaxy"}, "use phase or rollout"),
        ({"percent": 20, "kinds": frozenset({Outcome.SUCCEEDED})}, "subset"),
    ],
)
def test_bad_thresholds_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(RolloutCriteriaError, match=message):
        Threshold(**kwargs)


def test_bad_policies_are_refused() -> None:
    plan = PhasePlan.single()
    with pytest.raises(RolloutPlanError, match="success percentage"):
        Policy(plan, success_percent=0)
    with pytest.raises(RolloutPlanError, match="increment factor"):
        RateLimit(10, increment_factor=9)
    with pytest.raises(RolloutPlanError, match="needs a criterion"):
        RateLimit(10, increment_factor=2)
    with pytest.raises(RolloutPlanError, match="maximum rate"):
        RateLimit(10, max_per_minute=5)
    with pytest.raises(RolloutPlanError, match="failures before a hold"):
        Backoff(0)
    with pytest.raises(RolloutPlanError, match="reboot timeout"):
        Policy(plan, reboot_timeout_ms=0)


# --- the state machine ------------------------------------------------------------------


def test_particle_release_is_one_phase_with_every_device() -> None:
    rollout = Rollout.particle_release("rel-7", 0)
    rollout.set_targets(DEVICES, 0)
    assert rollout.may_offer(DEVICES[0], 0).verdict is Verdict.SCHEDULED
    assert kinds(rollout.tick(0)) == [EventKind.STARTED, EventKind.PHASE_STARTED]
    assert offerable(rollout, 1) == sorted(DEVICES)
    deliver(rollout, DEVICES[:59], Outcome.SUCCEEDED, 2)
    # A failure does not halt a Particle release (no criteria) nor hold the device.
    assert kinds(deliver(rollout, DEVICES[59:], Outcome.ROLLED_BACK, 3)) == []
    assert rollout.state is State.RUNNING
    assert rollout.may_offer(DEVICES[59], 4).allowed
    events = deliver(rollout, DEVICES[59:], Outcome.SUCCEEDED, 5)
    assert kinds(events) == [EventKind.PHASE_ADVANCED, EventKind.COMPLETED]
    assert rollout.state is State.COMPLETED


def test_bad_release_aborts_after_the_first_phase_and_names_the_rollbacks() -> None:
    policy = Policy(
        PhasePlan.parse("10,50,100"), thresholds=(Threshold(20, 3, Action.ABORT),)
    )
    rollout = started(policy)
    first = offerable(rollout, 1)
    assert first == sorted(rollout.members(0)) and 2 <= len(first) <= 12
    for device in first:
        rollout.record_outcome(device, Outcome.OFFERED, 1)
    events = []
    for device in first[:3]:
        events += rollout.record_outcome(device, Outcome.ROLLED_BACK, 2)
    assert kinds(events) == [EventKind.THRESHOLD_CROSSED, EventKind.ABORTED]
    abort = events[-1]
    assert "3 rolled_back" in abort.reason and "> 20%" in abort.reason
    assert abort.data["failed_by_kind"]["rolled_back"] == 3
    # Devices mid-transfer are told to discard; nobody gets a new offer; transfers stop.
    assert abort.data["discard"] == first[3:]
    assert rollout.state is State.ABORTED
    assert offerable(rollout, 3) == []
    assert rollout.may_continue(first[3], 3).verdict is Verdict.ABORTED
    # Later phases never opened; later reports still count.
    assert len(rollout.opened_at) == 1
    rollout.record_outcome(first[3], Outcome.ROLLED_BACK, 4)
    assert rollout.counts(4).phases[0].by_status["rolled_back"] == 4
    with pytest.raises(RolloutStateError, match="already aborted"):
        rollout.abort("ops", 5)


def test_threshold_never_fires_below_the_minimum_sample() -> None:
    policy = Policy(PhasePlan.single(), thresholds=(Threshold(10, 5, Action.PAUSE),))
    rollout = started(policy)
    events = deliver(rollout, DEVICES[:4], Outcome.IMAGE_REFUSED, 1)
    assert EventKind.THRESHOLD_CROSSED not in kinds(events)
    events = deliver(rollout, DEVICES[4:5], Outcome.SUCCEEDED, 2)
    assert kinds(events) == [EventKind.THRESHOLD_CROSSED, EventKind.PAUSED]
    assert "4 image_refused" in events[0].reason and "80.0%" in events[0].reason


def test_good_release_advances_phase_by_phase_with_a_wait_and_completes() -> None:
    policy = Policy(PhasePlan.parse("10,50,100"), phase_wait_ms=5 * MIN,
                    thresholds=(Threshold(20, 1, Action.ABORT),))
    rollout = started(policy)
    now = 1
    for phase in range(3):
        batch = offerable(rollout, now)
        assert set(batch) == set(rollout.members(phase))
        events = deliver(rollout, batch, Outcome.SUCCEEDED, now)
        if phase < 2:
            assert kinds(events)[-1] is EventKind.PHASE_ADVANCED
            assert rollout.tick(now + 5 * MIN - 1) == []  # the phase wait
            now += 5 * MIN
            assert kinds(rollout.tick(now)) == [EventKind.PHASE_STARTED]
    assert rollout.state is State.COMPLETED
    total = rollout.counts(now).total
    assert total.by_status["succeeded"] == 60 == total.members


def test_phase_with_a_start_time_opens_then() -> None:
    plan = PhasePlan.percentages((10, 100), start_at=(None, 10 * MIN))
    rollout = started(Policy(plan))
    deliver(rollout, offerable(rollout, 1), Outcome.SUCCEEDED, 1)
    later = sorted(rollout.members(1))[0]
    decision = rollout.may_offer(later, 2)
    assert decision.verdict is Verdict.PHASE_NOT_OPEN and decision.retry_at == 10 * MIN
    assert kinds(rollout.tick(10 * MIN)) == [EventKind.PHASE_STARTED]
    assert rollout.may_offer(later, 10 * MIN).allowed


def test_scheduled_start() -> None:
    rollout = Rollout("r1", Policy(PhasePlan.single(), start_at=30 * MIN), 0)
    rollout.set_targets(DEVICES, 0)
    assert rollout.tick(29 * MIN) == []
    assert rollout.may_offer(DEVICES[0], 29 * MIN).retry_at == 30 * MIN
    assert kinds(rollout.tick(30 * MIN)) == [EventKind.STARTED, EventKind.PHASE_STARTED]


def test_first_phase_start_time_schedules_the_rollout() -> None:
    plan = PhasePlan.percentages((50, 100), start_at=(20 * MIN, 40 * MIN))
    rollout = Rollout("r1", Policy(plan), 0)
    rollout.set_targets(DEVICES, 0)
    assert rollout.tick(20 * MIN - 1) == [] and rollout.state is State.SCHEDULED
    assert kinds(rollout.tick(20 * MIN)) == [EventKind.STARTED, EventKind.PHASE_STARTED]
    assert kinds(rollout.tick(40 * MIN)) == [EventKind.PHASE_STARTED]


def test_count_plan_places_lowest_positions_and_keeps_places_for_newcomers() -> None:
    rollout = started(Policy(PhasePlan.counts((5, 20), then_all=True)), DEVICES[:40])
    first = rollout.members(0)
    by_position = sorted(DEVICES[:40], key=lambda d: rollout.position(d))
    assert sorted(first) == sorted(by_position[:5])
    # A newcomer with a position lower than phase 1's does not displace anyone.
    newcomer = min(DEVICES[40:], key=lambda d: rollout.position(d))
    rollout.set_targets([*DEVICES[:40], newcomer], 1)
    assert sorted(rollout.members(0)) == sorted(first)
    assert rollout.phase_of(newcomer) is None
    deliver(rollout, first, Outcome.SUCCEEDED, 2)
    assert len(rollout.members(1)) == 15 and newcomer in rollout.members(1)
    deliver(rollout, rollout.members(1), Outcome.SUCCEEDED, 3)
    assert len(rollout.members(2)) == 41 - 20
    assert rollout.members(0) and sorted(rollout.members(0)) == sorted(first)


def test_percent_plan_newcomers_fill_each_phase_to_its_exact_share() -> None:
    rollout = started(Policy(PhasePlan.parse("50,100")), DEVICES[:30])
    first = sorted(rollout.members(0))
    assert len(first) == 15 and len(rollout.members(1)) == 15
    newcomer = DEVICES[30]
    assert rollout.may_offer(newcomer, 1).verdict is Verdict.NOT_TARGETED
    # 31 targets: phase 1 is ceil(15.5) = 16 devices; the newcomer is the only one
    # unplaced, so it takes the place, whatever its position; nobody moves.
    rollout.set_targets([*DEVICES[:30], newcomer], 1)
    assert rollout.phase_of(newcomer) == 0 and rollout.may_offer(newcomer, 1).allowed
    assert sorted(rollout.members(0)) == sorted([*first, newcomer])
    # 32: phase 1 is still 16, the next newcomer goes to phase 2.
    rollout.set_targets([*DEVICES[:31], DEVICES[31]], 2)
    assert rollout.phase_of(DEVICES[31]) == 1


def test_count_plan_opened_phases_full() -> None:
    plan = PhasePlan.parse("#5,#20,all")
    assert not opened_phases_full(plan, 0, [])  # not started
    assert opened_phases_full(plan, 1, [5]) and opened_phases_full(plan, 1, [6])
    assert not opened_phases_full(plan, 1, [4])  # a place is free
    assert opened_phases_full(plan, 2, [5, 15]) and not opened_phases_full(plan, 2, [5, 14])
    assert opened_phases_full(plan, 2, [7, 13])  # cumulative
    assert not opened_phases_full(plan, 3, [5, 15, 900])  # "all" takes every device
    assert not opened_phases_full(PhasePlan.parse("10,100"), 1, [10])  # shares follow N


def test_backoff_holds_a_device_after_n_failures() -> None:
    policy = Policy(PhasePlan.single(), backoff=Backoff(2, 30 * MIN))
    rollout = started(policy)
    device = DEVICES[0]
    assert deliver(rollout, [device], Outcome.DOWNLOAD_FAILED, 1) == []
    assert rollout.may_offer(device, 2).allowed  # one failure: retried
    events = deliver(rollout, [device], Outcome.DOWNLOAD_FAILED, 3)
    assert kinds(events) == [EventKind.DEVICE_HELD]
    decision = rollout.may_offer(device, 4)
    assert decision.verdict is Verdict.HELD_OFF and decision.retry_at == 3 + 30 * MIN
    counts = rollout.counts(4).total
    assert counts.held_off == 1 and counts.by_status["download_failed"] == 1
    assert counts.failures_total == 2
    assert rollout.may_offer(device, 3 + 30 * MIN).allowed
    assert rollout.counts(3 + 30 * MIN).total.held_off == 0


def test_device_that_does_not_come_back_times_out() -> None:
    rollout = started(Policy(PhasePlan.single(), reboot_timeout_ms=5 * MIN,
                             thresholds=(Threshold(0, 1, Action.PAUSE, Scope.ROLLOUT),)))
    device = DEVICES[0]
    deliver(rollout, [device], Outcome.REBOOTING, 1)
    assert rollout.tick(5 * MIN) == []
    events = rollout.tick(5 * MIN + 1)
    assert kinds(events) == [
        EventKind.DEVICE_TIMED_OUT, EventKind.THRESHOLD_CROSSED, EventKind.PAUSED
    ]
    assert "1 timed_out" in events[-1].reason
    assert rollout.counts(5 * MIN + 1).total.by_status["timed_out"] == 1
    # It came back after all: the truth wins.
    rollout.record_outcome(device, Outcome.SUCCEEDED, 6 * MIN)
    assert rollout.counts(6 * MIN).total.by_status["timed_out"] == 0


def test_pause_resume_acknowledges_crossed_thresholds() -> None:
    policy = Policy(PhasePlan.single(), thresholds=(Threshold(20, 2, Action.PAUSE),))
    rollout = started(policy)
    events = deliver(rollout, DEVICES[:2], Outcome.ROLLED_BACK, 1)
    assert kinds(events) == [EventKind.THRESHOLD_CROSSED, EventKind.PAUSED]
    assert rollout.may_offer(DEVICES[5], 2).verdict is Verdict.PAUSED
    assert rollout.may_continue(DEVICES[5], 2).allowed  # a transfer in progress finishes
    with pytest.raises(RolloutStateError, match="only a scheduled or running"):
        rollout.pause("ops", 2)
    assert kinds(rollout.resume("ops", 3)) == [EventKind.RESUMED]
    assert rollout.may_offer(DEVICES[5], 3).allowed
    # The same failures do not pause it again; one more does.
    assert deliver(rollout, DEVICES[2:4], Outcome.SUCCEEDED, 4) == []
    assert kinds(deliver(rollout, DEVICES[4:5], Outcome.ROLLED_BACK, 5))[-1] is EventKind.PAUSED
    with pytest.raises(RolloutStateError, match="only a paused rollout"):
        Rollout("x", policy, 0).resume("ops", 0)
    assert issubclass(RolloutStateError, ConflictError)


def test_operator_pause_and_abort_name_who() -> None:
    rollout = started(Policy(PhasePlan.single()))
    rollout.record_outcome(DEVICES[0], Outcome.DOWNLOADING, 1)
    rollout.record_outcome(DEVICES[1], Outcome.REBOOTING, 1)  # installed: nothing to discard
    paused = rollout.pause("alice@example.com", 2)
    assert paused[0].by == "alice@example.com" and rollout.reason == "paused by alice@example.com"
    aborted = rollout.abort("bob@example.com", 3, "bad battery drain")
    assert aborted[0].data["discard"] == [DEVICES[0]] and rollout.reason == "bad battery drain"


def test_rate_limit_grows_exponentially() -> None:
    rate = RateLimit(2, increment_factor=2, increase_after_notified=2, max_per_minute=5)
    rollout = started(Policy(PhasePlan.single(), rate=rate))
    events: list = []
    for device in DEVICES[:2]:
        assert rollout.may_offer(device, 1000).allowed
        events = rollout.record_outcome(device, Outcome.OFFERED, 1000)
    assert kinds(events) == [EventKind.RATE_INCREASED] and rollout.rate == 4
    for device in DEVICES[2:4]:
        assert rollout.may_offer(device, 1500).allowed
        rollout.record_outcome(device, Outcome.OFFERED, 1500)
    assert rollout.rate == 5  # 4 * 2 = 8, capped at the maximum
    assert rollout.may_offer(DEVICES[4], 2000).allowed
    rollout.record_outcome(DEVICES[4], Outcome.OFFERED, 2000)
    decision = rollout.may_offer(DEVICES[5], 2000)
    assert decision.verdict is Verdict.RATE_LIMITED and decision.retry_at == 1000 + MIN
    assert rollout.may_offer(DEVICES[5], 1000 + MIN).allowed  # the oldest left the minute
    assert not rollout.may_offer(DEVICES[5], 1000 + MIN - 1).allowed


def test_windows_gate_new_offers_not_transfers_and_can_be_forced() -> None:
    window = MaintenanceWindow("0 2 * * *", 60, "UTC")
    rollout = started(Policy(PhasePlan.single()))
    noon = 12 * 60 * MIN  # 1970-01-01 12:00 UTC
    decision = rollout.may_offer(DEVICES[0], noon, [window])
    assert decision.verdict is Verdict.OUTSIDE_WINDOW
    assert decision.retry_at == (24 + 2) * 60 * MIN
    forced = rollout.may_offer(DEVICES[0], noon, [window], force_window=True)
    assert forced.allowed and forced.forced
    assert rollout.may_offer(DEVICES[0], 2 * 60 * MIN + 1, [window]).allowed
    rollout.record_outcome(DEVICES[0], Outcome.DOWNLOADING, 2 * 60 * MIN + 1)
    assert rollout.may_continue(DEVICES[0], noon).allowed


def test_outcome_for_a_device_outside_the_rollout_is_refused() -> None:
    rollout = started(Policy(PhasePlan.single()), DEVICES[:3])
    with pytest.raises(RolloutOutcomeError, match="has no place"):
        rollout.record_outcome(DEVICES[10], Outcome.SUCCEEDED, 1)
    with pytest.raises(RolloutOutcomeError, match="unknown outcome 'exploded'"):
        rollout.record_outcome(DEVICES[0], "exploded", 1)


def test_serialised_state_resumes_exactly_through_msgpack() -> None:
    policy = Policy(
        PhasePlan.parse("10,50,100"), phase_wait_ms=MIN,
        thresholds=(Threshold(50, 4, Action.ABORT, Scope.ROLLOUT),),
        rate=RateLimit(30, 1.5, increase_after_succeeded=3, max_per_minute=100),
        backoff=Backoff(1, MIN),
    )
    rollout = started(policy)
    first = offerable(rollout, 1)
    deliver(rollout, first[:-1], Outcome.SUCCEEDED, 1)
    deliver(rollout, first[-1:], Outcome.DOWNLOAD_FAILED, 1)
    packed = msgpack.packb(rollout.to_dict())
    assert b"devices" not in packed and len(packed) < 1024  # the rollout's state only
    rows = msgpack.unpackb(msgpack.packb(
        {d: p.to_list() for d, p in rollout.devices.items()}))
    progress = {d: DeviceProgress.from_list(p) for d, p in rows.items()}
    restored = Rollout.from_dict(msgpack.unpackb(packed), DEVICES, progress=progress)
    assert restored.to_dict() == rollout.to_dict()
    assert restored.take_changed() == ({}, {})  # nothing to save after a load
    assert json.loads(json.dumps(rollout.to_dict())) == rollout.to_dict()
    for now in (2, MIN + 5):
        assert [restored.may_offer(d, now) for d in DEVICES] == [
            rollout.may_offer(d, now) for d in DEVICES
        ]
        assert restored.tick(now) == rollout.tick(now)
        assert restored.counts(now) == rollout.counts(now)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"v": 99}, "format 99"),
        ([], "format None"),
        ({"v": 1, "id": "x"}, "malformed"),
    ],
)
def test_bad_saved_state_is_refused(data: object, message: str) -> None:
    with pytest.raises(RolloutFormatError, match=message):
        Rollout.from_dict(data, DEVICES)  # type: ignore[arg-type]


def test_saved_state_with_a_phase_outside_the_plan_is_refused() -> None:
    data = started(Policy(PhasePlan.single())).to_dict()
    with pytest.raises(RolloutFormatError, match="not planned"):
        Rollout.from_dict(data, DEVICES, progress={DEVICES[0]: DeviceProgress(3)})
    legacy = {**data, "v": 1, "devices": {DEVICES[0]: [3, "offered", 0, 0, 1]}}
    with pytest.raises(RolloutFormatError, match="not planned"):
        Rollout.from_dict(legacy, DEVICES)


def test_state_of_format_1_still_loads_and_its_devices_are_saved_per_device() -> None:
    """A state saved before devices' progress moved to rows (format 1, every device's
    progress inside, and under the old percent rule only devices with an outcome):
    it loads, its devices keep their phase and progress, the exact rule places the
    rest, and the next save writes them all as rows."""
    rollout = started(Policy(PhasePlan.parse("10,50,100")))
    old = {**rollout.to_dict(), "v": 1,
           "devices": {DEVICES[0]: [1, "succeeded", 0, 0, 5], DEVICES[1]: [0, "offered", 0, 0,
                                                                            7]}}
    restored = Rollout.from_dict(old, DEVICES, progress={DEVICES[1]: DeviceProgress(2)})
    assert restored.phase_of(DEVICES[0]) == 1 and restored.phase_of(DEVICES[1]) == 0
    assert restored.devices[DEVICES[0]].status is Outcome.SUCCEEDED
    assert restored.devices[DEVICES[1]].status is Outcome.OFFERED  # the state wins
    assert all(restored.phase_of(d) is not None for d in DEVICES)
    new, changed = restored.take_changed()
    assert set(changed) == {DEVICES[1]}  # it had a row: updated
    assert set(new) == set(DEVICES) - {DEVICES[1]}  # the others: inserted
    assert "devices" not in restored.to_dict() and restored.to_dict()["v"] == 2


def test_rollout_scope_follows_the_precedence_rules() -> None:
    current = ProductReleases.from_versions(1, {"beta": 5})
    default = RolloutScope(4)
    overlay = default.overlay(current)
    plain = DeviceTargeting()
    assert default.decides("d", plain, 1, overlay)
    assert not default.decides("d", plain, 4, overlay)  # already runs it: nothing to do
    assert default.decides("d", plain, 4, overlay, touched={"d"})  # ...unless it took part
    assert not default.decides("d", DeviceTargeting(development=True), 1, overlay)
    assert not default.decides("d", DeviceTargeting(locked_version=1), 1, overlay)
    assert not default.decides("d", DeviceTargeting(groups={"beta"}), 1, overlay)  # v5 wins
    canary = RolloutScope(6, ("canary",), immediate=True)
    overlay = canary.overlay(current)
    assert overlay.group_releases["canary"].immediate
    assert canary.decides("d", DeviceTargeting(groups={"canary", "beta"}), 1, overlay)
    assert not canary.decides("d", plain, 1, overlay)


def test_saved_state_lists_the_devices_it_does_not_count_up_to_a_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from otacore.rollout import saved

    rollout = started(Policy(PhasePlan.parse("10,100")))
    rollout.set_targets(DEVICES[:50], 1)  # 10 placed devices leave the target set
    data = rollout.to_dict()
    assert data["uncounted"] == sorted(DEVICES[50:]) and data["targets"] == 50
    light = Rollout.from_dict(data, [DEVICES[0]], partial=True, light=True,
                              progress={DEVICES[0]: rollout.devices[DEVICES[0]]})
    assert light.counts(1) == rollout.counts(1)  # the saved tally, not a recount
    assert light.to_dict() == data  # carries what the full save counted
    monkeypatch.setattr(saved, "MAX_UNCOUNTED", 5)
    assert rollout.to_dict()["uncounted"] is None  # too many: light restores refused
