"""Maintenance windows on fixed clocks (cronsim + zoneinfo), DST changes in Europe/Berlin
included, and how the rollout gates offers with them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.errors import ValidationError
from otacore.rollout import (
    MaintenanceWindow,
    MaintenanceWindowError,
    Outcome,
    PhasePlan,
    Policy,
    Rollout,
    Verdict,
    any_open,
    next_opening,
    windows_for,
)

MIN = 60_000


def ms(*parts: int) -> int:
    """Epoch ms of a UTC wall-clock time."""
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


def test_daily_window_in_summer_time() -> None:
    window = MaintenanceWindow("0 2 * * *", 120, "Europe/Berlin")  # 02:00 CEST = 00:00 UTC
    assert not window.is_open(ms(2026, 6, 1, 23, 59))
    assert window.next_open(ms(2026, 6, 1, 23, 59)) == ms(2026, 6, 2, 0, 0)
    assert window.is_open(ms(2026, 6, 2, 0, 0))  # opens on the matching minute
    assert window.next_open(ms(2026, 6, 2, 0, 30)) == ms(2026, 6, 2, 0, 30)
    assert window.closes_at(ms(2026, 6, 2, 1, 59)) == ms(2026, 6, 2, 2, 0)
    assert not window.is_open(ms(2026, 6, 2, 2, 0))  # [open, open + duration)
    assert window.closes_at(ms(2026, 6, 2, 2, 0)) is None
    assert window.next_open(ms(2026, 6, 2, 2, 0)) == ms(2026, 6, 3, 0, 0)


def test_daily_window_in_winter_time() -> None:
    window = MaintenanceWindow("0 2 * * *", 120, "Europe/Berlin")  # 02:00 CET = 01:00 UTC
    assert not window.is_open(ms(2026, 1, 15, 0, 30))
    assert window.is_open(ms(2026, 1, 15, 1, 0))
    assert window.is_open(ms(2026, 1, 15, 2, 59))
    assert not window.is_open(ms(2026, 1, 15, 3, 0))


def test_spring_forward_a_missing_local_time_opens_at_the_first_valid_time() -> None:
    # 2026-03-29 02:00 -> 03:00 in Berlin: 02:30 never happens; cron fires at 03:00 CEST.
    window = MaintenanceWindow("30 2 * * *", 60, "Europe/Berlin")
    assert window.next_open(ms(2026, 3, 28, 12, 0)) == ms(2026, 3, 29, 1, 0)
    assert window.is_open(ms(2026, 3, 29, 1, 59))
    assert not window.is_open(ms(2026, 3, 29, 2, 0))  # 60 real minutes
    # The day after, 02:30 CEST again.
    assert window.next_open(ms(2026, 3, 29, 2, 0)) == ms(2026, 3, 30, 0, 30)


def test_fall_back_an_ambiguous_local_time_opens_once() -> None:
    # 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 happens twice; the window opens once.
    window = MaintenanceWindow("30 2 * * *", 30, "Europe/Berlin")
    assert window.next_open(ms(2026, 10, 24, 12, 0)) == ms(2026, 10, 25, 0, 30)
    assert window.is_open(ms(2026, 10, 25, 0, 31))
    assert not window.is_open(ms(2026, 10, 25, 1, 31))  # the second 02:30 (CET)
    assert window.next_open(ms(2026, 10, 25, 1, 31)) == ms(2026, 10, 26, 1, 30)


def test_window_longer_than_a_night_and_weekday_cron() -> None:
    window = MaintenanceWindow("0 22 * * 5", 3 * 24 * 60, "UTC")  # Friday 22:00 for 3 days
    assert window.is_open(ms(2026, 12, 6, 12, 0))  # Sunday
    assert not window.is_open(ms(2026, 12, 7, 22, 0))  # Monday 22:00: closed
    assert window.next_open(ms(2026, 12, 8, 0, 0)) == ms(2026, 12, 11, 22, 0)


@pytest.mark.parametrize(
    ("cron", "duration", "zone", "message"),
    [
        ("0 2 * *", 60, "UTC", "five fields"),
        ("0 2 * * * *", 60, "UTC", "five fields"),
        ("61 2 * * *", 60, "UTC", "Bad minute"),
        ("0 2 30 2 *", 60, "UTC", "Bad day-of-month"),
        ("0 2 * * *", 0, "UTC", "1..10080 minutes"),
        ("0 2 * * *", 20_000, "UTC", "1..10080 minutes"),
        ("0 2 * * *", "60", "UTC", "whole minutes"),
        ("0 2 * * *", 60, "Mars/Olympus", "unknown time zone"),
        ("0 2 * * *", 60, "../../etc/passwd", "unknown time zone"),
    ],
)
def test_bad_windows_are_refused(cron: str, duration: object, zone: str, message: str) -> None:
    with pytest.raises(MaintenanceWindowError, match=message):
        MaintenanceWindow(cron, duration, zone)  # type: ignore[arg-type]
    assert issubclass(MaintenanceWindowError, ValidationError)


def test_window_round_trips_and_normalises_spaces() -> None:
    window = MaintenanceWindow("0  2 * *   *", 90, "America/New_York")
    assert window.cron == "0 2 * * *"
    assert MaintenanceWindow.from_dict(window.to_dict()) == window


def test_group_windows_take_precedence_over_the_product_window() -> None:
    product = MaintenanceWindow("0 2 * * *", 60, "UTC")
    night = MaintenanceWindow("0 23 * * *", 60, "UTC")
    groups = {"night": night}
    assert windows_for({"night", "other"}, product, groups) == (night,)
    assert windows_for({"other"}, product, groups) == (product,)
    assert windows_for(set(), None, groups) == ()
    assert any_open((), 0)  # no window: always open
    both = (product, night)
    assert next_opening(both, ms(2026, 6, 1, 12, 0)) == ms(2026, 6, 1, 23, 0)
    assert any_open(both, ms(2026, 6, 1, 2, 30))


def test_fake_clock_nothing_starts_outside_offers_start_inside_transfers_finish() -> None:
    """Issue 15's done-when on a fake clock: nothing starts outside a window; offers start
    when it opens; a transfer in progress when it closes finishes."""
    window = MaintenanceWindow("0 2 * * *", 60, "Europe/Berlin")  # 00:00-01:00 UTC in June
    devices = [f"{i:024x}" for i in range(1, 11)]
    rollout = Rollout("w1", Policy(PhasePlan.single()), 0)
    rollout.set_targets(devices, 0)
    rollout.tick(ms(2026, 6, 1, 12, 0))
    for now in range(ms(2026, 6, 1, 12, 0), ms(2026, 6, 2, 0, 0), 7 * MIN):
        decisions = {rollout.may_offer(d, now, [window]).verdict for d in devices}
        assert decisions == {Verdict.OUTSIDE_WINDOW}, now
    opening = rollout.may_offer(devices[0], ms(2026, 6, 1, 12, 0), [window]).retry_at
    assert opening == ms(2026, 6, 2, 0, 0)
    assert all(rollout.may_offer(d, opening, [window]).allowed for d in devices)
    rollout.record_outcome(devices[0], Outcome.OFFERED, opening)
    rollout.record_outcome(devices[0], Outcome.DOWNLOADING, opening + 59 * MIN)
    closed = ms(2026, 6, 2, 1, 0)
    assert rollout.may_continue(devices[0], closed).allowed
    assert rollout.may_offer(devices[1], closed, [window]).verdict is Verdict.OUTSIDE_WINDOW
    rollout.record_outcome(devices[0], Outcome.SUCCEEDED, closed + 10 * MIN)
    assert rollout.counts(closed + 10 * MIN).total.by_status["succeeded"] == 1


@given(
    cron=st.sampled_from(["0 2 * * *", "30 2 * * *", "*/15 1-3 * * 0", "0 22 * * 5",
                          "0 0 1 * *"]),
    duration=st.integers(1, 3 * 24 * 60),
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "UTC", "Australia/Lord_Howe"]),
    now=st.integers(ms(2025, 1, 1), ms(2028, 1, 1)),
)
@settings(max_examples=150, deadline=None)
def test_next_open_and_is_open_agree(cron: str, duration: int, zone: str, now: int) -> None:
    window = MaintenanceWindow(cron, duration, zone)
    opening = window.next_open(now)
    assert opening is not None and opening >= now
    assert (opening == now) == window.is_open(now)
    assert window.is_open(opening)
    start = window.last_start(opening)
    assert start is not None and start <= opening < start + duration * MIN
    if opening > now:  # closed until then: nothing opens in between
        assert not window.is_open(opening - 1)
