"""Starting the sessions restored after a graceful restart, many at a time.

The next process restores every saved DTLS session at once (issue 14 item 6) and each
session's start does two store round trips of its own: the presence write (device online,
its lease, its OTA memory read; three statements and a read) and, once its updater is
attached, the updater's read of the device's target (three or four queries). At 10,000
restored devices these were most of the ~0.6 ms of server CPU per device (py-spy, see
bench/sessions/README.md, "Restored sessions started in batches"). Here the starts that are
waiting are served together, as the store's group commit serves its writers: one presence
write for all of them (``PresenceService.restored_sessions_online``), then one target read
for all (``server.fleet.targets.targets_of_devices``), whose views each updater plans from
(``SessionUpdater.kick_with``) instead of reading its own.

Never losing an update: a batch's target read begins (``read_at``) only after every
session of the batch has its updater attached, so a release committed after the read began
reaches the updater (``OtaEngine`` drops views read before a release, ``forget_view``, and
``kick_with`` then reads anew); a release made while the server was down is in the read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from server.fleet.base import unknown_device
from server.fleet.targets import DeviceTarget, targets_of_devices
from server.transport.session import CloseReason, SessionClosed

if TYPE_CHECKING:
    from server.devices.plane import DevicePlane
    from server.devices.session import DeviceSessionHandler

__all__ = ["BATCH", "RestoredStarts"]

log = logging.getLogger("ota.devices")

#: Sessions per batch at most. The hand-off of OTA memories (``server.fleet.hand_off``) holds
#: 8,192: a batch far smaller leaves each memory there until its updater takes it; and the
#: first devices are served while the next batches are written.
BATCH: Final = 1000


@dataclass(eq=False)
class _Online:
    """One restored session waiting for its presence write."""

    device_id: str
    ip: str | None
    presence: str
    done: trio.Event = field(default_factory=trio.Event)
    #: Set when the write failed for this session (raised by its start).
    error: BaseException | None = None


class RestoredStarts:
    """The device plane's batches of restored sessions' starts (see the module docstring)."""

    def __init__(self, plane: DevicePlane) -> None:
        self.plane = plane
        self._online: list[_Online] = []
        self._online_running = False
        self._targets: list[DeviceSessionHandler] = []
        self._targets_running = False
        #: Batches written and read so far (presence, targets): for tests and logs.
        self.batches = [0, 0]

    async def online(self, device_id: str, ip: str | None, presence: str) -> None:
        """Mark the restored session's device online (``PresenceService.device_online``
        for many sessions at once); raises what that write would (the device no longer
        exists: UnknownDeviceError; the store failed: its error)."""
        entry = _Online(device_id, ip, presence)
        if not self._online_running:
            self.plane.spawn(self._write_online)  # raises if the plane is not serving
            self._online_running = True
        self._online.append(entry)
        # Shielded: the write of a session whose start is cancelled may still commit, and
        # that session's end then marks the device offline (it must come after).
        with trio.CancelScope(shield=True):
            await entry.done.wait()
        if entry.error is not None:
            raise entry.error

    async def _write_online(self) -> None:
        try:
            while self._online:
                batch, self._online = self._online[:BATCH], self._online[BATCH:]
                try:
                    marked = await self.plane.fleet.restored_sessions_online(
                        [(entry.device_id, entry.ip, entry.presence) for entry in batch])
                except Exception as exc:  # each session's start fails as its own write would
                    for entry in batch:
                        entry.error = exc
                else:
                    self.batches[0] += 1
                    for entry, exists in zip(batch, marked, strict=True):
                        if not exists:
                            entry.error = unknown_device(entry.device_id)
                finally:
                    for entry in batch:
                        entry.done.set()
        finally:
            self._online_running = False
            # Cancelled (the plane stops): the starts still waiting end their sessions.
            left, self._online = self._online, []
            for entry in left:
                entry.error = SessionClosed(CloseReason.SHUTDOWN)
                entry.done.set()

    def check_target(self, handler: DeviceSessionHandler) -> None:
        """Have the session's updater check its device's target (as after a Hello), from
        a target read for many restored sessions at once. Call once the updater is
        attached (``DevicePlane.on_session_start``)."""
        if handler.updater is None:  # no OTA engine: whatever the hooks do
            for hook in handler.on_hello:
                hook(None, None)
            return
        if not self._targets_running:
            self.plane.spawn(self._read_targets)  # raises if the plane is not serving
            self._targets_running = True
        self._targets.append(handler)

    async def _read_targets(self) -> None:
        try:
            while self._targets:
                batch, self._targets = self._targets[:BATCH], self._targets[BATCH:]
                # Every updater of the batch is attached: a release committed after this
                # instant drops the views read here (module docstring).
                read_at = trio.current_time()
                views: dict[str, DeviceTarget] = {}
                try:
                    views = await self._read([handler.device_id for handler in batch])
                    self.batches[1] += 1
                except Exception as exc:  # a task of the plane must not raise
                    # Each checks for itself instead (reading its own target, retrying on a
                    # store error), as after an immediate release's failed read.
                    log.warning("could not read the targets of %d restored sessions: %s; "
                                "each reads its own", len(batch), exc)  # fmt: skip
                for handler in batch:
                    updater = handler.updater
                    if updater is None or handler.session.closed:
                        continue
                    view = views.get(handler.device_id)
                    if view is None:
                        updater.kick()
                    else:
                        updater.kick_with(view, read_at)
        finally:
            self._targets_running = False

    async def _read(self, device_ids: list[str]) -> dict[str, DeviceTarget]:
        fleet = self.plane.fleet

        def read() -> dict[str, DeviceTarget]:
            with fleet.store.read() as tx:
                return targets_of_devices(tx, device_ids)

        return await trio.to_thread.run_sync(read, limiter=fleet.limiter)
