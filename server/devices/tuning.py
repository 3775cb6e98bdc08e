"""Device plane settings that are the same in every server process (``[devices]`` in
``ota server --config``): CoAP frame and request limits, the graceful-shutdown hold-off, and
the listeners' socket and certificate settings."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from otacore.errors import ValidationError
from server.transport.server import DeviceServerConfig

#: Largest Hold-Off a Release may carry: a 4-byte uint option (RFC 8323 section 5.5).
MAX_HOLD_OFF = 0xFFFFFFFF


@dataclass(frozen=True)
class DeviceTuning:
    """Settings of the device sessions and listeners an operator may tune."""

    #: Largest CoAP-over-TCP frame a device may send, bytes (RFC 8323 section 3.3); a
    #: firmware chunk, its CoAP header and the transfer header must fit.
    max_frame_size: int = 65536 + 1024
    #: Seconds the server waits for a device's answer to a request it sent (Describe,
    #: function calls, variable reads).
    request_timeout: float = 30.0
    #: Seconds a device is told to wait before reconnecting after a graceful shutdown
    #: (RFC 8323 Release Hold-Off over TLS, a shutdown event over DTLS).
    shutdown_hold_off: int = 10
    #: Datagrams queued per DTLS session and not yet read; the UDP endpoint drops beyond
    #: it (CoAP retransmits, RFC 7252 4.2).
    dtls_queue_size: int = DeviceServerConfig.dtls_queue_size
    #: SO_RCVBUF/SO_SNDBUF asked for the DTLS socket, bytes (None: the system default;
    #: Linux caps it at net.core.rmem_max/wmem_max unless the server has CAP_NET_ADMIN).
    udp_buffer_bytes: int | None = DeviceServerConfig.udp_buffer_bytes
    #: Save established DTLS sessions at graceful shutdown (sealed in the data directory)
    #: and restore them on start, so devices go on without a handshake. Only sessions whose
    #: handler can carry its state over are saved; never with several server processes.
    save_dtls_sessions: bool = DeviceServerConfig.save_dtls_sessions
    #: Seconds: saved DTLS sessions idle for longer than this (or a saved file older) are
    #: not restored; those devices handshake again.
    saved_session_max_age: float = DeviceServerConfig.saved_session_max_age
    #: DNS names in the server certificate's subjectAltName, used when the certificate
    #: is issued: on the first start, and when it is renewed (within 30 days of expiry).
    server_dns_names: tuple[str, ...] = DeviceServerConfig.server_dns_names
    #: IP addresses in the server certificate's subjectAltName (issued as above).
    server_ip_addresses: tuple[str, ...] = DeviceServerConfig.server_ip_addresses

    def __post_init__(self) -> None:
        if not 1024 <= self.max_frame_size <= 16 * 1024 * 1024:
            raise ValidationError(
                f"max_frame_size must be 1024 to 16777216 bytes, not {self.max_frame_size}"
            )
        if not (math.isfinite(self.request_timeout) and self.request_timeout > 0):
            raise ValidationError("request_timeout must be a positive number of seconds")
        if not 0 <= self.shutdown_hold_off <= MAX_HOLD_OFF:
            raise ValidationError(
                f"shutdown_hold_off must be 0 to {MAX_HOLD_OFF} seconds, not "
                f"{self.shutdown_hold_off}"
            )
        if not (math.isfinite(self.saved_session_max_age) and self.saved_session_max_age > 0):
            raise ValidationError("saved_session_max_age must be a positive number of seconds")
        if self.dtls_queue_size < 1:
            raise ValidationError("dtls_queue_size must be at least 1")
        if self.udp_buffer_bytes is not None and not (
            4096 <= self.udp_buffer_bytes <= 2**31 - 1
        ):
            raise ValidationError(
                f"udp_buffer_bytes must be 4096 to {2**31 - 1} bytes (or unset for the "
                f"system default), not {self.udp_buffer_bytes}"
            )
        object.__setattr__(self, "server_dns_names", tuple(self.server_dns_names))
        object.__setattr__(self, "server_ip_addresses", tuple(self.server_ip_addresses))
        for name in self.server_dns_names:
            if not name or len(name) > 253 or any(c.isspace() for c in name):
                raise ValidationError(f"server_dns_names: {name!r} is not a DNS name")
        for address in self.server_ip_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValidationError(
                    f"server_ip_addresses: {address!r} is not an IP address"
                ) from None
