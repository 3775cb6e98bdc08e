"""The server's TLS 1.3 handshake over TCP: OpenSSL (pyOpenSSL on memory BIOs) runs it as a
sans-IO :class:`~otacore.records.tls13_handover.Tls13Handshake`; this module gives it the
server's context and drives it over a ``trio.SocketStream``, lending the connection's
handshake slot back whenever it waits for the device.

Once the client's Finished has arrived the handshake is taken over
(:meth:`Tls13Handshake.take_over`): OpenSSL is freed and the session continues in our own
record layer (:mod:`server.transport.tls_session`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from OpenSSL import SSL, crypto

from otacore.errors import OtaError, RecordHandoverError
from otacore.records.tls13_handover import (
    Tls13Handover,
    Tls13Handshake,
    enable_record_export,
    split_records,
)
from otacore.records.tls13_keys import traffic_key_and_iv
from otacore.records.tls13_protocol import ContentType
from otacore.records.verify_errors import verify_failure_reason
from server.identity import InstallationPki
from server.transport.admission import HandshakeTurn

__all__ = [
    "COAP_ALPN",
    "HandshakeResult",
    "TlsHandshakeFailed",
    "make_tls_handshake_context",
    "run_server_handshake",
    "server_hello_resumes",
]

#: ALPN id for CoAP over TLS (RFC 8323 section 4.1).
COAP_ALPN = "coap"
_COAP_ALPN_BYTES = COAP_ALPN.encode()
#: The session id context: OpenSSL resumes a session with a client certificate only within
#: the context that made it (SSL_CTX_set_session_id_context).
_SESSION_ID_CONTEXT = b"otacloud-tls13"
#: Bytes asked of the socket per read while handshaking (a device's whole second flight,
#: certificate included, fits).
_HANDSHAKE_READ_SIZE = 16 * 1024
#: RFC 8446 4.1.3: the ServerHello.random of a HelloRetryRequest.
_HELLO_RETRY_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)
#: Session tickets sent per full handshake: a device that reconnects serially needs one.
TICKETS_PER_HANDSHAKE = 1
#: RFC 8446 4: the NewSessionTicket handshake message type.
_NEW_SESSION_TICKET = 4
#: RFC 8446 4.2: the pre_shared_key extension; a ServerHello carries it iff it resumes.
_PRE_SHARED_KEY = 41


class TlsHandshakeFailed(OtaError):
    """The device's TLS handshake failed: ``str()`` says why (OpenSSL's verdict on its
    certificate, a protocol error, or the connection ending)."""


def make_tls_handshake_context(pki: InstallationPki) -> SSL.Context:
    """The server's TLS 1.3 context (pyOpenSSL): its certificate, client certificates
    required from the installation CA, ALPN ``coap`` (RFC 8323 4.1), stateless session
    tickets (RFC 8446 4.6.1; no server-side cache, so past sessions cost no memory), and
    the traffic secrets exported to the hand-over.

    OpenSSL issues its default two tickets per full handshake (pyOpenSSL has no
    ``SSL_CTX_set_num_tickets``); :func:`run_server_handshake` sends ``num_tickets``.
    Configure everything here: pyOpenSSL refuses changes once the context is in use.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(str(pki.server_cert_path))
    context.use_privatekey_file(str(pki.server_key_path))
    context.check_privatekey()
    context.load_verify_locations(str(pki.ca_cert_path))
    context.add_client_ca(pki.ca_cert)  # the CertificateRequest names our CA (4.2.4)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _note_verify_failure)
    context.set_alpn_select_callback(_select_coap)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_session_id(_SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    enable_record_export(context)
    return context


def _select_coap(connection: SSL.Connection, offered: list[bytes]) -> Any:
    # (Any: pyOpenSSL names the type of NO_OVERLAPPING_PROTOCOLS privately.)
    # RFC 8323 4.1: "coap" if offered; a client offering only other protocols is served
    # without ALPN (as the stdlib server did) rather than refused.
    return _COAP_ALPN_BYTES if _COAP_ALPN_BYTES in offered else SSL.NO_OVERLAPPING_PROTOCOLS


class _ServerHandshake(Tls13Handshake):
    """A server handshake that also keeps OpenSSL's certificate verdict for the logs."""

    __slots__ = ("verify_error",)

    def __init__(self, context: SSL.Context) -> None:
        #: Why OpenSSL rejected the device's certificate (set by the verify callback).
        self.verify_error: str | None = None
        super().__init__(context, is_server=True)


def _note_verify_failure(
    connection: SSL.Connection, certificate: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """OpenSSL's verify callback: keep its verdict, remember why it failed."""
    if not ok:
        handshake = connection.get_app_data()
        if isinstance(handshake, _ServerHandshake) and handshake.verify_error is None:
            handshake.verify_error = verify_failure_reason(errnum, depth)
    return bool(ok)


def server_hello_resumes(flight: bytes) -> bool | None:
    """Whether the server flight ``flight`` (its first record a ServerHello, as OpenSSL
    writes it) accepts a pre-shared key, i.e. resumes a session (RFC 8446 4.2.11: the
    server's pre_shared_key extension). None if ``flight`` does not start with a
    ServerHello, or starts with a HelloRetryRequest (4.1.4: the real one follows)."""
    # Record header (5.1), then Handshake header (4): type 2 = server_hello.
    if len(flight) < 9 or flight[0] != 22 or flight[5] != 2:
        return None
    record_end = 5 + int.from_bytes(flight[3:5], "big")
    message = flight[9 : min(record_end, 9 + int.from_bytes(flight[6:9], "big"))]
    # 4.1.3: legacy_version(2) random(32) legacy_session_id_echo<0..32>
    # cipher_suite(2) legacy_compression_method(1) extensions<6..2^16-1>.
    if len(message) < 35 or message[2:34] == _HELLO_RETRY_RANDOM:
        return None
    pos = 35 + message[34] + 3
    end = pos + 2 + int.from_bytes(message[pos : pos + 2], "big")
    pos += 2
    while pos + 4 <= min(end, len(message)):
        extension_type = int.from_bytes(message[pos : pos + 2], "big")
        if extension_type == _PRE_SHARED_KEY:
            return True
        pos += 4 + int.from_bytes(message[pos + 2 : pos + 4], "big")
    return False


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """A completed server handshake, OpenSSL already freed."""

    handover: Tls13Handover
    #: True if the handshake resumed an earlier session (a ticket, RFC 8446 2.2).
    resumed: bool
    #: The NewSessionTicket records (RFC 8446 4.6.1), sealed before any record of the
    #: hand-over's layer: send them first, with the session's first write.
    tickets: bytes


async def run_server_handshake(
    stream: trio.SocketStream,
    context: SSL.Context,
    turn: HandshakeTurn,
    *,
    num_tickets: int = TICKETS_PER_HANDSHAKE,
) -> HandshakeResult:
    """Run the server's side of a TLS 1.3 handshake on ``stream`` and take it over.

    The connection's handshake slot (``turn``) is given back whenever the handshake waits
    for the device and taken again (in arrival order) as soon as bytes arrive, before
    OpenSSL works on them: a stalled handshake holds no slot. The first flight the server
    sends marks the turn ``answered`` (it then goes first: a signature was spent on it).
    At most ``num_tickets`` of OpenSSL's session tickets are kept, returned unsent
    (:attr:`HandshakeResult.tickets`). Returns holding the slot. Raises
    :class:`TlsHandshakeFailed` (after sending OpenSSL's alert, if it wrote one), or
    :class:`~server.transport.admission.NotAdmitted` if no slot came in time; the caller
    bounds the whole handshake with a deadline.
    """
    handshake = _ServerHandshake(context)
    resumed = False
    handover: Tls13Handover | None = None
    tickets = b""
    try:
        while not handshake.complete:
            turn.give_back()
            try:
                data = await stream.receive_some(_HANDSHAKE_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise TlsHandshakeFailed(
                    f"the connection broke during the handshake: {error}"
                ) from None
            if not data:
                raise TlsHandshakeFailed("the device closed the connection during the handshake")
            await turn.take()
            try:
                handshake.receive_data(data)
            except RecordHandoverError as error:
                detail = handshake.verify_error or str(error)
                turn.give_back()
                await _send_alert(stream, handshake.data_to_send())
                raise TlsHandshakeFailed(detail) from error
            flight = handshake.data_to_send()
            if handshake.complete:
                # The completing step wrote the tickets (4.6.1) sealed under the new key:
                # they go with the session's first write (one send less per handshake).
                handover = handshake.take_over()
                tickets, handover = _keep_tickets(flight, handover, num_tickets)
                break
            if not flight:
                continue
            verdict = server_hello_resumes(flight)
            if verdict is not None:
                resumed = verdict
            turn.give_back()
            turn.answered = True
            try:
                await stream.send_all(flight)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise TlsHandshakeFailed(
                    f"the connection broke during the handshake: {error}"
                ) from None
    finally:
        handshake.abort()  # no-op once taken over; else frees OpenSSL now
    assert handover is not None  # the loop ends only once the handshake completed
    await turn.take()
    return HandshakeResult(handover, resumed, tickets)


def _keep_tickets(
    flight: bytes, handover: Tls13Handover, num_tickets: int
) -> tuple[bytes, Tls13Handover]:
    """The first ``num_tickets`` of the NewSessionTicket records OpenSSL wrote as the
    handshake completed, and the hand-over continuing after them.

    OpenSSL issues two tickets per full handshake and pyOpenSSL cannot lower that; a
    device resuming serially needs one, and each costs it ~0.8 KiB (the ticket carries
    its certificate). Dropping the last records of the flight is safe: they are the last
    ones sealed, never leave this process, and the write sequence continues from the kept
    ones, so no nonce is ever used for two records that are sent (RFC 8446 5.3). The
    flight is kept whole unless every record is proven (opened) to hold tickets only."""
    records = split_records(flight)
    if len(records) <= num_tickets or handover.write_seq != len(records):
        return flight, handover
    key, iv_bytes = traffic_key_and_iv(handover.suite, handover.write_secret)
    aead = handover.suite.aead(key)
    iv = int.from_bytes(iv_bytes, "big")
    for seq, record in enumerate(records):
        try:
            inner = aead.decrypt((iv ^ seq).to_bytes(12, "big"), record[5:], record[:5])
        except InvalidTag:
            return flight, handover
        # 5.4: content, then its type (22: handshake), no padding from OpenSSL; 4.6.1:
        # one NewSessionTicket (type 4) filling the record.
        if (
            len(inner) < 5
            or inner[-1] != ContentType.HANDSHAKE
            or inner[0] != _NEW_SESSION_TICKET
            or 4 + int.from_bytes(inner[1:4], "big") != len(inner) - 1
        ):
            return flight, handover
    kept = records[:num_tickets]
    return b"".join(kept), replace(handover, write_seq=len(kept))



async def _send_alert(stream: trio.SocketStream, alert: bytes) -> None:
    """Tell the device why its handshake failed (OpenSSL's alert), if the socket takes it."""
    if not alert:
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(alert)
