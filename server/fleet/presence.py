"""Device presence in the store: which devices are online, and which session says so.

A session marks its device online with its own token ("<process origin>/<serial>"), and
only that session marks it offline again: when a device reconnects (maybe to another server
process sharing the store) before its old session notices it is gone, the old session's end
leaves the new one's presence alone. The supervisor of the worker processes clears the
presence of every session of a worker that died (``sessions_lost``).
"""

from __future__ import annotations

from typing import Any

from server.events import STATUS, Event
from server.fleet.base import FleetBase, Outcome, normalize_device_id, unknown_device
from server.store import Tx
from server.store.tx_ota import OtaMemoryRecord


class PresenceService(FleetBase):
    """Online and offline, owned by sessions (used by ``server.devices.session``)."""

    async def device_online(self, device_id: str, *, ip: str | None = None,
                            session: str | None = None) -> None:
        """A session resumed without a hello (or came up): mark online, emit spark/status.
        ``session`` names it ("<process origin>/<serial>"): from then on only that session
        (or the death of its process) marks the device offline. The same transaction reads
        the device's OTA memory and leaves it for the session's updater (see
        ``server.fleet.hand_off``)."""
        memory = await self._set_online(device_id, True, ip, session)
        if session is not None and memory is not None:
            self.memory_hand_off.put(session, memory)

    async def device_offline(self, device_id: str, *, session: str | None = None) -> None:
        """The device's session ended: mark offline, emit spark/status "offline" (with
        ``session``, only if that session still holds the device: it may have reconnected
        meanwhile, maybe to another server process)."""
        if session is not None:
            self.memory_hand_off.drop(session)
        await self._set_online(device_id, False, None, session)

    async def sessions_lost(self, origin: str) -> int:
        """A server process died: its sessions are gone, mark their devices offline (they
        reconnect to a live process). Returns how many."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            devices = tx.clear_presence_of_origin(origin, now)
            events = [
                Event(STATUS, "offline", product_id=product_id, device_id=device_id,
                      coreid=device_id, published_at=now)
                for device_id, product_id in devices
            ]
            return Outcome(len(devices), events)

        count: int = await self._run_grouped(work)
        return count

    async def _set_online(self, device_id: str, online: bool, ip: str | None,
                          session: str | None) -> OtaMemoryRecord | None:
        """Mark the device online or offline; the device's OTA memory as this transaction
        read it when a session marks it online, else None."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            normalized = normalize_device_id(device_id)
            found = tx.get_device_online(normalized)  # not the whole row: two columns
            if found is None:
                raise unknown_device(device_id)
            product_id, was_online = found
            if not online and session is not None:
                if not tx.clear_presence(normalized, session, now):
                    return Outcome(None)  # a newer session holds the device
            else:
                fields: dict[str, Any] = {"online": online, "last_heard_at": now}
                if online:
                    fields["session_owner"] = session
                if ip is not None:
                    fields["last_ip_address"] = ip
                tx.update_device(normalized, fields, now)
            # Read after the presence is this session's (see server.fleet.hand_off).
            memory = tx.get_ota_memory(normalized) if online and session is not None else None
            if was_online == online:
                return Outcome(memory)
            event = Event(
                STATUS,
                "online" if online else "offline",
                product_id=product_id,
                device_id=normalized,
                coreid=normalized,
                published_at=now,
            )
            return Outcome(memory, [event])

        memory: OtaMemoryRecord | None = await self._run_grouped(work)
        return memory
