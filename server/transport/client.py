"""Device-side connectors (device simulators, tests, benchmarks): TLS and DTLS with a
provisioned device's certificate, optionally resuming an earlier session."""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio
from OpenSSL import SSL

from server.identity import ProvisionedDevice
from server.transport.dtls import (
    _connection_of,
    make_dtls_client_context,
    receive_datagram,
)

__all__ = [
    "DeviceCredentials",
    "connect_dtls",
    "connect_tls",
    "dtls_session",
    "dtls_session_reused",
    "receive_datagram",
]
from server.transport.tls import make_tls_client_context


@dataclass(frozen=True)
class DeviceCredentials:
    """The files a device holds: its certificate and key, and the CA to verify the server."""

    cert_path: Path
    key_path: Path
    ca_path: Path

    @classmethod
    def of(cls, device: ProvisionedDevice) -> DeviceCredentials:
        """The credentials :func:`server.identity.provision_devices` wrote for ``device``."""
        return cls(device.cert_path, device.key_path, device.ca_path)

    def tls_context(self) -> ssl.SSLContext:
        """A TLS 1.3 client context; reusable for many connections."""
        return make_tls_client_context(self.ca_path, self.cert_path, self.key_path)

    def dtls_context(self) -> SSL.Context:
        """A fresh DTLS 1.2 client context (pyOpenSSL: one per connection)."""
        return make_dtls_client_context(self.ca_path, self.cert_path, self.key_path)


async def connect_tls(
    address: tuple[str, int],
    credentials: DeviceCredentials,
    *,
    context: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
) -> trio.SSLStream[trio.SocketStream]:
    """Open a TCP connection and complete the TLS 1.3 handshake as the device.

    Pass ``session`` (``stream.session`` of an earlier connection that has received data, so
    that its session ticket arrived) to resume; it only works with the ``context`` that
    connection used. Raises ``trio.BrokenResourceError`` if the handshake fails.
    """
    if session is not None and context is None:
        raise ValueError("resuming a TLS session needs the SSLContext that created it")
    tcp_stream = await trio.open_tcp_stream(*address)
    stream = trio.SSLStream(
        tcp_stream, context if context is not None else credentials.tls_context()
    )
    try:
        if session is not None:
            stream.session = session
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def connect_dtls(
    endpoint: trio.DTLSEndpoint,
    address: tuple[str, int],
    credentials: DeviceCredentials,
    *,
    session: SSL.Session | None = None,
) -> trio.DTLSChannel:
    """Complete a DTLS 1.2 handshake as the device over ``endpoint`` (one peer address per
    endpoint: trio keys channels by address). ``session`` (from :func:`dtls_session`) resumes.
    """
    channel = endpoint.connect(address, credentials.dtls_context())
    try:
        if session is not None:
            # OpenSSL may refuse to resume that session: a full handshake, then.
            with contextlib.suppress(ValueError):
                _set_session(_connection_of(channel), session)
        await channel.do_handshake()
    except BaseException:
        channel.close()
        raise
    return channel


def _set_session(connection: SSL.Connection, session: SSL.Session) -> None:
    """SSL_set_session without pyOpenSSL's same-Context check: each DTLS connection needs a
    fresh Context (trio mutates it in connect()), and OpenSSL only needs a compatible one."""
    from OpenSSL._util import lib

    if lib.SSL_set_session(connection._ssl, session._session) != 1:
        raise ValueError("OpenSSL refused to resume this DTLS session")


def dtls_session(channel: trio.DTLSChannel) -> SSL.Session | None:
    """The session of an established DTLS channel, to resume it later."""
    return _connection_of(channel).get_session()


def dtls_session_reused(channel: trio.DTLSChannel) -> bool:
    """True if the channel's handshake resumed a session."""
    from server.transport.dtls import session_reused

    return session_reused(channel)
