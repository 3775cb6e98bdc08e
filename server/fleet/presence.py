"""Device presence in the store: which devices are online, which session says so, and the
session's lease.

A session marks its device online with its own token ("<process origin>/<serial>") and its
node (``session_node``), and only that session marks it offline again: when a device
reconnects (maybe to another server process or node sharing the store) before its old
session notices it is gone, the old session's end leaves the new one's presence alone. The
supervisor of the worker processes clears the presence of every session of a worker that
died (``sessions_lost``).

Several nodes share one store (issue 16 item 3), so presence is a lease: the write that marks
a device online also sets ``session_lease_until``; each server process (a node's main
process and each of its workers) renews the leases of all its own sessions in one statement
per period (:meth:`PresenceService.renew_session_leases`, driven by the process's
``server.leases.SessionLeaseKeeper``), and a lease its process did not renew in time (the
process or its node died, hung, or lost the store) is free: the device's next session on
any node takes it, and the installation's one sweeper
(:meth:`PresenceService.sweep_expired_sessions`) marks the device offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.events import STATUS, Event
from server.fleet.base import FleetBase, Outcome, normalize_device_id, unknown_device
from server.store import Tx
from server.store.tx_ota import OtaMemoryRecord

#: The node name of a store used by one server (no ``--node-id``; see server.leases).
LOCAL_NODE = "local"
#: Seconds a session lease lasts unless configured (``cluster.session_lease``).
DEFAULT_SESSION_LEASE = 30.0
#: Seconds between a server process's renewals of its sessions' leases unless configured
#: (``cluster.lease_renew_interval``).
DEFAULT_LEASE_RENEW_INTERVAL = 10.0


def offline_events(devices: list[tuple[str, int]], now: int) -> list[Event]:
    """spark/status "offline" of each (device id, product id)."""
    return [Event(STATUS, "offline", product_id=product_id, device_id=device_id,
                  coreid=device_id, published_at=now)
            for device_id, product_id in devices]


class PresenceService(FleetBase):
    """Online and offline, owned by sessions (used by ``server.devices.session``)."""

    #: This node's name in ``devices.session_node`` (``configure_session_leases``).
    session_node: str = LOCAL_NODE
    #: Milliseconds a session's lease lasts from its last write or renewal.
    session_lease_ms: int = int(DEFAULT_SESSION_LEASE * 1000)

    def configure_session_leases(self, node: str, lease_seconds: float) -> None:
        """Name this node and set how long its sessions' leases last (before any session
        starts)."""
        if not 0 < len(node) <= 64:
            raise ValueError(f"a node id is 1 to 64 characters, not {node!r}")
        if not lease_seconds > 0:
            raise ValueError(f"a session lease lasts a positive time, not {lease_seconds!r}")
        self.session_node = node
        self.session_lease_ms = max(1, round(lease_seconds * 1000))

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

    async def restored_sessions_online(
        self, sessions: Sequence[tuple[str, str | None, str]]
    ) -> list[bool]:
        """:meth:`device_online` of many sessions restored after a graceful restart, each
        (device id, ip or None, session token), in one group-committed transaction with a
        fixed number of statements per ``MANY_CHUNK`` devices
        (:class:`server.store.tx_many_devices.ManyDeviceQueries`; instead of three
        statements and a read per device). Same outcome per device
        as :meth:`device_online`: online with its session's lease, its OTA memory left for
        its updater, a spark/status "online" event if it was offline. For each session, in
        order: False when its device no longer exists (nothing written for it)."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            ids = [normalize_device_id(device_id) for device_id, _, _ in sessions]
            found = tx.get_devices_online(ids)
            until = now + self.session_lease_ms
            changes: list[tuple[str, dict[str, Any]]] = []
            events: list[Event] = []
            for device_id, (_, ip, session) in zip(ids, sessions, strict=True):
                if device_id not in found:
                    continue
                fields: dict[str, Any] = {
                    "online": True, "last_heard_at": now, "session_owner": session,
                    "session_node": self.session_node, "session_lease_until": until,
                }  # fmt: skip
                if ip is not None:
                    fields["last_ip_address"] = ip
                changes.append((device_id, fields))
                product_id, was_online = found[device_id]
                if not was_online:
                    found[device_id] = (product_id, True)  # one event if listed twice
                    events.append(Event(STATUS, "online", product_id=product_id,
                                        device_id=device_id, coreid=device_id,
                                        published_at=now))  # fmt: skip
            tx.update_devices(changes, now)
            # Read after the presence is these sessions' (see server.fleet.hand_off).
            memories = tx.get_ota_memories([device_id for device_id, _ in changes])
            return Outcome([memories.get(device_id) for device_id in ids], events)

        memories: list[OtaMemoryRecord | None] = await self._run_grouped(work)
        for (_, _, session), memory in zip(sessions, memories, strict=True):
            if memory is not None:
                self.memory_hand_off.put(session, memory)
        return [memory is not None for memory in memories]

    async def device_offline(self, device_id: str, *, session: str | None = None) -> None:
        """The device's session ended: mark offline, emit spark/status "offline" (with
        ``session``, only if that session still holds the device: it may have reconnected
        meanwhile, maybe to another server process)."""
        if session is not None:
            self.memory_hand_off.drop(session)
        await self._set_online(device_id, False, None, session)

    async def sessions_lost(self, origin: str) -> int:
        """A server process of this node died: its sessions are gone, mark their devices
        offline (they reconnect to a live process). Returns how many."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            devices = tx.clear_presence_of_origin(origin, now, self.session_node)
            return Outcome(len(devices), offline_events(devices, now))

        count: int = await self._run_grouped(work)
        return count

    async def release_node_sessions(self) -> int:
        """This node starts: no session of its previous incarnation survives, so the
        devices whose leases it held are offline now (not after the leases expire); other
        nodes' devices are left alone. Returns how many."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            devices = tx.release_node_sessions(self.session_node, now)
            return Outcome(len(devices), offline_events(devices, now))

        count: int = await self._run_grouped(work)
        return count

    async def renew_session_leases(self, origin: str) -> set[tuple[str, str]]:
        """Extend the leases of every session of server process ``origin`` of this node
        (session tokens "<origin>/<serial>") in one statement; (device id, session token)
        of each lease renewed. Each process renews only its own: a hung or dead process's
        leases run out, and the sweeper frees its devices."""

        def work(tx: Tx) -> Outcome:
            until = self.clock() + self.session_lease_ms
            return Outcome(set(tx.renew_session_leases(self.session_node, origin, until)))

        renewed: set[tuple[str, str]] = await self._run_grouped(work)
        return renewed

    async def sweep_expired_sessions(self) -> int:
        """Mark offline every device whose session lease expired (its node died or lost
        the store), with one spark/status "offline" event each. Returns how many."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            devices = tx.sweep_expired_sessions(now)
            return Outcome(len(devices), offline_events(devices, now))

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
                if not tx.clear_presence(normalized, session, now, self.session_node):
                    return Outcome(None)  # a newer session holds the device
            else:
                fields: dict[str, Any] = {"online": online, "last_heard_at": now}
                if online:
                    # The session takes the device's lease, whoever held it: the device
                    # is here now, so an older session elsewhere is stale (its process
                    # closes it at its next renewals: server.leases.SessionLeaseKeeper).
                    fields["session_owner"] = session
                    fields["session_node"] = None if session is None else self.session_node
                    fields["session_lease_until"] = (
                        None if session is None else now + self.session_lease_ms)
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
