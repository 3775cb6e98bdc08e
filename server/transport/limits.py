"""Per-session limits and the token bucket that enforces rates (sans-IO: time is passed in)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from otacore.errors import ValidationError


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one device session may cost the server.

    Times are in seconds. Rates are refilled continuously; bursts are the bucket sizes.
    """

    #: A device must finish its TLS/DTLS handshake (and authorization) within this time.
    handshake_timeout: float = 10.0
    #: Handshakes (with authorization) in progress at once per process, both transports;
    #: later connections wait their turn in arrival order.
    max_handshakes: int = 64
    #: A connection that waited this long for its turn is closed unserved; its device
    #: retries after its back-off. Under a reconnect storm the server so spends its CPU on
    #: handshakes that finish before their devices give up, not on all of them at once.
    handshake_wait: float = 3.0
    #: TCP: a connection must send the first bytes of its ClientHello within this time
    #: (devices send it right after connecting), else it is closed. Until those bytes
    #: arrive it holds no handshake slot, so silent connections cannot stall other devices.
    hello_timeout: float = 5.0
    #: Connections from one source address (IPv4 address, IPv6 prefix) waiting for or in
    #: their handshake, both transports; beyond it new ones are closed at once.
    #: Established sessions do not count. Generous by default: many devices may share one
    #: public address behind a carrier-grade NAT (or a TCP load balancer without PROXY
    #: protocol: raise it to ``max_sessions`` there).
    max_pending_per_address: int = 256
    #: Handshake slots one source address may hold at once (of ``max_handshakes``); its
    #: other pending connections wait their turn within ``handshake_wait``.
    max_handshakes_per_address: int = 16
    #: IPv6 sources are counted per prefix of this length (a host usually owns a /64).
    ipv6_prefix_length: int = 64
    #: Refusals are logged at WARNING: the first of a burst at once, the rest summarised
    #: once per this many seconds.
    refusal_log_interval: float = 10.0
    #: A session with no traffic in either direction for this long is closed. Devices keep
    #: it open with CoAP pings (RFC 7252 section 4.3 / RFC 8323 section 5.4).
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
        ):
            if not getattr(self, name) > 0:
                raise ValidationError(f"session limit {name} must be positive")
        if self.max_message_size < 64:
            raise ValidationError("max_message_size must be at least 64 bytes")
        if self.max_sessions < 1:
            raise ValidationError("max_sessions must be at least 1")
        for name in ("max_handshakes", "max_pending_per_address", "max_handshakes_per_address"):
            if getattr(self, name) < 1:
                raise ValidationError(f"session limit {name} must be at least 1")
        if not 1 <= self.ipv6_prefix_length <= 128:
            raise ValidationError("ipv6_prefix_length must be between 1 and 128")

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
