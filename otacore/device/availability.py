"""When a device takes updates and resets: Device OS's availability controls, sans-IO.

Rules (Particle docs, "OTA Updates" and "System calls"; particle-facts.md):

* Updates are enabled at startup. ``disable_updates()`` / ``enable_updates()`` change that, and
  each real change (not a repeat) is reported to the cloud as the system event
  ``particle/device/updates/enabled`` with ``true`` / ``false``.
* With updates disabled the device refuses an update offer unless updates are *forced* (the
  cloud's ``firmware_updates_forced``, set per device or per product, which the cloud tells the
  device; ``updates_forced`` then reads true). Disabling only stops new offers: a transfer
  already running continues (Device OS checks availability when an update begins).
* After a refusal the cloud marks the update pending and tells the device: ``updates_pending``
  becomes true and the application gets the ``firmware_update_pending`` system event. When the
  application enables updates again, the ``enabled`` event tells the cloud, which starts the
  update at once.
* When the system needs to reset (an update was staged, or the cloud asked), it first sends the
  ``reset_pending`` event to the application. With reset enabled it then resets at once; with
  reset disabled (``disable_reset()``) it reports the held reset to the cloud and waits until
  the application calls ``enable_reset()``. Forcing updates does not override a held reset.

Every method returns the events the caller must act on, in order: :class:`PublishToCloud`
(the session layer sends it), :class:`AppEvent` (the emulated application's hooks run; the
``on_reset_pending`` hook typically calls :meth:`UpdateAvailability.enable_reset`), and
:class:`ResetNow` (the emulator resets the device). Nothing here is persisted: like Device OS,
a reset starts from the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Device -> cloud: updates enabled ("true") or disabled ("false").
UPDATES_ENABLED_EVENT = "particle/device/updates/enabled"
#: Cloud -> device: updates forced ("true"/"false").
UPDATES_FORCED_EVENT = "particle/device/updates/forced"
#: Cloud -> device: an update waits for the device to enable updates ("true"/"false").
UPDATES_PENDING_EVENT = "particle/device/updates/pending"
#: Device -> cloud (this project's extension): a reset is pending but held by the application.
RESET_PENDING_EVENT = "ota/device/reset/pending"
#: Application system events (Device OS ``System.on`` names).
APP_FIRMWARE_UPDATE_PENDING = "firmware_update_pending"
APP_RESET_PENDING = "reset_pending"


@dataclass(frozen=True)
class PublishToCloud:
    """A system event the session layer must send to the cloud."""

    name: str
    data: str


@dataclass(frozen=True)
class AppEvent:
    """A system event for the application (its ``System.on`` handler runs)."""

    name: str


@dataclass(frozen=True)
class ResetNow:
    """The device must reset now."""

    reason: str


AvailabilityEvent = PublishToCloud | AppEvent | ResetNow


@dataclass(frozen=True)
class OfferDecision:
    """The device's answer to a cloud offer to begin an update."""

    accepted: bool
    reason: str


def _flag(value: bool) -> str:
    return "true" if value else "false"


