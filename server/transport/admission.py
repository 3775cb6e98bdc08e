"""Handshake admission: what a connection, a source address and a process may hold before
sessions start.

A connection is *pending* from accept (or, for DTLS, from the cookie exchange) until its
session starts or it is refused. While pending it counts against its source: the IPv4
address, or the IPv6 prefix (``ipv6_prefix_length``, a /64) and, together, the IPv6 network
(``ipv6_network_prefix_length``, a /48). A source with too many pending connections has new
ones closed at once (``max_pending_per_address``, ``max_pending_per_ipv6_network``).

Handshake slots bound the CPU spent on concurrent handshakes, in two pools per process:

* TLS (``max_handshakes``): a handshake holds a slot only while it computes, from the
  moment bytes from the device arrive until it next waits for the network (see
  ``server.transport.tls``), and while the device directory authorizes it. A stalled TLS
  handshake so holds nothing, however many there are.
* DTLS (``max_dtls_handshakes``): the UDP endpoint runs each handshake as one task that
  also waits for the device, so a DTLS handshake holds its slot throughout. A separate pool
  keeps DTLS peers from ever delaying TLS handshakes.

A connection takes a slot of its source's share of the pool (``max_handshakes_per_address``,
and ``max_handshakes_per_ipv6_network`` for IPv6), then of the process's pool, each in arrival
order; handshakes the server already answered take theirs before those it has not (a storm
then finishes handshakes instead of starting them all). The first wait is bounded by
``handshake_wait``: a connection that waited longer is closed with no cryptography spent.

Established sessions do not count: many real devices may share one public address (a
carrier-grade NAT, RFC 6888), so every bound is settable (``ota server --device-limit``).
"""

from __future__ import annotations

import ipaddress
import math
from functools import lru_cache

import trio

from server.transport.limits import SessionLimits


