"""The registry of live device sessions: one per device id, a new session replacing the
older one, and the revocations recent enough to make an authorization in flight stale.

Separate from :mod:`server.transport.session` (what a session is) and from
:mod:`server.transport.session_host` (which registers and unregisters the sessions it runs):
the registry alone owns the map of live sessions, which the control plane reads and closes
sessions through.
"""

from __future__ import annotations

from collections.abc import Iterator

import trio

from server import metrics
from server.transport.session import CloseReason, DeviceSession, SessionHandler

#: Seconds a revocation is remembered to catch authorizations that were in flight when it
#: happened (far longer than any handshake may take).
REVOCATION_MEMORY = 600.0


class SessionRegistry:
    """Live sessions by device id, one per device: a new session replaces the older one.

    The control plane calls :meth:`close_device` when a device is revoked.
    """

    __slots__ = ("_by_device", "_revoked_at")

    def __init__(self) -> None:
        self._by_device: dict[str, DeviceSession] = {}
        # device id -> trio time of its last revocation, oldest first (see revoked_since).
        self._revoked_at: dict[str, float] = {}

    def register(self, session: DeviceSession) -> None:
        """Record ``session``; an older session of the same device is closed (REPLACED)."""
        older = self._by_device.get(session.device_id)
        if older is session:
            return
        if older is not None:
            older.close(CloseReason.REPLACED)
            metrics.session_ended(older.transport)
        self._by_device[session.device_id] = session
        metrics.session_started(session.transport)

    def unregister(self, session: DeviceSession) -> None:
        """Forget ``session`` (no-op if a newer session of its device replaced it)."""
        if self._by_device.get(session.device_id) is session:
            del self._by_device[session.device_id]
            metrics.session_ended(session.transport)

    def get(self, device_id: str) -> DeviceSession | None:
        """The live session of ``device_id``, if any."""
        return self._by_device.get(device_id)

    def handler(self, device_id: str) -> SessionHandler | None:
        """The handler of ``device_id``'s live session, if it has one yet."""
        session = self._by_device.get(device_id)
        return session.handler if session is not None else None

    def close_device(self, device_id: str, reason: str = CloseReason.REVOKED) -> bool:
        """Close the live session of ``device_id``; True if there was one. A revocation
        (the default reason) is also remembered for :meth:`revoked_since`."""
        if reason == CloseReason.REVOKED:
            self._note_revoked(device_id)
        session = self._by_device.get(device_id)
        if session is None:
            return False
        session.close(reason)
        return True

    def _note_revoked(self, device_id: str) -> None:
        now = trio.current_time()
        self._revoked_at.pop(device_id, None)
        self._revoked_at[device_id] = now  # newest last
        while self._revoked_at:  # forget what no authorization in flight can predate
            oldest, at = next(iter(self._revoked_at.items()))
            if now - at <= REVOCATION_MEMORY:
                break
            del self._revoked_at[oldest]

    def revoked_since(self, device_id: str, since: float) -> bool:
        """True if ``device_id`` was revoked (:meth:`close_device`) at or after trio time
        ``since``: an authorization asked before then may be stale."""
        at = self._revoked_at.get(device_id)
        return at is not None and at >= since

    def close_all(self, reason: str) -> int:
        """Close every live session; return how many."""
        sessions = list(self._by_device.values())
        for session in sessions:
            session.close(reason)
        return len(sessions)

    def __len__(self) -> int:
        return len(self._by_device)

    def __iter__(self) -> Iterator[DeviceSession]:
        return iter(list(self._by_device.values()))

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._by_device
