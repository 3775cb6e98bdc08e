"""The TCP shell: TLS 1.3 with mutual authentication over ``trio.SSLStream`` (stdlib ssl).

Devices present a certificate from the installation CA; OpenSSL checks chain, dates and
purpose (clientAuth) during the handshake, then :class:`SessionHost` names and authorizes the
device. Session tickets (stateless, RFC 8446 section 4.6.1) make reconnects cheap; they are
checked against the directory again on every handshake, so a revocation takes effect on the
next resumed handshake too.
"""

from __future__ import annotations

import errno
import math
import ssl
from pathlib import Path

import trio

from server.identity import InstallationPki
from server.transport.admission import HandshakeTurn, NotAdmitted
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

#: ALPN id for CoAP over TLS (RFC 8323 section 4.1).
COAP_ALPN = "coap"
#: Errors from accept() that mean "out of resources for now", not "listener broken".
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_TRANSPORT = "tcp"


def make_tls_server_context(pki: InstallationPki, *, num_tickets: int = 1) -> ssl.SSLContext:
    """The server's TLS 1.3 context: server cert, client certs required from the CA.

    ``num_tickets`` session tickets are issued per handshake (one is enough for a device
    that reconnects serially; each costs server CPU).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(pki.server_cert_path, pki.server_key_path)
    context.load_verify_locations(cafile=str(pki.ca_cert_path))
    context.verify_mode = ssl.CERT_REQUIRED
    context.num_tickets = num_tickets
    context.set_alpn_protocols([COAP_ALPN])
    return context


def make_tls_client_context(
    ca_path: Path, cert_path: Path, key_path: Path, *, check_hostname: bool = False
) -> ssl.SSLContext:
    """A device-side TLS 1.3 context (device simulators, tests, benchmarks)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=str(ca_path))
    context.load_cert_chain(cert_path, key_path)
    context.check_hostname = check_hostname
    context.set_alpn_protocols([COAP_ALPN])
    return context