@lru_cache(maxsize=4096)
def source_keys(
    host: str, ipv6_prefix_length: int = 64, ipv6_network_prefix_length: int = 48
) -> tuple[str, ...]:
    """The names under which connections from ``host`` are counted, most specific first:
    ``(ipv4,)``, or ``(ipv6 /prefix, ipv6 /network)`` (one name when the two lengths are
    equal). An IPv4-mapped IPv6 address counts as its IPv4 address; anything unparsable is
    counted under its own text."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone index
    except ValueError:
        return (host,)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return (str(ip.ipv4_mapped),)
        prefix = str(ipaddress.IPv6Network((ip, ipv6_prefix_length), strict=False))
        if ipv6_network_prefix_length >= ipv6_prefix_length:
            return (prefix,)
        network = str(ipaddress.IPv6Network((ip, ipv6_network_prefix_length), strict=False))
        return (prefix, network)
    return (str(ip),)


class SlotPool:
    """``size`` slots, given in arrival order; a taker marked ``urgent`` goes before every
    taker that is not. ``give_back`` hands the slot straight to the next taker, so a free
    slot means nobody waits. Like ``trio.CapacityLimiter``, but with two classes of takers
    and no notion of an owner (each caller gives back exactly what it took)."""

    __slots__ = ("_later", "_urgent", "borrowed", "owner", "size", "transport")

    def __init__(self, size: int, transport: str, owner: str = "") -> None:
        self.size = size
        self.transport = transport
        #: The source this pool is the share of ("" for the process's pool).
        self.owner = owner
        #: Slots held now (including one being handed to a waiter).
        self.borrowed = 0
        # Created on the first wait: most sources never wait.
        self._urgent: trio.lowlevel.ParkingLot | None = None
        self._later: trio.lowlevel.ParkingLot | None = None

    async def take(self, urgent: bool = False) -> None:
        """Wait for a slot (in arrival order within the taker's class). Cancelled while
        waiting, the caller holds nothing; returned, it holds one slot."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.borrowed < self.size:
            self.borrowed += 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if urgent:
            if self._urgent is None:
                self._urgent = trio.lowlevel.ParkingLot()
            lot = self._urgent
        else:
            if self._later is None:
                self._later = trio.lowlevel.ParkingLot()
            lot = self._later
        # give_back() unparks us with its slot: once park() returns we hold it (trio never
        # cancels a task that has been rescheduled).
        await lot.park()

    def give_back(self) -> None:
        """Return one slot taken with :meth:`take`: to the first urgent waiter, else to the
        first other waiter, else to the pool."""
        for lot in (self._urgent, self._later):
            if lot and lot.unpark():
                return
        self.borrowed -= 1

    @property
    def waiting(self) -> int:
        """Takers waiting now."""
        return len(self._urgent or ()) + len(self._later or ())

    def describe(self) -> str:
        """Which slots these are, for log lines."""
        protocol = "TLS" if self.transport == "tcp" else "DTLS"
        if not self.owner:
            return f"all {self.size} {protocol} handshake slots"
        return f"the {self.size} {protocol} handshake slots of {self.owner}"


class NotAdmitted(Exception):
    """A connection gets no handshake slot: the caller closes it unserved."""


class SlotsBusy(NotAdmitted):
    """The slots stayed busy for ``handshake_wait``; ``detail`` names which."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AdmissionClosed(NotAdmitted):
    """The server began shutting down: no new handshake starts."""


class HandshakeTurn:
    """One connection's claim on handshake slots: one of its source's share (its IPv6
    network's too) and one of the process's pool, taken together and given back together.

    ``answered`` marks a TLS handshake the server has sent its first flight for: its later
    takes go first and wait within the handshake's deadline only.
    """

    __slots__ = ("_gate", "_pools", "answered", "held")

    def __init__(self, gate: HandshakeGate, pools: tuple[SlotPool, ...]) -> None:
        self._gate = gate
        self._pools = pools
        #: True while this connection holds its slots.
        self.held = False
        self.answered = False

    async def take(self) -> None:
        """Hold the slots (no-op if held). A first take (nothing answered yet) waits at
        most ``handshake_wait`` (else :class:`SlotsBusy`) and is refused once shutdown began
        (:class:`AdmissionClosed`); cancelled while waiting, nothing is held."""
        if self.held:
            await trio.lowlevel.checkpoint()
            return
        gate, pools, urgent = self._gate, self._pools, self.answered
        if not urgent and not gate.accepting:
            await trio.lowlevel.checkpoint()
            raise AdmissionClosed
        wait = math.inf if urgent else gate.limits.handshake_wait
        taken = 0
        try:
            with trio.move_on_after(wait) as scope:
                for pool in pools:
                    await pool.take(urgent)
                    taken += 1
        finally:
            if taken < len(pools):  # timed out, cancelled or failed midway: keep nothing
                for pool in reversed(pools[:taken]):
                    pool.give_back()
        if scope.cancelled_caught and taken < len(pools):
            raise SlotsBusy(_busy(pools, taken, wait))
        self.held = True
        if not urgent and not gate.accepting:  # shutdown began while it waited
            self.give_back()
            raise AdmissionClosed

    def give_back(self) -> None:
        """Give the slots back if held (idempotent: every exit path may call it)."""
        if self.held:
            self.held = False
            for pool in reversed(self._pools):  # the process's first: it goes to a waiter
                pool.give_back()  # that already holds its source's share


def _busy(pools: tuple[SlotPool, ...], index: int, wait: float) -> str:
    """Why a take of ``pools`` gave up waiting at ``pools[index]``."""
    pool = pools[index]
    if index == len(pools) - 1:  # the process's pool
        knob = "max_handshakes" if pool.transport == "tcp" else "max_dtls_handshakes"
        advice = f"if the CPU allows more at once, raise ota server --device-limit {knob}=N"
    else:
        knob = "max_handshakes_per_address" if index == 0 else "max_handshakes_per_ipv6_network"
        advice = f"if many devices share {pool.owner}, raise ota server --device-limit {knob}=N"
    return f"{pool.describe()} busy for {wait:g} s ({advice})"


class _Source:
    """Pending connections and slot shares of one source (address or IPv6 network)."""

    __slots__ = ("dtls", "network", "pending", "tls")

    def __init__(self, key: str, slots: int, network: bool) -> None:
        self.pending = 0
        #: True for an IPv6 network (its prefixes count under it too).
        self.network = network
        self.tls = SlotPool(slots, "tcp", key)
        self.dtls = SlotPool(slots, "udp", key)


class HandshakeGate:
    """Pending connections per source, and the handshake slot pools (per source and per
    process) with their turns.

    ``enter`` before anything is spent on a connection and ``leave`` once it is refused or
    its session starts; between the two, a :class:`HandshakeTurn` from :meth:`turn` takes
    and gives back slots. Entries exist only while a source has pending connections, so
    memory follows the connections, not the addresses ever seen.
    """

    __slots__ = ("_sources", "accepting", "dtls", "limits", "tls")

    def __init__(self, limits: SessionLimits) -> None:
        self.limits = limits
        self._sources: dict[str, _Source] = {}
        #: The process's pools.
        self.tls = SlotPool(limits.max_handshakes, "tcp")
        self.dtls = SlotPool(limits.max_dtls_handshakes, "udp")
        #: False once shutdown began: first takes are refused.
        self.accepting = True

    def keys(self, host: str) -> tuple[str, ...]:
        """The source names connections from ``host`` count under (address first)."""
        limits = self.limits
        return source_keys(host, limits.ipv6_prefix_length, limits.ipv6_network_prefix_length)

    def enter(self, keys: tuple[str, ...]) -> str | None:
        """Count a new pending connection from ``keys``. None when counted; else (nothing
        counted) why not: the source whose bound is reached, and the setting to raise."""
        limits = self.limits
        bounds = (limits.max_pending_per_address, limits.max_pending_per_ipv6_network)
        knobs = ("max_pending_per_address", "max_pending_per_ipv6_network")
        for key, bound, knob in zip(keys, bounds, knobs, strict=False):
            source = self._sources.get(key)
            if source is not None and source.pending >= bound:
                return (
                    f"{bound} connections from {key} already wait for or are in a "
                    "handshake; if many devices share it (NAT, load balancer) raise "
                    f"ota server --device-limit {knob}=N"
                )
        shares = (limits.max_handshakes_per_address, limits.max_handshakes_per_ipv6_network)
        for level, (key, share) in enumerate(zip(keys, shares, strict=False)):
            source = self._sources.get(key)
            if source is None:
                source = self._sources[key] = _Source(key, share, network=level > 0)
            source.pending += 1
        return None

    def leave(self, keys: tuple[str, ...]) -> None:
        """A pending connection counted by :meth:`enter` was refused or started its session."""
        for key in keys:
            source = self._sources[key]
            source.pending -= 1
            if source.pending == 0:
                del self._sources[key]

    def turn(self, transport: str, keys: tuple[str, ...]) -> HandshakeTurn:
        """A claim on ``transport``'s slots for a connection counted under ``keys``."""
        if transport == "tcp":
            pools = (*(self._sources[key].tls for key in keys), self.tls)
        else:
            pools = (*(self._sources[key].dtls for key in keys), self.dtls)
        return HandshakeTurn(self, pools)

    def pending(self, key: str) -> int:
        """Pending connections counted under ``key`` now."""
        source = self._sources.get(key)
        return 0 if source is None else source.pending

    def handshakes(self, key: str, transport: str | None = None) -> int:
        """Slots held under ``key`` now (of ``transport``'s pool, or of both)."""
        source = self._sources.get(key)
        if source is None:
            return 0
        if transport is None:
            return source.tls.borrowed + source.dtls.borrowed
        return (source.tls if transport == "tcp" else source.dtls).borrowed

    def waiting(self) -> int:
        """Takes waiting for a slot now (of a source's share or of a process pool)."""
        shares = sum(s.tls.waiting + s.dtls.waiting for s in self._sources.values())
        return shares + self.tls.waiting + self.dtls.waiting

    def total_pending(self) -> int:
        """Pending connections now (each counted once, under its address)."""
        return sum(s.pending for s in self._sources.values() if not s.network)

    def __len__(self) -> int:
        """Sources with pending connections."""
        return len(self._sources)
