"""The UDP shell: DTLS 1.2 with mutual authentication over ``trio.DTLSEndpoint`` (pyOpenSSL).

trio performs the stateless cookie exchange (RFC 6347 section 4.2.1) before a channel
exists, so only peers that can receive at their source address cost the server anything.
Workarounds for trio/pyOpenSSL behaviour seen here (shared/reference/measured-here.md):

1. a device's close_notify makes ``receive()`` raise ``OpenSSL.SSL.ZeroReturnError``: caught per
   session, never allowed to reach ``DTLSEndpoint.serve`` (which would stop serving);
2. trio never expires DTLS sessions: every session has its own idle deadline;
3. pyOpenSSL freezes a Context after first use: clients make a fresh Context per connection;
4. pyOpenSSL has no DTLS 1.2 constant: the raw version 0xFEFD is used;
5. ``DTLSChannel.send`` writes the record into OpenSSL, waits for the endpoint's send lock,
   and only then drains OpenSSL's output: two tasks sending on one channel at once put both
   records in the first datagram and an empty datagram after it. Sends are serialized per
   session (:meth:`DtlsSession.send`, :func:`send_close_notify`);
6. ``DTLSChannel.receive`` raises ``OpenSSL.SSL.WantReadError`` for a datagram that yields
   no application data and is not a record OpenSSL skips on its own (an empty one, seen
   from 5): :func:`receive_datagram` skips it, on the server and on devices.

trio exposes neither a channel's peer certificate nor a way to send close_notify; the helpers
at the end of this module reach into ``DTLSChannel._ssl`` and ``DTLSEndpoint._send_lock``
(checked at run time, covered by tests/test_transport_dtls.py).
"""

from __future__ import annotations

from pathlib import Path

import trio
from OpenSSL import SSL, crypto

from otacore.records.openssl_memory import drain_output
from server.identity import InstallationPki
from server.transport.admission import NotAdmitted
from server.transport.limits import TokenBucket
from server.transport.session import (
    CloseReason,
    DeviceSession,
    RefuseReason,
    SessionClosed,
    SessionHandler,
    SessionHost,
    logger,
)

#: DTLS 1.2 wire version (RFC 6347 section 4.1); pyOpenSSL has no named constant for it.
DTLS1_2_VERSION = 0xFEFD
#: ECDHE-ECDSA AEAD suites. RFC 7252 section 9.1.3.3 names AES-128-CCM-8 for CoAP, but OpenSSL
#: 3.2+ allows CCM-8 only at security level 0 (measured: a CCM-8-only client fails to connect),
#: so devices need AES-128-CCM, AES-GCM or ChaCha20-Poly1305.
DTLS_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-CCM"
)
#: Session id context: OpenSSL refuses to resume sessions with client certificates without one.
_SESSION_ID_CONTEXT = b"otacloud-dtls"
_TRANSPORT = "udp"


def make_dtls_server_context(pki: InstallationPki) -> SSL.Context:
    """The server's DTLS 1.2 context: server cert, client certs required from the CA.

    Resumption uses stateless session tickets (RFC 5077); the server-side session cache is
    off, so past sessions cost the server no memory. Configure everything here: pyOpenSSL
    refuses changes once the context is in use.
    """
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_cipher_list(DTLS_CIPHERS)
    context.use_certificate_chain_file(str(pki.server_cert_path))
    context.use_privatekey_file(str(pki.server_key_path))
    context.check_privatekey()
    context.load_verify_locations(str(pki.ca_cert_path))
    context.add_client_ca(pki.ca_cert)  # the CertificateRequest names our CA
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _note_verify_failure)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_session_id(_SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


#: X509_V_ERR_* codes worth naming in logs (OpenSSL include/openssl/x509_vfy.h).
_VERIFY_ERRORS = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsuitable certificate purpose",
}


#: After a rejected certificate, how long the handshake may run on to deliver the alert.
_ALERT_GRACE = 0.2


