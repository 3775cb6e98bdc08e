"""The live device sessions of one server process, by device id: a read-only view of the
transport's one registry of sessions.

The transport's :class:`~server.transport.session_registry.SessionRegistry` holds one
``DeviceSession`` per device (a newer session of the device replaces and closes the older
one; revocation and shutdown close them through it), and each session leads to its handler
(``session.handler``). :class:`LiveDevices` reads that registry: nothing keyed by device id
is kept in step with it. Everything else per live session hangs off its handler (the OTA
engine's updater is ``handler.updater``).

A session is in the registry from its handler's creation (the transport sets
``session.handler`` before the handler's first checkpoint) until the handler's run ends
(the plane then takes it out: ``DevicePlane.on_session_end``), so every session of the
plane's registry is a live device session with its handler, and the view's size is the
registry's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from server.devices.session import DeviceSessionHandler

if TYPE_CHECKING:
    from server.devices.updater import SessionUpdater
    from server.transport import SessionRegistry


class LiveDevices(Mapping[str, DeviceSessionHandler]):
    """Device id -> the handler of its live session in this process (a read-only view of
    the transport's registry)."""

    __slots__ = ("_registry",)

    def __init__(self, registry: SessionRegistry) -> None:
        self._registry = registry

    def _live_handler(self, device_id: str) -> DeviceSessionHandler | None:
        """The handler of the device's live session, None when there is none."""
        handler = self._registry.handler(device_id)
        return handler if isinstance(handler, DeviceSessionHandler) else None

    def owns(self, handler: DeviceSessionHandler) -> bool:
        """True while ``handler`` is its device's live session."""
        return self._live_handler(handler.device_id) is handler

    def updater(self, device_id: str) -> SessionUpdater | None:
        """The OTA updater of the device's live session, if it has one yet."""
        handler = self._live_handler(device_id)
        return handler.updater if handler is not None else None

    @property
    def updaters(self) -> Updaters:
        """Device id -> updater of every live session that has one (a read-only view)."""
        return Updaters(self)

    def __getitem__(self, device_id: str) -> DeviceSessionHandler:
        handler = self._live_handler(device_id)
        if handler is None:
            raise KeyError(device_id)
        return handler

    def __contains__(self, device_id: object) -> bool:
        return isinstance(device_id, str) and self._live_handler(device_id) is not None

    def __iter__(self) -> Iterator[str]:
        return iter([session.device_id for session in self._registry
                     if isinstance(session.handler, DeviceSessionHandler)])

    def __len__(self) -> int:
        # O(1) (a status line asks every second, whatever the number of sessions): every
        # session of the plane's registry has its handler (see the module documentation).
        return len(self._registry)

    def __repr__(self) -> str:
        return f"LiveDevices({sorted(self)!r})"


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
