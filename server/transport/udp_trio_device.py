"""Device-side helpers over ``trio.DTLSChannel`` (the emulator, the load generator, tests).

The server no longer uses trio's DTLS (``server/transport/udp_endpoint.py`` owns its UDP
endpoint); devices still do, so that real OpenSSL peers keep talking to our server. trio
exposes neither a channel's OpenSSL connection nor a way to send close_notify: the helpers
here reach into ``DTLSChannel._ssl`` and ``DTLSEndpoint._send_lock`` (checked at run time,
covered by tests/test_transport_dtls.py and tests/test_dtls_datagrams.py). Only device-side
code may import this module.
"""

from __future__ import annotations

import trio
from OpenSSL import SSL, crypto

from otacore.records.openssl_memory import drain_output

__all__ = [
    "connection_of",
    "peer_certificate_der",
    "receive_datagram",
    "send_close_notify",
    "session_reused",
]


def connection_of(channel: trio.DTLSChannel) -> SSL.Connection:
    """The OpenSSL connection behind a trio DTLS channel."""
    connection = getattr(channel, "_ssl", None)
    if not isinstance(connection, SSL.Connection):
        raise RuntimeError(
            f"trio {trio.__version__} DTLSChannel no longer holds its OpenSSL connection in "
            "_ssl; update server/transport/udp_trio_device.py"
        )
    return connection


def peer_certificate_der(channel: trio.DTLSChannel) -> bytes | None:
    """The DER certificate the peer presented (also on resumed sessions), if any."""
    certificate = connection_of(channel).get_peer_certificate()
    if certificate is None:
        return None
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)


def session_reused(channel: trio.DTLSChannel) -> bool:
    """True if the handshake resumed a session (statistics only; False if unknown)."""
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection_of(channel)._ssl))
    except (ImportError, AttributeError):
        return False


async def receive_datagram(channel: trio.DTLSChannel) -> bytes:
    """The application data of the next datagram on ``channel`` that carries any.

    A datagram that yields none is skipped, as RFC 6347 section 4.1.2.7 asks of invalid
    records. trio skips most of them itself (a duplicate, a late handshake record: OpenSSL
    reads them to nothing), but not a datagram OpenSSL's memory BIO refuses, such as an
    empty one: pyOpenSSL's ``bio_write`` of zero bytes fails, with ``SSL.WantReadError``
    once the connection has read anything (the BIO's retry flag), else with an
    ``SSL.Error`` carrying no OpenSSL error, and ``DTLSChannel.receive`` passes that on,
    which would end the session. Empty datagrams come from anyone who can spoof the
    peer's address. The datagram is consumed before the error, so receiving again is safe.
    A close_notify (``SSL.ZeroReturnError``) and errors OpenSSL reports (a fatal alert)
    reach the caller.
    """
    while True:
        try:
            return await channel.receive()
        except SSL.WantReadError:
            continue
        except SSL.ZeroReturnError:
            raise
        except SSL.Error as exc:
            if exc.args and exc.args[0] == []:  # no OpenSSL error: the BIO refused it
                continue
            raise


async def send_close_notify(channel: trio.DTLSChannel) -> None:
    """Send a close_notify alert (RFC 6347 section 4.1 / RFC 5246 section 7.2.1) so the peer
    knows the session is over."""
    connection = connection_of(channel)
    try:
        connection.shutdown()
    except SSL.Error:
        return
    packet = drain_output(connection)
    if not packet:
        return
    endpoint = channel.endpoint
    send_lock: trio.Lock | None = getattr(endpoint, "_send_lock", None)
    try:
        if send_lock is None:
            await endpoint.socket.sendto(packet, channel.peer_address)
        else:
            async with send_lock:
                await endpoint.socket.sendto(packet, channel.peer_address)
    except (OSError, trio.ClosedResourceError):
        pass