class _HandshakeWatch:
    """Attached to a server connection while it handshakes, so that a certificate OpenSSL
    rejects ends the handshake at once (trio would otherwise retry until the timeout)."""

    __slots__ = ("error", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.error: str | None = None


def _note_verify_failure(
    connection: SSL.Connection, certificate: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """OpenSSL's verify callback: keep its verdict, but record a failure and stop waiting."""
    if not ok:
        watch = connection.get_app_data()
        if isinstance(watch, _HandshakeWatch) and watch.error is None:
            reason = _VERIFY_ERRORS.get(errnum, f"X509 verify error {errnum}")
            watch.error = f"{reason} (chain depth {depth})"
            # Not cancel(): trio still has to send OpenSSL's alert to the device.
            watch.scope.deadline = min(watch.scope.deadline, trio.current_time() + _ALERT_GRACE)
    return bool(ok)


def make_dtls_client_context(ca_path: Path, cert_path: Path, key_path: Path) -> SSL.Context:
    """A device-side DTLS 1.2 context. Make a new one per connection (pitfall 3)."""
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_cipher_list(DTLS_CIPHERS)
    context.use_certificate_chain_file(str(cert_path))
    context.use_privatekey_file(str(key_path))
    context.check_privatekey()
    context.load_verify_locations(str(ca_path))
    context.set_verify(SSL.VERIFY_PEER)
    return context


class DtlsSession(DeviceSession):
    """A device session over DTLS; ``receive()`` returns one datagram's plaintext."""

    __slots__ = ("_bucket", "_send_waiters", "_sending", "channel", "dropped")

    transport = "udp"

    def __init__(
        self,
        channel: trio.DTLSChannel,
        device_id: str,
        peer: tuple[str, int],
        host: SessionHost,
        resumed: bool,
    ) -> None:
        super().__init__(device_id, peer, host.limits, resumed)
        self.channel = channel
        #: Datagrams dropped for size or rate.
        self.dropped = 0
        self._bucket: TokenBucket | None = None
        # One send at a time (pitfall 5); the parking lot exists only once two tasks
        # actually competed (a trio.Lock per idle session would cost ~340 bytes).
        self._sending = False
        self._send_waiters: trio.lowlevel.ParkingLot | None = None

    async def receive(self) -> bytes:
        """The next datagram within size and rate limits (others are dropped: CoAP over UDP
        retransmits, RFC 7252 section 4.2); SessionClosed when the session has ended."""
        limits = self.limits
        while True:
            if self.close_reason is not None:
                raise SessionClosed(self.close_reason)
            try:
                data = await receive_datagram(self.channel)
            except SSL.ZeroReturnError:  # the device's close_notify (pitfall 1)
                raise self._ended(CloseReason.PEER) from None
            except (SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._ended(CloseReason.TRANSPORT_ERROR) from None
            self._touch()
            now = trio.current_time()
            if self._bucket is None:
                self._bucket = TokenBucket(limits.messages_per_second, limits.message_burst, now)
            if len(data) > limits.max_message_size or not self._bucket.try_take(1.0, now):
                self.dropped += 1
                continue
            return data

    async def send(self, data: bytes) -> None:
        """Send ``data`` as one DTLS record in one datagram. Sends from several tasks are
        serialized (pitfall 5). A send cancelled inside trio (after OpenSSL took the record,
        before the datagram left) still leaves its record to ride with the next send: trio
        offers no way to discard it. That happens only to a session's sender being torn
        down, and the device drops or re-requests what it cannot parse."""
        self._check_can_send()
        await self._take_send_turn()
        try:
            await self.channel.send(data)
        except (SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._ended(CloseReason.TRANSPORT_ERROR) from None
        except OSError as exc:  # e.g. ENOBUFS: the datagram is lost, as UDP allows
            logger.debug("datagram to %s lost: %s", self.peer, exc)
        finally:
            self._give_back_send_turn()
        self._touch()

    async def _take_send_turn(self, *, closing: bool = False) -> None:
        """Wait until no other task is sending; ``closing``: for the close_notify, which
        is sent although the session has ended."""
        while self._sending:
            if self._send_waiters is None:
                self._send_waiters = trio.lowlevel.ParkingLot()
            await self._send_waiters.park()
            if not closing and self.close_reason is not None and not self._in_farewell:
                self._send_waiters.unpark()  # pass the wake-up on before giving up
                raise SessionClosed(self.close_reason)
        self._sending = True

    def _give_back_send_turn(self) -> None:
        self._sending = False
        if self._send_waiters is not None:
            self._send_waiters.unpark()

    async def _farewell_then_close(self, handler: SessionHandler) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.limits.farewell_timeout
            await self._farewell(handler)
            if self.close_reason != CloseReason.PEER:
                await self._take_send_turn(closing=True)
                try:
                    await send_close_notify(self.channel)
                finally:
                    self._give_back_send_turn()
        self.channel.close()

    def _close_now(self) -> None:
        self.channel.close()


async def _serve_channel(channel: trio.DTLSChannel, host: SessionHost) -> None:
    """One DTLS peer after the cookie exchange. Never raises (except Cancelled): anything
    escaping here would stop ``DTLSEndpoint.serve`` for every device (pitfall 1)."""
    peer = (str(channel.peer_address[0]), int(channel.peer_address[1]))
    if not host.has_room(_TRANSPORT):
        host.refuse(_TRANSPORT, RefuseReason.SERVER_FULL, peer)
        channel.close()
        return
    # The cookie exchange proved the peer receives at its address, but one address may
    # open any number of channels (one per source port): bound them per address too.
    source = host.enter_pending(_TRANSPORT, peer)
    if source is None:
        channel.close()
        return
    host.connection_started(_TRANSPORT)
    # trio runs the whole handshake (waits for the device included) in one loop: it holds
    # a DTLS slot throughout, of a pool TLS handshakes do not use.
    turn = host.gate.turn(_TRANSPORT, source)
    try:
        try:
            # A bounded number of handshakes at once; the rest wait or go (DTLS has no
            # cheap refusal: a dropped peer's next ClientHello retransmission, RFC 6347
            # section 4.2.4, opens a new channel that queues again, until its own
            # handshake timeout makes the device back off). The ClientHello has arrived
            # already (trio opens a channel for it).
            try:
                await turn.take()
            except NotAdmitted as exc:
                host.refuse_unadmitted(_TRANSPORT, peer, exc)
                return
            device_id: str | None = None
            connection = _connection_of(channel)
            with trio.move_on_after(host.limits.handshake_timeout) as deadline:
                watch = _HandshakeWatch(deadline)
                connection.set_app_data(watch)
                try:
                    await channel.do_handshake()
                except (SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_FAILED, peer, repr(exc))
                    return
                finally:
                    connection.set_app_data(None)
                device_id = await host.authorize(
                    _TRANSPORT, peer_certificate_der(channel), peer
                )
            verify_error, timed_out = watch.error, deadline.cancelled_caught
            del watch, deadline, connection  # this frame lives as long as the session
        finally:
            turn.give_back()
            del turn
            host.leave_pending(source)
        if verify_error is not None:
            # OpenSSL sent the alert (trio sends alerts once); nothing more to tell the peer.
            host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_FAILED, peer, verify_error)
            return
        if timed_out:
            host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_TIMEOUT, peer)
            return
        if device_id is None:
            with trio.move_on_after(host.limits.farewell_timeout):
                await send_close_notify(channel)
            return
        await host.run(DtlsSession(channel, device_id, peer, host, session_reused(channel)))
    except Exception:
        logger.exception("DTLS session with %s failed", peer)
    finally:
        channel.close()
        host.connection_ended(_TRANSPORT)


async def serve_dtls(
    endpoint: trio.DTLSEndpoint,
    context: SSL.Context,
    host: SessionHost,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DTLS devices on ``endpoint`` (bound) until cancelled or the endpoint closes."""
    await endpoint.serve(context, _serve_channel, host, task_status=task_status)


async def receive_datagram(channel: trio.DTLSChannel) -> bytes:
    """The application data of the next datagram on ``channel`` that carries any.

    A datagram that yields none is skipped, as RFC 6347 section 4.1.2.7 asks of invalid
    records. trio skips most of them itself (a duplicate, a late handshake record: OpenSSL
    reads them to nothing), but not a datagram OpenSSL's memory BIO refuses, such as an
    empty one: pyOpenSSL's ``bio_write`` of zero bytes fails, with ``SSL.WantReadError``
    once the connection has read anything (the BIO's retry flag), else with an
    ``SSL.Error`` carrying no OpenSSL error, and ``DTLSChannel.receive`` passes that on,
    which would end the session. Empty datagrams come from anyone who can spoof the
    peer's address, and came from our own server when two tasks sent at once (pitfall 5).
    The datagram is consumed before the error, so receiving again is safe. A close_notify
    (``SSL.ZeroReturnError``) and errors OpenSSL reports (a fatal alert) reach the caller.
    Shared by the server (:class:`DtlsSession`) and devices (emulator, tests).
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


# --- reaching into trio's DTLSChannel (no public API for these) ---------------------------


def _connection_of(channel: trio.DTLSChannel) -> SSL.Connection:
    connection = getattr(channel, "_ssl", None)
    if not isinstance(connection, SSL.Connection):
        raise RuntimeError(
            f"trio {trio.__version__} DTLSChannel no longer holds its OpenSSL connection in "
            "_ssl; update server/transport/dtls.py"
        )
    return connection


def peer_certificate_der(channel: trio.DTLSChannel) -> bytes | None:
    """The DER certificate the peer presented (also on resumed sessions), if any."""
    certificate = _connection_of(channel).get_peer_certificate()
    if certificate is None:
        return None
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)


def session_reused(channel: trio.DTLSChannel) -> bool:
    """True if the handshake resumed a session (statistics only; False if unknown)."""
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(_connection_of(channel)._ssl))
    except (ImportError, AttributeError):
        return False


async def send_close_notify(channel: trio.DTLSChannel) -> None:
    """Send a close_notify alert (RFC 6347 section 4.1 / RFC 5246 section 7.2.1) so the device
    knows the session is over and handshakes again instead of waiting for timeouts."""
    connection = _connection_of(channel)
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
