"""Encrypted device transports: TLS 1.3 over TCP and DTLS 1.2 over UDP, mutual auth.

The CoAP layer implements :class:`SessionHandler` and receives :class:`DeviceSession`\\s;
:func:`serve_devices` (or :class:`DeviceServer`) runs both listeners in one nursery.
"""

from server.transport.limits import SessionLimits, TokenBucket
from server.transport.server import (
    DEFAULT_DEVICE_PORT,
    DeviceServer,
    DeviceServerConfig,
    serve_devices,
)
from server.transport.session import (
    CloseReason,
    DeviceSession,
    HandlerFactory,
    SessionClosed,
    SessionHandler,
)
from server.transport.session_host import RefuseReason, TransportStats
from server.transport.session_registry import SessionRegistry

__all__ = [
    "DEFAULT_DEVICE_PORT",
    "CloseReason",
    "DeviceServer",
    "DeviceServerConfig",
    "DeviceSession",
    "HandlerFactory",
    "RefuseReason",
    "SessionClosed",
    "SessionHandler",
    "SessionLimits",
    "SessionRegistry",
    "TokenBucket",
    "TransportStats",
    "serve_devices",
]
