"""The application's API of an emulated device (Device OS ``System.*``): update availability
(disable, enable, forced, pending), reset control (disable, enable, pending, reset now) and
the application's own events.

:class:`ApplicationMixin` is mixed into :class:`~otacore.device.emulated.EmulatedDevice`.
It is separate from the protocol machine because it is what the firmware's application calls,
not what the cloud or the shell drives: it owns the application's choices (re-applied at
every boot, when its setup() runs again) and turns each call into the availability events
the device acts on (:mod:`otacore.device.availability`).
"""

from __future__ import annotations

from collections.abc import Callable

from otacore.device.availability import (
    APP_FIRMWARE_UPDATE_PENDING,
    APP_RESET_PENDING,
    AppEvent,
    AvailabilityEvent,
    PublishToCloud,
    ResetNow,
    UpdateAvailability,
)


class ApplicationMixin:
    """Device OS-like ``System.*`` calls of the application (part of EmulatedDevice)."""

    on_reset_pending: Callable[[], None] | None
    on_update_pending: Callable[[], None] | None
    _app_updates_enabled: bool
    _app_reset_enabled: bool
    _app_events: list[str]
    _availability: UpdateAvailability

    def _settle(self) -> None:
        raise NotImplementedError  # EmulatedDevice runs the app hooks and reports its status

    def _reboot(self, reason: str) -> None:
        raise NotImplementedError  # EmulatedDevice says goodbye and asks its shell to reboot

    def _publish(self, name: str, data: str, purpose: str) -> None:
        raise NotImplementedError  # EmulatedDevice queues the event for its session

    # --- the application's API (Device OS System.*) -----------------------------------------

    @property
    def updates_enabled(self) -> bool:
        """False after :meth:`disable_updates`."""
        return self._availability.updates_enabled

    @property
    def updates_forced(self) -> bool:
        """True when the cloud forces updates on this device."""
        return self._availability.updates_forced

    @property
    def updates_pending(self) -> bool:
        """True when an update waits for the application to enable updates."""
        return self._availability.updates_pending

    @property
    def reset_pending(self) -> bool:
        """True when a system reset waits for :meth:`enable_reset`."""
        return self._availability.reset_pending

    def disable_updates(self) -> None:
        """Refuse update offers unless forced (the cloud is told)."""
        self._app_updates_enabled = False
        self._on_availability(self._availability.disable_updates())
        self._settle()

    def enable_updates(self) -> None:
        """Accept updates again (the cloud is told, and sends a pending update)."""
        self._app_updates_enabled = True
        self._on_availability(self._availability.enable_updates())
        self._settle()

    def disable_reset(self) -> None:
        """Hold system resets (an applied update waits) until :meth:`enable_reset`."""
        self._app_reset_enabled = False
        self._on_availability(self._availability.disable_reset())
        self._settle()

    def enable_reset(self) -> None:
        """Allow system resets; performs a held one now."""
        self._app_reset_enabled = True
        self._on_availability(self._availability.enable_reset())
        self._settle()

    def reset(self) -> None:
        """The application resets the device (System.reset(): immediate)."""
        self._reboot("the application reset the device")
        self._settle()

    def publish(self, name: str, data: str) -> None:
        """Publish an application event (sent once the session is up; dropped offline)."""
        self._publish(name, data, "event")

    # --- availability events and the application's hooks --------------------------------

    def _on_availability(self, events: list[AvailabilityEvent]) -> None:
        for event in events:
            if isinstance(event, PublishToCloud):
                self._publish(event.name, event.data, "event")
            elif isinstance(event, AppEvent):
                self._app_events.append(event.name)
            elif isinstance(event, ResetNow):
                self._reboot(event.reason)

    def _run_app_hooks(self) -> None:
        # After the machine is consistent: a hook may call back (e.g. enable_reset()).
        while self._app_events:
            name = self._app_events.pop(0)
            hook = {
                APP_RESET_PENDING: self.on_reset_pending,
                APP_FIRMWARE_UPDATE_PENDING: self.on_update_pending,
            }.get(name)
            if hook is not None:
                hook()