class UpdateAvailability:
    """Update and reset availability of one running device (state since its last reset)."""

    def __init__(self, *, updates_enabled: bool = True, reset_enabled: bool = True) -> None:
        self._updates_enabled = updates_enabled
        self._updates_forced = False
        self._updates_pending = False
        self._reset_enabled = reset_enabled
        self._reset_reason: str | None = None
        self._update_in_progress = False

    # --- state (Device OS: System.updatesEnabled(), updatesForced(), ...) ---

    @property
    def updates_enabled(self) -> bool:
        """True unless the application disabled updates."""
        return self._updates_enabled

    @property
    def updates_forced(self) -> bool:
        """True when the cloud forces updates on this device or its product."""
        return self._updates_forced

    @property
    def updates_pending(self) -> bool:
        """True when the cloud holds an update back because updates are disabled."""
        return self._updates_pending

    @property
    def reset_enabled(self) -> bool:
        """True unless the application holds resets."""
        return self._reset_enabled

    @property
    def reset_pending(self) -> bool:
        """True when the system needs a reset that the application holds."""
        return self._reset_reason is not None

    @property
    def update_in_progress(self) -> bool:
        """True between an accepted offer and the end of the transfer."""
        return self._update_in_progress

    @property
    def available(self) -> bool:
        """True when an update offer would be accepted (enabled or forced, none running)."""
        return (self._updates_enabled or self._updates_forced) and not self._update_in_progress

    # --- the application's calls ---

    def disable_updates(self) -> list[AvailabilityEvent]:
        """Refuse future update offers unless forced; tell the cloud if this is a change."""
        if not self._updates_enabled:
            return []
        self._updates_enabled = False
        return [PublishToCloud(UPDATES_ENABLED_EVENT, _flag(False))]

    def enable_updates(self) -> list[AvailabilityEvent]:
        """Accept updates again; telling the cloud starts a pending update."""
        if self._updates_enabled:
            return []
        self._updates_enabled = True
        return [PublishToCloud(UPDATES_ENABLED_EVENT, _flag(True))]

    def disable_reset(self) -> list[AvailabilityEvent]:
        """Hold system resets until :meth:`enable_reset`."""
        self._reset_enabled = False
        return []

    def enable_reset(self) -> list[AvailabilityEvent]:
        """Allow system resets; performs a held one now."""
        self._reset_enabled = True
        if self._reset_reason is None:
            return []
        return [ResetNow(self._reset_reason)]

    # --- the session layer's calls ---

    def on_connected(self) -> list[AvailabilityEvent]:
        """A new cloud session: report what the cloud cannot assume (it assumes enabled)."""
        events: list[AvailabilityEvent] = []
        if not self._updates_enabled:
            events.append(PublishToCloud(UPDATES_ENABLED_EVENT, _flag(False)))
        if self._reset_reason is not None:
            events.append(PublishToCloud(RESET_PENDING_EVENT, self._reset_reason))
        return events

    def on_cloud_event(self, name: str, data: str) -> list[AvailabilityEvent]:
        """Apply a cloud -> device system event (forced or pending); others are ignored."""
        value = data.strip().lower() == "true"
        if name == UPDATES_FORCED_EVENT:
            self._updates_forced = value
            return []
        if name == UPDATES_PENDING_EVENT:
            became_pending = value and not self._updates_pending
            self._updates_pending = value
            return [AppEvent(APP_FIRMWARE_UPDATE_PENDING)] if became_pending else []
        return []

    def offer_update(self) -> OfferDecision:
        """The cloud wants to begin an update: accept when enabled or forced and idle."""
        if self._update_in_progress:
            return OfferDecision(False, "an update is already in progress")
        if not (self._updates_enabled or self._updates_forced):
            return OfferDecision(False, "updates are disabled on this device and not forced")
        self._update_in_progress = True
        self._updates_pending = False
        return OfferDecision(True, "forced" if not self._updates_enabled else "enabled")

    def on_update_finished(self, staged: bool) -> list[AvailabilityEvent]:
        """The transfer ended; when an image was staged the system needs a reset."""
        self._update_in_progress = False
        if not staged:
            return []
        return self.request_reset("firmware update")

    def request_reset(self, reason: str) -> list[AvailabilityEvent]:
        """The system (or the cloud) needs a reset: tell the app, then reset or hold it."""
        if self._reset_reason is not None and not self._reset_enabled:
            return []  # already held and reported
        self._reset_reason = reason
        events: list[AvailabilityEvent] = [AppEvent(APP_RESET_PENDING)]
        if self._reset_enabled:
            events.append(ResetNow(reason))
        else:
            events.append(PublishToCloud(RESET_PENDING_EVENT, reason))
        return events