class SlotLendingStream(trio.abc.Stream):
    """The TCP stream under a server's ``trio.SSLStream``. While ``turn`` is set (during the
    handshake) it gives the connection's handshake slot back whenever the handshake waits
    for the network, and takes it again (in arrival order, :class:`HandshakeTurn`) as soon
    as bytes arrive, before OpenSSL works on them. A stalled handshake so holds no slot.

    Everything OpenSSL computes follows a receive (SSLStream feeds what arrived to
    OpenSSL, which consumes all of it in that call): after a send it has no new input and
    only asks for more. The first send of a handshake is the server's first flight, for
    which it spent a signature: from then on the turn is ``answered`` and goes first.
    """

    __slots__ = ("socket_stream", "turn")

    def __init__(self, socket_stream: trio.SocketStream, turn: HandshakeTurn | None) -> None:
        self.socket_stream = socket_stream
        #: The connection's claim on handshake slots; None once the handshake is over.
        self.turn = turn

    @property
    def socket(self) -> trio.socket.SocketType:
        """The TCP socket."""
        return self.socket_stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Bytes from the device; during the handshake, with the slot taken again before
        they are returned (may raise :class:`NotAdmitted`)."""
        turn = self.turn
        if turn is None:
            return await self.socket_stream.receive_some(max_bytes)
        turn.give_back()
        data = await self.socket_stream.receive_some(max_bytes)
        if data:  # at EOF OpenSSL only notes the end: nothing to compute
            await turn.take()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send to the device; during the handshake, without holding a slot."""
        turn = self.turn
        if turn is not None:
            turn.give_back()
            turn.answered = True
        await self.socket_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """As the TCP stream's."""
        await self.socket_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the TCP stream."""
        await self.socket_stream.aclose()


class TlsSession(DeviceSession):
    """A device session over TLS; ``receive()`` returns chunks of the byte stream."""

    __slots__ = ("_bucket", "_send_waiters", "_sending", "stream")

    transport = "tcp"

    def __init__(
        self,
        stream: trio.SSLStream[SlotLendingStream],
        device_id: str,
        peer: tuple[str, int],
        host: SessionHost,
    ) -> None:
        super().__init__(device_id, peer, host.limits, bool(stream.session_reused))
        self.stream = stream
        self._bucket: TokenBucket | None = None
        # Serializes sends from several tasks; the parking lot exists only once two tasks
        # actually competed (a trio.Lock per idle session would cost ~340 bytes).
        self._sending = False
        self._send_waiters: trio.lowlevel.ParkingLot | None = None

    async def receive(self) -> bytes:
        """Up to ``limits.max_message_size`` bytes of the stream; SessionClosed at its end.

        Reading slows down to ``limits.bytes_per_second`` (TCP backpressure on the device).
        """
        if self.close_reason is not None:
            raise SessionClosed(self.close_reason)
        try:
            data = await self.stream.receive_some(self.limits.max_message_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._ended(CloseReason.TRANSPORT_ERROR) from None
        if not data:  # EOF or close_notify
            raise self._ended(CloseReason.PEER)
        self._touch()
        now = trio.current_time()
        if self._bucket is None:
            self._bucket = TokenBucket(
                self.limits.bytes_per_second, self.limits.byte_burst, now - 1.0
            )
        delay = self._bucket.take(len(data), now)
        if delay > 0:
            await trio.sleep(delay)
        return bytes(data)

    async def send(self, data: bytes) -> None:
        """Send ``data`` on the stream. Sends from several tasks are serialized.

        The write is shielded from cancellation (a half-written TLS record would break the
        stream) but bounded by ``limits.send_timeout``: a device that stops reading is
        closed as too slow.
        """
        self._check_can_send()
        while self._sending:
            if self._send_waiters is None:
                self._send_waiters = trio.lowlevel.ParkingLot()
            await self._send_waiters.park()
            self._check_can_send()
        self._sending = True
        try:
            self._touch()
            await self._send_shielded(data)
        finally:
            self._sending = False
            if self._send_waiters is not None:
                self._send_waiters.unpark()
        self._touch()

    async def _send_shielded(self, data: bytes) -> None:
        now = trio.current_time()
        outer_deadline = trio.current_effective_deadline()
        if outer_deadline == -math.inf:  # the session is closing: finish this record quickly
            outer_deadline = now + self.limits.farewell_timeout
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = min(now + self.limits.send_timeout, outer_deadline)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._ended(CloseReason.TRANSPORT_ERROR) from None
        if scope.cancelled_caught:
            self.close(CloseReason.SEND_TIMEOUT)
            raise SessionClosed(CloseReason.SEND_TIMEOUT)

    async def _farewell_then_close(self, handler: SessionHandler) -> None:
        # Shielded: the session's own scope is already cancelled; bounded by the timeout.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.limits.farewell_timeout
            await self._farewell(handler)
            # close_notify, then close the socket (RFC 8446 section 6.1).
            await self.stream.aclose()
        if scope.cancelled_caught:
            self._close_now()

    def _close_now(self) -> None:
        _close_socket_now(self.stream)


def _close_socket_now(stream: trio.SSLStream[SlotLendingStream]) -> None:
    """Close the TCP socket without a TLS goodbye (the device may be unreachable)."""
    stream.transport_stream.socket.close()


def _peer_of(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    return (str(address[0]), int(address[1]))


async def _serve_connection(
    tcp_stream: trio.SocketStream, context: ssl.SSLContext, host: SessionHost
) -> None:
    """One TCP connection: admission, handshake within the deadline, authorize, run the
    session.

    Admission, cheapest first: the process's session bound, the connection's source bound
    (``max_pending_per_address``), then the ClientHello must start arriving within
    ``hello_timeout``. The handshake then holds a TLS handshake slot only while it computes
    (:class:`SlotLendingStream`) and while it is authorized; the first wait for one is
    bounded by ``handshake_wait``, the whole handshake by ``handshake_timeout``. Kept as one
    function (one coroutine frame per idle session: memory per session)."""
    peer = _peer_of(tcp_stream)
    if not host.has_room(_TRANSPORT):
        host.refuse(_TRANSPORT, RefuseReason.SERVER_FULL, peer)
        tcp_stream.socket.close()
        return
    source = host.enter_pending(_TRANSPORT, peer)
    if source is None:
        tcp_stream.socket.close()
        return
    host.connection_started(_TRANSPORT)
    turn = host.gate.turn(_TRANSPORT, source)
    transport = SlotLendingStream(tcp_stream, turn)
    stream = trio.SSLStream(transport, context, server_side=True)
    try:
        try:
            if not await host.wait_for_hello(_TRANSPORT, tcp_stream.socket, peer):
                return
            device_id: str | None = None
            with trio.move_on_after(host.limits.handshake_timeout) as deadline:
                try:
                    await stream.do_handshake()
                    transport.turn = None  # the session's traffic lends nothing
                    # Authorization holds a slot (held already: a TLS 1.3 server handshake
                    # ends with the client's Finished arriving).
                    await turn.take()
                except NotAdmitted as exc:  # no slot within handshake_wait, or shutdown
                    host.refuse_unadmitted(_TRANSPORT, peer, exc)
                    return
                except trio.BrokenResourceError as exc:
                    # Garbage, a foreign CA, an expired or wrong-purpose certificate:
                    # OpenSSL says which (SSLCertVerificationError.verify_message).
                    detail = str(exc.__cause__)
                    host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_FAILED, peer, detail)
                    return
                device_id = await host.authorize(_TRANSPORT, stream.getpeercert(True), peer)
            timed_out = deadline.cancelled_caught
            del deadline  # this frame lives as long as the session: keep no garbage
        finally:
            transport.turn = None
            turn.give_back()
            del turn
            host.leave_pending(source)
        if timed_out:
            host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_TIMEOUT, peer)
            return
        if device_id is None:
            with trio.move_on_after(host.limits.farewell_timeout):
                await stream.aclose()  # close_notify: the device learns it was refused
            return
        await host.run(TlsSession(stream, device_id, peer, host))
    except Exception:  # a bug here must end this connection only, never the listener
        logger.exception("TLS connection from %s failed", peer)
    finally:
        _close_socket_now(stream)  # no-op after a graceful close
        host.connection_ended(_TRANSPORT)


async def serve_tls(
    listeners: list[trio.SocketListener],
    context: ssl.SSLContext,
    host: SessionHost,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listeners`` until they are closed or this is cancelled; each connection
    runs as its own task in this function's nursery."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, context, host, nursery)
        task_status.started()


async def _accept_loop(
    listener: trio.SocketListener,
    context: ssl.SSLContext,
    host: SessionHost,
    nursery: trio.Nursery,
) -> None:
    while True:
        try:
            tcp_stream = await listener.accept()
        except OSError as exc:
            if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                # Out of descriptors or memory: back off instead of spinning; sessions
                # that end free room (the 20,000 open files limit per process).
                logger.warning("device listener cannot accept: %s; retrying shortly", exc)
                await trio.sleep(0.1)
                continue
            raise
        except trio.ClosedResourceError:
            return
        nursery.start_soon(_serve_connection, tcp_stream, context, host)
