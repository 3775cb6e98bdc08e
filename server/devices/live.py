"""The live device sessions of one server process, by device id: one map, one owner.

The device plane attaches a session's handler when the session starts and detaches it when
it ends; a newer session of the same device takes the device over (the transport's
``SessionRegistry`` closes the older one). Everything else per live session hangs off its
handler (the OTA engine's updater is ``handler.updater``), so nothing keyed by device id
has to be kept in step with this map. The transport keeps its own registry of
``DeviceSession`` objects (replacement, revocation, shutdown); see the report of issue 14
for the change that would make that the only one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.devices.session import DeviceSessionHandler
    from server.devices.updater import SessionUpdater


class LiveDevices(Mapping[str, "DeviceSessionHandler"]):
    """Device id -> the handler of its live session in this process (read-only to all but
    the plane, which calls :meth:`attach` and :meth:`detach`)."""

    __slots__ = ("_by_device",)

    def __init__(self) -> None:
        self._by_device: dict[str, DeviceSessionHandler] = {}

    def attach(self, handler: DeviceSessionHandler) -> None:
        """``handler``'s session started: it now owns its device."""
        self._by_device[handler.device_id] = handler

    def detach(self, handler: DeviceSessionHandler) -> bool:
        """``handler``'s session ended: forget it if it still owns its device (True), not
        when a newer session took the device over (False)."""
        if self._by_device.get(handler.device_id) is handler:
            del self._by_device[handler.device_id]
            return True
        return False

    def owns(self, handler: DeviceSessionHandler) -> bool:
        """True while ``handler`` is its device's live session."""
        return self._by_device.get(handler.device_id) is handler

    def updater(self, device_id: str) -> SessionUpdater | None:
        """The OTA updater of the device's live session, if it has one yet."""
        handler = self._by_device.get(device_id)
        return handler.updater if handler is not None else None

    @property
    def updaters(self) -> Updaters:
        """Device id -> updater of every live session that has one (a read-only view)."""
        return Updaters(self)

    def __getitem__(self, device_id: str) -> DeviceSessionHandler:
        return self._by_device[device_id]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_device))

    def __len__(self) -> int:
        return len(self._by_device)


class Updaters(Mapping[str, "SessionUpdater"]):
    """A read-only view of the live sessions' updaters, by device id."""

    __slots__ = ("_live",)

    def __init__(self, live: LiveDevices) -> None:
        self._live = live

    def __getitem__(self, device_id: str) -> SessionUpdater:
        updater = self._live.updater(device_id)
        if updater is None:
            raise KeyError(device_id)
        return updater

    def __iter__(self) -> Iterator[str]:
        return iter([device_id for device_id in self._live
                     if self._live.updater(device_id) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Updaters({dict(self)!r})"
