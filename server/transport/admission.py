"""Per-source-address admission: what one address may hold before its sessions start.

A connection is *pending* from accept (or, for DTLS, from the cookie exchange) until its
session starts or it is refused. Two bounds apply per source address, on top of the
process-wide handshake slots (:attr:`SessionLimits.max_handshakes`):

* ``max_pending_per_address``: pending connections (waiting for their first bytes, waiting
  for a slot, or handshaking); a new connection beyond it is closed at once;
* ``max_handshakes_per_address``: handshake slots held at once; its other pending
  connections wait their turn (within ``handshake_wait``), so one address can never hold
  every slot.

Established sessions do not count: many real devices may share one public address (a
carrier-grade NAT, RFC 6888), so the defaults are generous and both are settable
(``ota server --device-limit``). IPv6 sources are grouped by their ``ipv6_prefix_length``
prefix (one host usually owns a whole /64, RFC 4291 section 2.5.4).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

import trio

from server.transport.limits import SessionLimits


@lru_cache(maxsize=4096)
def address_key(host: str, ipv6_prefix_length: int = 64) -> str:
    """The name under which connections from ``host`` are counted: the IPv4 address, or
    the IPv6 ``/ipv6_prefix_length`` network (an IPv4-mapped IPv6 address counts as its
    IPv4 address). Anything unparsable is counted under its own text."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone index
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix_length), strict=False))
    return str(ip)


class _Source:
    """Pending connections and handshake slots of one source address."""

    __slots__ = ("pending", "slots")

    def __init__(self, slots: int) -> None:
        self.pending = 0
        # FIFO like the process-wide slots: trio wakes a CapacityLimiter's waiters in order.
        self.slots = trio.CapacityLimiter(slots)


class AddressGate:
    """Counts pending connections and handshake slots per source address.

    ``enter`` before anything is spent on a connection, ``leave`` once it is refused or its
    session starts; between the two, ``acquire_slot``/``release_slot`` (same task) bound the
    handshakes it may run at once. Entries exist only while an address has pending
    connections, so memory follows the connections, not the addresses ever seen.
    """

    __slots__ = ("_limits", "_sources")

    def __init__(self, limits: SessionLimits) -> None:
        self._limits = limits
        self._sources: dict[str, _Source] = {}

    def key(self, host: str) -> str:
        """The source name connections from ``host`` count under."""
        return address_key(host, self._limits.ipv6_prefix_length)

    def enter(self, key: str) -> bool:
        """Count a new pending connection from ``key``; False (nothing counted) when that
        address already has ``max_pending_per_address`` pending connections."""
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = _Source(self._limits.max_handshakes_per_address)
        elif source.pending >= self._limits.max_pending_per_address:
            return False
        source.pending += 1
        return True

    def leave(self, key: str) -> None:
        """A pending connection from ``key`` was refused or started its session."""
        source = self._sources[key]
        source.pending -= 1
        if source.pending == 0:
            del self._sources[key]

    async def acquire_slot(self, key: str) -> None:
        """Wait (in arrival order) for one of the address's handshake slots."""
        await self._sources[key].slots.acquire()

    def release_slot(self, key: str) -> None:
        """Give back the address slot this task acquired."""
        self._sources[key].slots.release()

    def pending(self, key: str) -> int:
        """Pending connections from ``key`` now."""
        source = self._sources.get(key)
        return 0 if source is None else source.pending

    def handshakes(self, key: str) -> int:
        """Handshake slots ``key`` holds now."""
        source = self._sources.get(key)
        return 0 if source is None else int(source.slots.borrowed_tokens)

    def waiting(self) -> int:
        """Connections waiting for their address's handshake slots now."""
        return sum(source.slots.statistics().tasks_waiting for source in self._sources.values())

    def total_pending(self) -> int:
        """Pending connections from every address now."""
        return sum(source.pending for source in self._sources.values())

    def __len__(self) -> int:
        """Addresses with pending connections."""
        return len(self._sources)
