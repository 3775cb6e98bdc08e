"""Update availability and reset control (otacore.device.availability)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.device.availability import (
    APP_FIRMWARE_UPDATE_PENDING,
    APP_RESET_PENDING,
    RESET_PENDING_EVENT,
    UPDATES_ENABLED_EVENT,
    UPDATES_FORCED_EVENT,
    UPDATES_PENDING_EVENT,
    AppEvent,
    PublishToCloud,
    ResetNow,
    UpdateAvailability,
)


def test_defaults_match_device_os_startup() -> None:
    device = UpdateAvailability()
    assert device.updates_enabled and device.reset_enabled and device.available
    assert not (device.updates_forced or device.updates_pending or device.reset_pending)
    assert device.on_connected() == []


def test_disable_and_enable_report_only_changes() -> None:
    device = UpdateAvailability()
    assert device.disable_updates() == [PublishToCloud(UPDATES_ENABLED_EVENT, "false")]
    assert device.disable_updates() == []  # a repeat sends nothing
    assert device.on_connected() == [PublishToCloud(UPDATES_ENABLED_EVENT, "false")]
    assert device.enable_updates() == [PublishToCloud(UPDATES_ENABLED_EVENT, "true")]
    assert device.enable_updates() == []


def test_disabled_device_refuses_then_gets_the_pending_update_on_enable() -> None:
    device = UpdateAvailability()
    device.disable_updates()
    offer = device.offer_update()
    assert not offer.accepted and "disabled" in offer.reason
    # The cloud marks the update pending and says so; the app hears about it once.
    assert device.on_cloud_event(UPDATES_PENDING_EVENT, "true") == [
        AppEvent(APP_FIRMWARE_UPDATE_PENDING)
    ]
    assert device.on_cloud_event(UPDATES_PENDING_EVENT, "true") == []
    assert device.updates_pending
    # Enabling tells the cloud, which then offers the update again.
    assert device.enable_updates() == [PublishToCloud(UPDATES_ENABLED_EVENT, "true")]
    offer = device.offer_update()
    assert offer.accepted and offer.reason == "enabled"
    assert not device.updates_pending and device.update_in_progress


def test_forced_updates_override_disabled_updates() -> None:
    device = UpdateAvailability()
    device.disable_updates()
    assert device.on_cloud_event(UPDATES_FORCED_EVENT, "true") == []
    assert device.updates_forced and device.available
    offer = device.offer_update()
    assert offer.accepted and offer.reason == "forced"
    device.on_update_finished(staged=False)
    device.on_cloud_event(UPDATES_FORCED_EVENT, "false")
    assert not device.offer_update().accepted


def test_only_one_update_at_a_time_and_disable_does_not_cancel() -> None:
    device = UpdateAvailability()
    assert device.offer_update().accepted
    device.disable_updates()  # a running transfer continues
    assert device.update_in_progress
    second = device.offer_update()
    assert not second.accepted and "in progress" in second.reason
    assert device.on_update_finished(staged=False) == []
    assert not device.update_in_progress


def test_reset_after_update_happens_at_once_when_allowed() -> None:
    device = UpdateAvailability()
    device.offer_update()
    assert device.on_update_finished(staged=True) == [
        AppEvent(APP_RESET_PENDING),
        ResetNow("firmware update"),
    ]


def test_held_reset_is_reported_and_performed_on_enable_reset() -> None:
    device = UpdateAvailability()
    device.disable_reset()
    device.offer_update()
    events = device.on_update_finished(staged=True)
    assert events == [
        AppEvent(APP_RESET_PENDING),
        PublishToCloud(RESET_PENDING_EVENT, "firmware update"),
    ]
    assert device.reset_pending and not device.reset_enabled
    assert device.request_reset("cloud asked") == []  # already held and reported
    assert device.on_connected() == [PublishToCloud(RESET_PENDING_EVENT, "firmware update")]
    # The application's on_reset_pending hook finishes its work and allows the reset.
    assert device.enable_reset() == [ResetNow("firmware update")]


def test_enable_reset_without_pending_reset_does_nothing() -> None:
    device = UpdateAvailability(reset_enabled=False)
    assert device.enable_reset() == []
    assert device.request_reset("cloud asked") == [
        AppEvent(APP_RESET_PENDING),
        ResetNow("cloud asked"),
    ]


def test_unrelated_cloud_events_are_ignored() -> None:
    device = UpdateAvailability()
    assert device.on_cloud_event("spark/status", "true") == []
    assert device.available


OPS = st.lists(
    st.sampled_from(
        [
            "disable",
            "enable",
            "force",
            "unforce",
            "pending",
            "offer",
            "finish",
            "finish-staged",
            "hold",
            "release",
        ]
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_invariants_under_any_sequence(ops: list[str]) -> None:
    """Whatever the order of calls, the device's answers follow the rules."""
    device = UpdateAvailability()
    reported_enabled = True  # what the cloud believes
    for op in ops:
        if op == "offer":
            was_available = device.available
            offer = device.offer_update()
            assert offer.accepted == was_available
            events: list[object] = []
        elif op == "disable":
            events = list(device.disable_updates())
        elif op == "enable":
            events = list(device.enable_updates())
        elif op in ("force", "unforce"):
            events = list(device.on_cloud_event(UPDATES_FORCED_EVENT, str(op == "force")))
        elif op == "pending":
            events = list(device.on_cloud_event(UPDATES_PENDING_EVENT, "true"))
        elif op.startswith("finish"):
            events = list(device.on_update_finished(staged=op == "finish-staged"))
        elif op == "hold":
            events = list(device.disable_reset())
        else:
            events = list(device.enable_reset())
        for event in events:
            if isinstance(event, PublishToCloud) and event.name == UPDATES_ENABLED_EVENT:
                assert event.data == ("true" if not reported_enabled else "false")
                reported_enabled = event.data == "true"
            if isinstance(event, ResetNow):
                assert device.reset_enabled
                return  # the device resets: this state is gone
        assert reported_enabled == device.updates_enabled
        # A pending reset is only ever one the application holds.
        assert not device.reset_pending or not device.reset_enabled
