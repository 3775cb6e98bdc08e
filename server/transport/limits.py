"""Per-session limits and the token bucket that enforces rates (sans-IO: time is passed in)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from otacore.errors import ValidationError

#: Defaults of the TLS idle sweeper's settings (``server.transport.tls_idle``), seconds.
CIPHER_IDLE_SECONDS = 5.0
SWEEP_INTERVAL = 1.0
TRIM_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one device session may cost the server.

    Times are in seconds. Rates are refilled continuously; bursts are the bucket sizes.
    """

    #: A device must finish its TLS/DTLS handshake (and authorization) within this time:
    #: over TLS from its first ClientHello bytes, over DTLS from its DTLS handshake slot.
    #: Not shorter for DTLS: Device OS retransmits a flight once after 3 s and gives up 6 s
    #: later (mbedtls_ssl_conf_handshake_timeout(3000, 6000); RFC 6347 section 4.2.4
    #: timers), so on a lossy cellular link a device's answer may come ~9 s after the
    #: server's flight, and still be one the device waits for.
    handshake_timeout: float = 10.0
    #: TLS handshakes computing at once per process (OpenSSL working on bytes that arrived,
    #: or the device directory authorizing). A TLS handshake holds its slot only then: it
    #: gives it back whenever it waits for the device, so stalled handshakes hold none.
    #: Later work waits its turn in arrival order, handshakes the server already answered
    #: first (so a storm finishes handshakes instead of starting them all).
    max_handshakes: int = 64
    #: DTLS handshakes in progress at once per process, from the cookie exchange to the
    #: session's start. A DTLS handshake (its task on the UDP endpoint) holds its slot while
    #: it waits for the device too, so it has its own slots: DTLS peers never delay a TLS
    #: handshake. Larger than ``max_handshakes`` since these slots mostly wait on the
    #: network: 256 handshakes hold ~25 MB of OpenSSL state, and all computing at once
    #: take ~0.3 s of CPU, far below a device's 3 s retransmission timer.
    max_dtls_handshakes: int = 256
    #: A connection that waited this long for its first handshake slot is closed unserved;
    #: its device retries after its back-off. Under a reconnect storm the server so spends
    #: its CPU on handshakes that finish before their devices give up, not on all of them
    #: at once. (A TLS handshake the server already answered waits for its next turn
    #: within ``handshake_timeout`` only: the server has invested a signature in it.)
    handshake_wait: float = 3.0
    #: TCP: a connection must send the first bytes of its ClientHello within this time
    #: (devices send it right after connecting), else it is closed.
    hello_timeout: float = 5.0
    #: Connections from one source address (IPv4 address, IPv6 prefix) waiting for or in
    #: their handshake, both transports; beyond it new ones are closed at once.
    #: Established sessions do not count. Generous by default: many devices may share one
    #: public address behind a carrier-grade NAT (or a TCP load balancer without PROXY
    #: protocol: raise it to ``max_sessions`` there).
    max_pending_per_address: int = 256
    #: Slots one source address may hold at once, of each pool (``max_handshakes`` TLS,
    #: ``max_dtls_handshakes`` DTLS): a few addresses cannot hold every DTLS slot (64 are
    #: needed with the defaults). Behind a carrier-grade NAT, one address handshakes 4 DTLS
    #: devices at once (about 4 per second on cellular round trips); its other devices wait
    #: (``handshake_wait``) or retry. For TLS it is no throughput limit: a slot is held for
    #: about a millisecond of computing.
    max_handshakes_per_address: int = 4
    #: IPv6 sources are counted per prefix of this length (a host usually owns a whole /64,
    #: RFC 4291 section 2.5.4) ...
    ipv6_prefix_length: int = 64
    #: ... and, together, per network of this length (a site gets a /48 or /56, RFC 6177):
    #: one site cannot pass for thousands of addresses. Set it to ``ipv6_prefix_length`` to
    #: count per prefix only.
    ipv6_network_prefix_length: int = 48
    #: Pending connections (see ``max_pending_per_address``) of one IPv6 network.
    max_pending_per_ipv6_network: int = 1024
    #: Slots of each pool one IPv6 network may hold (see ``max_handshakes_per_address``).
    max_handshakes_per_ipv6_network: int = 16
    #: Refusals are logged at WARNING: the first of a burst at once, the rest summarised
    #: once per this many seconds.
    refusal_log_interval: float = 10.0
    #: A session whose device has sent nothing for this long is closed (what the server
    #: sends does not count: a vanished device is found out by its silence even while the
    #: server retransmits to it). Devices keep it open with CoAP pings (RFC 7252 section
    #: 4.3 / RFC 8323 section 5.4).
    idle_timeout: float = 120.0
    #: Largest datagram (DTLS) accepted, or largest chunk one ``receive()`` returns (TLS).
    #: The CoAP layer applies its own message-size limit on top for streams.
    max_message_size: int = 1536
    #: DTLS: datagrams per second a device may send (excess datagrams are dropped).
    messages_per_second: float = 50.0
    message_burst: float = 100.0
    #: TLS: bytes per second a device may send (excess delays reading: TCP backpressure).
    bytes_per_second: float = 64 * 1024.0
    byte_burst: float = 128 * 1024.0
    #: A single send that cannot complete within this time marks the peer as too slow.
    send_timeout: float = 30.0
    #: How long graceful shutdown waits for the farewell message and close_notify.
    farewell_timeout: float = 2.0
    #: Most live sessions per listener; connections beyond are refused at once. Each TCP
    #: session costs a file descriptor and the process may hold 20,000.
    max_sessions: int = 19_000
    #: TLS: a session quiet for this long drops its AEAD objects (about 2.5 KiB each) and
    #: derives them again from its traffic secrets on its next record (about 7 us per
    #: direction); it may take up to ``idle_sweep_interval`` more. An OTA transfer's
    #: records come far closer together; keep-alive pings (every 15-30 s) find them
    #: dropped. Lower saves memory on sessions that talk now and then, higher saves CPU.
    cipher_idle_timeout: float = CIPHER_IDLE_SECONDS
    #: TLS: seconds between two looks for quiet sessions (one timer per listener, whatever
    #: the number of sessions).
    idle_sweep_interval: float = SWEEP_INTERVAL
    #: TLS: after handshakes or quiet sessions freed memory, the C heap's free pages go back
    #: to the system (glibc ``malloc_trim``, about 1 ms per 2,000 sessions) at most once per
    #: this many seconds; 0 never trims (RSS then stays at the high-water mark of a burst).
    heap_trim_interval: float = TRIM_INTERVAL

    def __post_init__(self) -> None:
        for name in (
            "handshake_timeout",
            "handshake_wait",
            "hello_timeout",
            "refusal_log_interval",
            "idle_timeout",
            "messages_per_second",
            "message_burst",
            "bytes_per_second",
            "byte_burst",
            "send_timeout",
            "farewell_timeout",
            "cipher_idle_timeout",
            "idle_sweep_interval",
        ):
            if not getattr(self, name) > 0:
                raise ValidationError(f"session limit {name} must be positive")
        if not self.heap_trim_interval >= 0:
            raise ValidationError("session limit heap_trim_interval must be 0 (never) or more")
        if self.max_message_size < 64:
            raise ValidationError("max_message_size must be at least 64 bytes")
        if self.max_sessions < 1:
            raise ValidationError("max_sessions must be at least 1")
        for name in (
            "max_handshakes",
            "max_dtls_handshakes",
            "max_pending_per_address",
            "max_handshakes_per_address",
            "max_pending_per_ipv6_network",
            "max_handshakes_per_ipv6_network",
        ):
            if getattr(self, name) < 1:
                raise ValidationError(f"session limit {name} must be at least 1")
        if not 1 <= self.ipv6_prefix_length <= 128:
            raise ValidationError("ipv6_prefix_length must be between 1 and 128")
        if not 1 <= self.ipv6_network_prefix_length <= self.ipv6_prefix_length:
            raise ValidationError(
                "ipv6_network_prefix_length must be between 1 and ipv6_prefix_length "
                f"({self.ipv6_prefix_length})"
            )

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, str], base: SessionLimits | None = None,
                       ) -> SessionLimits:
        """``base`` (default: the defaults) with fields set from text (``ota server
        --device-limit NAME=VALUE``); ValidationError names an unknown field or bad value."""
        types = {item.name: item.type for item in fields(cls)}
        values: dict[str, Any] = {}
        for name, text in overrides.items():
            kind = types.get(name)
            if kind is None:
                raise ValidationError(
                    f"unknown device limit {name!r}; known: {', '.join(sorted(types))}"
                )
            try:
                values[name] = int(text) if kind in (int, "int") else float(text)
            except ValueError:
                wanted = "an integer" if kind in (int, "int") else "a number"
                raise ValidationError(
                    f"device limit {name} must be {wanted}, not {text!r}"
                ) from None
        return replace(base if base is not None else cls(), **values)


class TokenBucket:
    """A token bucket (rate tokens per second, up to ``capacity``), advanced by caller time.

    ``try_take`` is for traffic that may be dropped (datagrams); ``take`` is for traffic
    that must be delayed instead (streams): it always takes and returns how long the caller
    should wait before taking more, letting the balance go negative meanwhile.
    """

    __slots__ = ("_capacity", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self._rate = rate
        self._capacity = capacity
        self._tokens = capacity
        self._updated = now

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:  # a clock that goes backwards must not mint tokens
            self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
            self._updated = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (negative while in debt)."""
        self._refill(now)
        return self._tokens

    def try_take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if available and return True; else take nothing."""
        self._refill(now)
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens unconditionally; return seconds until the balance is >= 0."""
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
