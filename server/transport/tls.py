"""The TCP shell: TLS 1.3 with mutual authentication, the handshake run by OpenSSL, the
session by our own record layer.

Devices present a certificate from the installation CA; OpenSSL (pyOpenSSL on memory BIOs,
:mod:`server.transport.tls_handshake`) checks chain, dates and purpose (clientAuth) during
the handshake and is then freed: the session continues in
:class:`~server.transport.tls_session.TlsSession` over the plain socket, and
:class:`SessionHost` names and authorizes the device from the certificate the hand-over
kept. Session tickets (stateless, RFC 8446 section 4.6.1) make reconnects cheap; they are
checked against the directory again on every handshake, so a revocation takes effect on the
next resumed handshake too.
"""

from __future__ import annotations

import errno
import ssl
from pathlib import Path

import trio
from OpenSSL import SSL

from server.identity import InstallationPki
from server.transport.admission import NotAdmitted
from server.transport.session import logger
from server.transport.session_host import RefuseReason, SessionHost
from server.transport.tls_handshake import (
    COAP_ALPN,
    HandshakeResult,
    TlsHandshakeFailed,
    make_tls_handshake_context,
    run_server_handshake,
)
from server.transport.tls_idle import IdleSweeper
from server.transport.tls_session import TlsSession

__all__ = [
    "COAP_ALPN",
    "TlsSession",
    "make_tls_client_context",
    "make_tls_handshake_context",
    "make_tls_server_context",
    "serve_tls",
]
#: Errors from accept() that mean "out of resources for now", not "listener broken".
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_TRANSPORT = "tcp"


def make_tls_server_context(pki: InstallationPki, *, num_tickets: int = 1) -> ssl.SSLContext:
    """A stdlib TLS 1.3 server context like the device server's: server cert, client certs
    required from the CA. The device server itself uses :func:`make_tls_handshake_context`
    (pyOpenSSL, handed over to our record layer); this one serves the benchmarks' reference
    servers (bench/sessions: ``--bare``, openssl_cost.py).

    ``num_tickets`` session tickets are issued per handshake.
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


def _peer_of(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    return (str(address[0]), int(address[1]))


async def _serve_connection(
    tcp_stream: trio.SocketStream, context: SSL.Context, host: SessionHost, sweeper: IdleSweeper
) -> None:
    """One TCP connection: admission, handshake within the deadline, authorize, run the
    session.

    Admission, cheapest first: the process's session bound, the connection's source bound
    (``max_pending_per_address``), then the ClientHello must start arriving within
    ``hello_timeout``. The handshake then holds a TLS handshake slot only while it computes
    (:func:`run_server_handshake`) and while it is authorized; the first wait for one is
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
    result: HandshakeResult | None = None
    try:
        try:
            if not await host.wait_for_hello(_TRANSPORT, tcp_stream.socket, peer):
                return
            device_id: str | None = None
            with trio.move_on_after(host.limits.handshake_timeout) as deadline:
                try:
                    # Returns holding the slot: authorization holds one too.
                    result = await run_server_handshake(tcp_stream, context, turn)
                except NotAdmitted as exc:  # no slot within handshake_wait, or shutdown
                    host.refuse_unadmitted(_TRANSPORT, peer, exc)
                    return
                except TlsHandshakeFailed as exc:
                    # Garbage, a foreign CA, an expired or wrong-purpose certificate:
                    # OpenSSL's verdict says which.
                    host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_FAILED, peer, str(exc))
                    return
                device_id = await host.authorize(
                    _TRANSPORT, result.handover.peer_certificate_der, peer
                )
            timed_out = deadline.cancelled_caught
            del deadline  # this frame lives as long as the session: keep no garbage
        finally:
            turn.give_back()
            del turn
            host.leave_pending(source)
            sweeper.note_freed()  # OpenSSL's handshake state
        if timed_out or result is None:
            host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_TIMEOUT, peer)
            return
        handover = result.handover
        session = TlsSession(
            tcp_stream,
            handover.record_layer(),
            device_id or "",
            peer,
            host,
            resumed=result.resumed,
            unread=handover.unprocessed,
            unsent=result.tickets,  # the layer's sequence numbers continue after them
            sweeper=sweeper,
        )
        del result, handover
        if device_id is None:
            # close_notify: the device learns it was refused.
            with trio.move_on_after(host.limits.farewell_timeout):
                await session._say_goodbye()
            session._close_now()
            return
        await host.run(session)
    except Exception:  # a bug here must end this connection only, never the listener
        logger.exception("TLS connection from %s failed", peer)
    finally:
        tcp_stream.socket.close()  # no-op after a graceful close
        host.connection_ended(_TRANSPORT)


async def serve_tls(
    listeners: list[trio.SocketListener],
    context: SSL.Context,
    host: SessionHost,
    *,
    sweeper: IdleSweeper | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listeners`` until they are closed or this is cancelled; each connection
    runs as its own task in this function's nursery. ``sweeper`` (default: one with the
    host's ``limits``) drops the ciphers of quiet sessions and gives the C heap back to the
    system."""
    sweeper = sweeper if sweeper is not None else IdleSweeper.from_limits(host.limits)
    async with trio.open_nursery() as trimming:
        trimming.start_soon(sweeper.run)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, context, host, sweeper, nursery)
            task_status.started()
        trimming.cancel_scope.cancel()  # every connection has ended


async def _accept_loop(
    listener: trio.SocketListener,
    context: SSL.Context,
    host: SessionHost,
    sweeper: IdleSweeper,
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
        nursery.start_soon(_serve_connection, tcp_stream, context, host, sweeper)
